"""Which transformer classes of the installed diffusers cachekit supports, and why not the others.

Users ask "does it work on mine?" first. The answer is computed, not written: every transformer class the installed
diffusers defines is listed either as supported (it has a registry entry; its modes, components and timestep
convention come from that entry) or as not supported (a reason in `registry.NOT_SUPPORTED`). A class in neither is
reported as unclassified, and the coverage test fails on it, so a diffusers upgrade that adds a family is noticed.

The inventory rule: every class exported at the top level of `diffusers` that subclasses `ModelMixin` and is
defined in a module of the `diffusers.models.transformers` package. That is where diffusers keeps its transformer
denoisers, whatever their name ends with (`HunyuanDiT2DModel`, `PriorTransformer`, `StableAudioDiTModel`, ...).

`cachekit models` prints the table; `scripts/write_models_doc.py` writes it to docs/models.md.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any

from . import cli_options as opts
from .registry import BLOCK_COMPONENT, COVERAGE_SPECS, NOT_SUPPORTED, spec_for, supported_models

__all__ = ["CoverageRow", "transformer_classes", "coverage", "unclassified", "markdown", "compact_markdown",
           "add_parser", "INVENTORY_RULE"]

INVENTORY_RULE = ("every class exported at the top level of `diffusers` that subclasses `ModelMixin` and is defined "
                  "in a module of `diffusers.models.transformers`")

# What exercises a supported class (the tests live in tests/; the coverage test checks these names are real).
_CORE_TESTS = "every technique, each check its own test (test_techniques, test_core_hooks)"
_COVERAGE_TESTS = "every technique in one sweep (test_techniques), exact / reuse / MACs (test_core_hooks)"
PIPELINE_TESTS: dict[str, str] = {
    "PixArtTransformer2DModel": "PixArtAlphaPipeline (bundled digits model)",
    "WanTransformer3DModel": "WanPipeline (bundled digits-video model)",
    "SD3Transformer2DModel": "StableDiffusion3Pipeline (tiny components)",
    "SanaTransformer2DModel": "SanaPipeline (tiny components)",
    "FluxTransformer2DModel": "FluxPipeline (tiny components)",
    "AuraFlowTransformer2DModel": "AuraFlowPipeline (tiny components)",
    "ChromaTransformer2DModel": "ChromaPipeline (tiny components; CFG as two unnamed calls)",
    "LTXVideoTransformer3DModel": "LTXPipeline (tiny components)",
    "PriorTransformer": "KandinskyV22PriorPipeline (tiny components)",
    "DiTTransformer2DModel": "DiTPipeline (tiny components; class-conditional)",
    "Transformer2DModel": "PixArtAlphaPipeline (tiny components; the legacy PixArt class)",
    # T5 group (tests/stock_pipelines_t5.py)
    "CogVideoXTransformer3DModel": "CogVideoXPipeline (tiny components)",
    "AllegroTransformer3DModel": "AllegroPipeline (tiny components)",
    "CogView3PlusTransformer2DModel": "CogView3PlusPipeline (tiny components)",
    "BriaTransformer2DModel": "BriaPipeline (tiny components)",
    "HunyuanDiT2DModel": "HunyuanDiTPipeline (tiny components; BERT and T5 text encoders)",
    # Wan group (tests/stock_pipelines_wan.py)
    "SkyReelsV2Transformer3DModel": "SkyReelsV2Pipeline (tiny components)",
    "WanVACETransformer3DModel": "WanVACEPipeline (tiny components; text to video, no control video)",
    "HeliosTransformer3DModel": "HeliosPipeline (tiny components; one chunk)",
    "SanaVideoTransformer3DModel": "SanaVideoPipeline (tiny components)",
    "ChronoEditTransformer3DModel": "ChronoEditPipeline (tiny components; image to video, CFG as two unnamed calls)",
    "BriaFiboTransformer2DModel": "BriaFiboPipeline (tiny components)",
    # Qwen group (tests/stock_pipelines_qwen.py)
    "LongCatImageTransformer2DModel": "LongCatImagePipeline (tiny components; CFG as two named calls)",
    "QwenImageTransformer2DModel": "QwenImagePipeline (tiny components; true CFG as two named calls)",
    "OvisImageTransformer2DModel": "OvisImagePipeline (tiny components; CFG as two named calls)",
    "Flux2Transformer2DModel": "Flux2KleinPipeline (tiny components; CFG as two named calls, empty negative)",
    "CogView4Transformer2DModel": "CogView4Pipeline (tiny components; CFG as two named calls)",
    "Krea2Transformer2DModel": "Krea2Pipeline (tiny components; CFG as two unnamed calls)",
    "HunyuanImageTransformer2DModel": "HunyuanImagePipeline (tiny components; guider CFG as two named calls)",
    # Hunyuan group (tests/stock_pipelines_hunyuan.py)
    "HunyuanVideo15Transformer3DModel": "HunyuanVideo15Pipeline (tiny components; guider CFG as two named calls)",
    "MotifVideoTransformer3DModel": "MotifVideoPipeline (tiny components; guider CFG as two named calls)",
    "HunyuanVideoTransformer3DModel": "HunyuanVideoPipeline (tiny components; true CFG as two named calls)",
    "EasyAnimateTransformer3DModel": "EasyAnimatePipeline (tiny components; BERT text encoder)",
    "PRXTransformer2DModel": "PRXPipeline (tiny components)",
    "HunyuanVideoFramepackTransformer3DModel": "HunyuanVideoFramepackPipeline (tiny components; true CFG as two "
                                               "unnamed calls)",
    # vision-language group (tests/stock_pipelines_vl.py)
    "Flux3Transformer2DModel": "Flux3ModularPipeline (tiny components; guider CFG as two unnamed calls)",
    "ConsisIDTransformer3DModel": "ConsisIDPipeline (tiny components; image to video, face branch off)",
    "NucleusMoEImageTransformer2DModel": "NucleusMoEImagePipeline (tiny components; CFG as two unnamed calls)",
    "JoyImageEditTransformer3DModel": "JoyImageEditPipeline (tiny components; image edit, CFG as two unnamed calls)",
    "GlmImageTransformer2DModel": "GlmImagePipeline (tiny components; prior tokens given, CFG as two unnamed calls)",
}
"""Classes tested through their stock pipeline's `__call__` as well, and which pipeline."""


@dataclass(frozen=True)
class CoverageRow:
    """One transformer class of the installed diffusers and what cachekit does with it."""

    class_name: str
    module: str
    supported: bool
    block_lists: str = ""
    components: str = ""
    timestep: str = ""
    tests: str = ""
    reason: str = ""
    stock_pipeline: str = ""  # the diffusers pipeline its stock-pipeline test calls


def transformer_classes() -> dict[str, str]:
    """{class name: defining module} for every transformer class of the installed diffusers (`INVENTORY_RULE`)."""
    import diffusers
    import diffusers.models.transformers as transformers_package
    from diffusers import ModelMixin

    exported = set(dir(diffusers))
    found = {}
    for name, value in vars(transformers_package).items():
        if (isinstance(value, type) and issubclass(value, ModelMixin) and name in exported
                and value.__module__.startswith("diffusers.models.transformers.")):
            found[name] = value.__module__.rsplit(".", 1)[-1]
    return dict(sorted(found.items()))


def _row(name: str, module: str) -> CoverageRow:
    if name in supported_models():
        spec = spec_for(name)
        lists = ", ".join(f"`{g.attr}`" for g in spec.groups)
        components = "; ".join(f"{g.attr}: {', '.join(g.components)}" for g in spec.groups)
        scale = "" if spec.timestep_scale == 1.0 else f" (pipeline passes t / {spec.timestep_scale:g})"
        core = name not in {s.class_name for s in COVERAGE_SPECS}
        tests = _CORE_TESTS if core else _COVERAGE_TESTS
        if name in PIPELINE_TESTS:
            tests += f"; stock pipeline: {PIPELINE_TESTS[name]}"
        return CoverageRow(name, module, True, lists, f"component ({components}); {BLOCK_COMPONENT}",
                           f"`{spec.timestep_arg}`{scale}", tests,
                           stock_pipeline=PIPELINE_TESTS.get(name, "").split(" ", 1)[0])
    return CoverageRow(name, module, False, reason=NOT_SUPPORTED.get(name, ""))


def coverage() -> list[CoverageRow]:
    """Every transformer class of the installed diffusers, supported or with its reason, sorted by name."""
    return [_row(name, module) for name, module in transformer_classes().items()]


def unclassified(rows: list[CoverageRow] | None = None) -> list[str]:
    """Classes of the installed diffusers with neither a registry entry nor a reason: each needs a decision."""
    return [r.class_name for r in (coverage() if rows is None else rows) if not r.supported and not r.reason]


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def markdown(rows: list[CoverageRow]) -> str:
    """The full tables: supported classes with their modes and tests, then the others with their reasons."""
    supported = [r for r in rows if r.supported]
    others = [r for r in rows if not r.supported]
    lines = [f"**{len(supported)} of {len(rows)}** transformer classes of diffusers {_diffusers_version()} are "
             "supported.", "", "### Supported", "",
             "| class | block lists | modes (component: cached sub-modules per list; block) | timestep | tests |",
             "|---|---|---|---|---|"]
    lines += [f"| `{r.class_name}` | {r.block_lists} | {r.components} | {r.timestep} | {r.tests} |" for r in supported]
    lines += ["", "### Not supported", "", "| class | reason |", "|---|---|"]
    lines += [f"| `{r.class_name}` | {r.reason or '**unclassified**'} |" for r in others]
    return "\n".join(lines) + "\n"


def compact_markdown(rows: list[CoverageRow]) -> str:
    """A short table for the README: the supported classes, grouped by the shape of their blocks."""
    supported = [r for r in rows if r.supported]
    lines = [f"cachekit supports {len(supported)} of the {len(rows)} transformer classes of diffusers "
             f"{_diffusers_version()}, in both modes (cached components and whole-block residuals), each tested by "
             "every technique on a tiny offline config and through its stock diffusers pipeline, built from tiny "
             "components (steps tracked, CFG branches kept apart, caches freed). The full table, with the reason for "
             "each class it does not support, is `cachekit models` and [docs/models.md](docs/models.md).", "",
             "| class | cached components | stock pipeline tested |", "|---|---|---|"]
    lines += [f"| `{r.class_name}` | {r.components.removeprefix('component (').rsplit(');', 1)[0]} | "
              f"{r.stock_pipeline or '-'} |" for r in supported]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ the verb
def _cmd_models(args: argparse.Namespace) -> int:
    rows = coverage()
    if args.supported:
        rows = [r for r in rows if r.supported]
    if args.unsupported:
        rows = [r for r in rows if not r.supported]
    if args.format == "json":
        print(json.dumps([asdict(r) for r in rows], indent=2))
    elif args.format == "markdown":
        print(markdown(rows), end="")
    else:
        width = max((len(r.class_name) for r in rows), default=5)
        for r in rows:
            what = r.components if r.supported else f"not supported: {r.reason or 'UNCLASSIFIED'}"
            print(f"{r.class_name:<{width}}  {what}")
        print(f"{sum(r.supported for r in rows)} supported, {sum(not r.supported for r in rows)} not supported "
              f"(diffusers {_diffusers_version()})")
    return 0


def add_parser(subparsers: Any) -> None:
    """Add the `models` verb: the coverage table of the installed diffusers."""
    parser = subparsers.add_parser(
        "models", help="list the installed diffusers' transformer classes: supported or why not",
        description="List every transformer class the installed diffusers defines (" + INVENTORY_RULE + "): "
                    "supported ones with the block lists and components cachekit caches, the others with the reason.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--supported", action="store_true", help="only the supported classes")
    which.add_argument("--unsupported", action="store_true", help="only the classes cachekit does not support")
    parser.add_argument("--format", choices=("text", "markdown", "json"), default="text",
                        help="text (one line per class, default), markdown (docs/models.md tables) or json")
    opts.set_handler(parser, _cmd_models)
