"""Where the blocks and cacheable components of each diffusers transformer live.

Caching needs to know three things about a model: which `nn.ModuleList`s hold its transformer blocks, which
sub-modules of a block produce an output that can be served from cache (attention, feed-forward, ...), and how the
denoising timestep reaches the transformer. That knowledge is data, kept here, so that supporting a new model is
adding one `ModelSpec` with `register_model` instead of writing a forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import CachekitError

__all__ = [
    "BlockGroupSpec",
    "ModelSpec",
    "BlockRef",
    "ModelLayout",
    "register_model",
    "spec_for",
    "resolve_layout",
    "supported_models",
    "UnsupportedModelError",
]

BLOCK_COMPONENT = "block"
"""The single component name used in whole-block residual mode."""


class UnsupportedModelError(CachekitError, TypeError):
    """Raised for a transformer class that has no registry entry."""


@dataclass(frozen=True)
class BlockGroupSpec:
    """One list of transformer blocks inside a model.

    Args:
        attr: attribute of the transformer holding the `nn.ModuleList` of blocks.
        components: attribute names, inside each block, of the sub-modules whose raw output may be reused. The
            block's own gates, shifts and residual additions run live around them.
        residual_outputs: for whole-block residual mode, the name of the block's forward argument that each element
            of the block's output updates (e.g. FLUX blocks return `(encoder_hidden_states, hidden_states)`).
        cross_attention: the components that attend to the text only (TGATE caches these after its gate step).
        feeders: per component, the block's sub-modules whose output only that component reads (the norm in front
            of an attention or feed-forward). When every row of a forward reuses the component, they are skipped
            too: on small token counts they are a large share of what a reused component still costs.
    """

    attr: str
    components: tuple[str, ...]
    residual_outputs: tuple[str, ...] = ("hidden_states",)
    cross_attention: tuple[str, ...] = ()
    feeders: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def feeders_of(self, component: str) -> tuple[str, ...]:
        return next((modules for name, modules in self.feeders if name == component), ())


@dataclass(frozen=True)
class ModelSpec:
    """Registry entry for one diffusers transformer class.

    Args:
        class_name: the diffusers class name; subclasses match through their MRO.
        groups: block lists in execution order. Blocks are numbered globally across groups.
        timestep_arg: name of the forward argument carrying the denoising timestep.
        timestep_scale: factor from the value the transformer receives to the scheduler's timestep units (FLUX
            pipelines pass `t / 1000`, so 1000 there).
        unbatched_args: argument names that never carry a batch dimension (rotary embeddings), so they are passed
            whole when a component runs on a subset of batch rows.
    """

    class_name: str
    groups: tuple[BlockGroupSpec, ...]
    timestep_arg: str = "timestep"
    timestep_scale: float = 1.0
    unbatched_args: frozenset[str] = field(default_factory=lambda: frozenset({"image_rotary_emb", "rotary_emb"}))


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, *, overwrite: bool = False) -> None:
    """Add a transformer class to the registry. This is the one step needed to support a new model."""
    if spec.class_name in _REGISTRY and not overwrite:
        raise ValueError(f"{spec.class_name} is already registered; pass overwrite=True to replace it.")
    _REGISTRY[spec.class_name] = spec


def supported_models() -> list[str]:
    return sorted(_REGISTRY)


def spec_for(transformer: nn.Module | str) -> ModelSpec:
    """Find the registry entry for a transformer instance, class or class name."""
    if isinstance(transformer, str):
        names = [transformer]
    else:
        cls = transformer if isinstance(transformer, type) else type(transformer)
        names = [klass.__name__ for klass in cls.__mro__]
    for name in names:
        if name in _REGISTRY:
            return _REGISTRY[name]
    raise UnsupportedModelError(
        f"cachekit has no registry entry for {names[0]}. Supported: {', '.join(supported_models())}. "
        "To add one, call cachekit.registry.register_model(ModelSpec(class_name=..., groups=(BlockGroupSpec("
        "attr='<blocks ModuleList>', components=('<sub-module>', ...)),))) before enabling."
    )


@dataclass(frozen=True)
class BlockRef:
    index: int
    path: str
    module: nn.Module
    group: BlockGroupSpec


@dataclass(frozen=True)
class ModelLayout:
    """The concrete blocks and components of one transformer instance.

    `present[b, c]` is False where block `b` has no component `c` (FLUX single blocks have no `ff_context`, the last
    SD3 block has none either); schedule entries there are meaningless and never consulted.
    """

    model_class: str
    blocks: tuple[BlockRef, ...]
    components: tuple[str, ...]
    present: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


def resolve_layout(transformer: nn.Module, mode: str = "component") -> ModelLayout:
    """Walk the registry entry over an instance: list its blocks and which components each one has."""
    if mode not in ("component", "block"):
        raise ValueError(f"mode must be 'component' or 'block', got {mode!r}")
    spec = spec_for(transformer)
    blocks: list[BlockRef] = []
    for group in spec.groups:
        module_list = getattr(transformer, group.attr, None)
        if module_list is None:
            continue
        for i, block in enumerate(module_list):
            blocks.append(BlockRef(len(blocks), f"{group.attr}.{i}", block, group))
    if not blocks:
        raise UnsupportedModelError(f"{type(transformer).__name__} has no blocks under {[g.attr for g in spec.groups]}")

    if mode == "block":
        components: tuple[str, ...] = (BLOCK_COMPONENT,)
        present = torch.ones(len(blocks), 1, dtype=torch.bool)
    else:
        ordered: list[str] = []
        for group in spec.groups:
            for name in group.components:
                if name not in ordered:
                    ordered.append(name)
        present = torch.zeros(len(blocks), len(ordered), dtype=torch.bool)
        for ref in blocks:
            for c, name in enumerate(ordered):
                present[ref.index, c] = name in ref.group.components and getattr(ref.module, name, None) is not None
        components = tuple(name for c, name in enumerate(ordered) if bool(present[:, c].any()))
        present = present[:, [ordered.index(name) for name in components]]
    return ModelLayout(spec.class_name, tuple(blocks), components, present)


_SINGLE_STREAM = ("hidden_states",)
_JOINT_STREAM = ("encoder_hidden_states", "hidden_states")

for _spec in (
    ModelSpec(
        "PixArtTransformer2DModel",
        # ada_norm_single blocks: norm1 -> modulation -> attn1; attn2 reads the residual stream; norm2 -> ff
        (BlockGroupSpec("transformer_blocks", ("attn1", "attn2", "ff"), cross_attention=("attn2",),
                        feeders=(("attn1", ("norm1",)), ("ff", ("norm2",)))),),
    ),
    ModelSpec(
        "DiTTransformer2DModel",
        (BlockGroupSpec("transformer_blocks", ("attn1", "attn2", "ff"), cross_attention=("attn2",)),),
    ),
    ModelSpec(
        "SanaTransformer2DModel",
        (BlockGroupSpec("transformer_blocks", ("attn1", "attn2", "ff"), cross_attention=("attn2",),
                        feeders=(("attn1", ("norm1",)), ("ff", ("norm2",)))),),
    ),
    ModelSpec(
        "FluxTransformer2DModel",
        (
            BlockGroupSpec("transformer_blocks", ("attn", "ff", "ff_context"), _JOINT_STREAM),
            BlockGroupSpec("single_transformer_blocks", ("attn", "proj_mlp"), _JOINT_STREAM),
        ),
        timestep_scale=1000.0,
    ),
    ModelSpec(
        "SD3Transformer2DModel",
        (BlockGroupSpec("transformer_blocks", ("attn", "attn2", "ff", "ff_context"), _JOINT_STREAM),),
    ),
    ModelSpec(
        "WanTransformer3DModel",
        (BlockGroupSpec("blocks", ("attn1", "attn2", "ffn"), cross_attention=("attn2",),
                        feeders=(("attn1", ("norm1",)), ("attn2", ("norm2",)), ("ffn", ("norm3",)))),),
    ),
    ModelSpec(
        "CogVideoXTransformer3DModel",
        (BlockGroupSpec("transformer_blocks", ("attn1", "ff"), ("hidden_states", "encoder_hidden_states")),),
    ),
):
    register_model(_spec)
