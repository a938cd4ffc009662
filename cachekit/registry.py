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
    "COVERAGE_SPECS",
    "NOT_SUPPORTED",
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
        feeders_broadcast: the block only scales and shifts a feeder's output by per-row modulation (one value per
            row and channel) before the component reads it, so a skipped feeder may return one token per row: the
            modulation in front of a reused component then runs on one token instead of all of them. False where
            the block reshapes that output by token count (Sana unflattens it into an image for its conv FFN).
    """

    attr: str
    components: tuple[str, ...]
    residual_outputs: tuple[str, ...] = ("hidden_states",)
    cross_attention: tuple[str, ...] = ()
    feeders: tuple[tuple[str, tuple[str, ...]], ...] = ()
    feeders_broadcast: bool = False

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

_FLUX_DOUBLE = ("attn", "ff", "ff_context")
_FLUX_SINGLE = ("attn", "proj_mlp")
_HIDDEN_FIRST = ("hidden_states", "encoder_hidden_states")
_WAN_COMPONENTS = ("attn1", "attn2", "ffn")
_WAN_FEEDERS = (("attn1", ("norm1",)), ("attn2", ("norm2",)), ("ffn", ("norm3",)))
_CROSS_DIT = ("attn1", "attn2", "ff")


def _flux_like(name: str, single_outputs: tuple[str, ...] = _JOINT_STREAM, *, double_outputs: tuple[str, ...] =
               _JOINT_STREAM, timestep_scale: float = 1.0) -> ModelSpec:
    """A FLUX-shaped model: double-stream blocks (both streams' attention and feed-forwards), then single-stream
    blocks (their attention and MLP input projection)."""
    return ModelSpec(name, (BlockGroupSpec("transformer_blocks", _FLUX_DOUBLE, double_outputs),
                            BlockGroupSpec("single_transformer_blocks", _FLUX_SINGLE, single_outputs)),
                     timestep_scale=timestep_scale)


def _wan_like(name: str, *, feeders: bool = False) -> ModelSpec:
    """A Wan-shaped model: self-attention, text cross-attention and feed-forward per block."""
    return ModelSpec(name, (BlockGroupSpec("blocks", _WAN_COMPONENTS, cross_attention=("attn2",),
                                           feeders=_WAN_FEEDERS if feeders else (), feeders_broadcast=feeders),))


def _cross_dit(name: str, attr: str = "transformer_blocks") -> ModelSpec:
    """A PixArt-shaped model: self-attention, text cross-attention, feed-forward."""
    return ModelSpec(name, (BlockGroupSpec(attr, _CROSS_DIT, cross_attention=("attn2",)),))


for _spec in (
    ModelSpec(
        "PixArtTransformer2DModel",
        # ada_norm_single blocks: norm1 -> modulation -> attn1; attn2 reads the residual stream; norm2 -> ff
        (BlockGroupSpec("transformer_blocks", ("attn1", "attn2", "ff"), cross_attention=("attn2",),
                        feeders=(("attn1", ("norm1",)), ("ff", ("norm2",))), feeders_broadcast=True),),
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
    _flux_like("FluxTransformer2DModel", timestep_scale=1000.0),
    ModelSpec(
        "SD3Transformer2DModel",
        (BlockGroupSpec("transformer_blocks", ("attn", "attn2", "ff", "ff_context"), _JOINT_STREAM),),
    ),
    _wan_like("WanTransformer3DModel", feeders=True),
    ModelSpec(
        "CogVideoXTransformer3DModel",
        (BlockGroupSpec("transformer_blocks", ("attn1", "ff"), ("hidden_states", "encoder_hidden_states")),),
    ),
):
    register_model(_spec)


# ------------------------------------------------------------------------------------------------ model coverage
# The families beyond the seven above (issue 15). Each entry is data read off the diffusers block's forward: which
# sub-modules it gates into its residual stream, and which of its arguments each element of its output updates.
# `cachekit models` and docs/models.md list every transformer class of the installed diffusers against these.
COVERAGE_SPECS: tuple[ModelSpec, ...] = (
    # double + single stream (FLUX family and its descendants)
    _flux_like("ChromaTransformer2DModel", ("hidden_states",), timestep_scale=1000.0),
    _flux_like("BriaTransformer2DModel"),
    _flux_like("LongCatImageTransformer2DModel", timestep_scale=1000.0),
    _flux_like("OvisImageTransformer2DModel", timestep_scale=1000.0),
    _flux_like("HunyuanVideoTransformer3DModel", _HIDDEN_FIRST, double_outputs=_HIDDEN_FIRST),
    _flux_like("HunyuanImageTransformer2DModel", _HIDDEN_FIRST, double_outputs=_HIDDEN_FIRST),
    _flux_like("MotifVideoTransformer3DModel", _HIDDEN_FIRST, double_outputs=_HIDDEN_FIRST),
    ModelSpec("Flux2Transformer2DModel", (
        BlockGroupSpec("transformer_blocks", _FLUX_DOUBLE, _JOINT_STREAM),
        BlockGroupSpec("single_transformer_blocks", ("attn",)),  # one fused attention + MLP module
    ), timestep_scale=1000.0),
    ModelSpec("HunyuanVideo15Transformer3DModel", (BlockGroupSpec("transformer_blocks", _FLUX_DOUBLE, _HIDDEN_FIRST),)),
    ModelSpec("AuraFlowTransformer2DModel", (
        BlockGroupSpec("joint_transformer_blocks", _FLUX_DOUBLE, _JOINT_STREAM),
        BlockGroupSpec("single_transformer_blocks", ("attn", "ff")),
    ), timestep_scale=1000.0),
    # self-attention + cross-attention + feed-forward (Wan family)
    _wan_like("SkyReelsV2Transformer3DModel"),
    _wan_like("ChronoEditTransformer3DModel", feeders=True),
    _wan_like("WanVACETransformer3DModel", feeders=True),  # the VACE hint blocks run live
    ModelSpec("HeliosTransformer3DModel", _wan_like("HeliosTransformer3DModel").groups,
              unbatched_args=frozenset()),  # its rotary embedding has a batch dimension
    # self-attention + cross-attention + feed-forward (PixArt family)
    _cross_dit("AllegroTransformer3DModel"),
    ModelSpec("LTXVideoTransformer3DModel", _cross_dit("LTXVideoTransformer3DModel").groups,
              unbatched_args=frozenset()),  # its rotary embedding has a batch dimension
    _cross_dit("SanaVideoTransformer3DModel"),
    _cross_dit("Transformer2DModel"),
    # one list of joint text + image blocks, one attention and one feed-forward for both streams
    ModelSpec("CogView3PlusTransformer2DModel", (BlockGroupSpec("transformer_blocks", ("attn1", "ff"), _HIDDEN_FIRST),)),
    # CogView4 and GLM-Image run their one `ff` twice per block (image rows, then text rows), so it runs live: a
    # component is one call per block forward
    ModelSpec("CogView4Transformer2DModel", (BlockGroupSpec("transformer_blocks", ("attn1",), _HIDDEN_FIRST),)),
    ModelSpec("GlmImageTransformer2DModel", (BlockGroupSpec("transformer_blocks", ("attn1",), _HIDDEN_FIRST),)),
    ModelSpec("ConsisIDTransformer3DModel", (BlockGroupSpec("transformer_blocks", ("attn1", "ff"), _HIDDEN_FIRST),)),
    # joint attention, a feed-forward per stream
    ModelSpec("QwenImageTransformer2DModel", (BlockGroupSpec("transformer_blocks", ("attn", "img_mlp", "txt_mlp"),
                                                             _JOINT_STREAM),), timestep_scale=1000.0),
    ModelSpec("JoyImageEditTransformer3DModel", (BlockGroupSpec("double_blocks", ("attn", "img_mlp", "txt_mlp"),
                                                                _HIDDEN_FIRST),)),
    ModelSpec("NucleusMoEImageTransformer2DModel", (BlockGroupSpec("transformer_blocks", ("attn", "img_mlp")),),
              timestep_scale=1000.0),
    ModelSpec("EasyAnimateTransformer3DModel", (BlockGroupSpec("transformer_blocks", ("attn1", "ff", "txt_ff"),
                                                               _HIDDEN_FIRST),)),
    # more double + single stream
    _flux_like("BriaFiboTransformer2DModel", ("hidden_states",)),
    _flux_like("HunyuanVideoFramepackTransformer3DModel", _HIDDEN_FIRST, double_outputs=_HIDDEN_FIRST),
    # FLUX.3: the per-mode blocks (text, image, image condition) run live, as the image ones sit in a ModuleDict; the
    # joint single-stream blocks, most of the depth, are cached. No stock pipeline yet: the scale is FLUX.2's.
    ModelSpec("Flux3Transformer2DModel", (BlockGroupSpec("single_transformer_blocks", ("attn", "ff"), _JOINT_STREAM),),
              timestep_scale=1000.0),
    # one stream over [text, image] tokens: attention and feed-forward
    ModelSpec("Krea2Transformer2DModel", (BlockGroupSpec("transformer_blocks", ("attn", "ff")),), timestep_scale=1000.0),
    # PRX's MLP is three linears in the block itself; its output projection `down_proj` is the MLP's output
    ModelSpec("PRXTransformer2DModel", (BlockGroupSpec("blocks", ("attention", "down_proj")),), timestep_scale=1000.0,
              unbatched_args=frozenset()),  # its rotary embedding has a batch dimension
    # self-attention + cross-attention + feed-forward, U-ViT skips between blocks (HunyuanDiT)
    _cross_dit("HunyuanDiT2DModel", "blocks"),
    # the unCLIP prior (Kandinsky 2.x, Shap-E): denoises a CLIP image embedding
    ModelSpec("PriorTransformer", (BlockGroupSpec("transformer_blocks", ("attn1", "ff")),)),
)

for _spec in COVERAGE_SPECS:
    register_model(_spec)

NOT_SUPPORTED: dict[str, str] = {
    # Why each transformer class of diffusers 0.42 that has no entry above has none. `cachekit models` lists every
    # class of the installed diffusers as supported (an entry) or not (a reason here); the coverage test fails on a
    # class that is in neither, so a new diffusers class is a decision, not a silent gap.
    "AceStepTransformer1DModel": "audio-only (music generation)",
    "AnyFlowFARTransformer3DModel": "frame-autoregressive: keeps its own KV cache across calls over chunks of frames",
    "AnyFlowTransformer3DModel": "takes one timestep per frame (batch, frames) plus a delta timestep; not yet covered",
    "BriaFibo2Transformer2DModel": "not yet covered: needs its gist/perceiver text inputs in a tiny config",
    "Cosmos3OmniTransformer": "packed multimodal language model (token ids, vision/sound/action token packing)",
    "CosmosTransformer3DModel": "its pipelines pass the noise level sigma / (sigma + 1), not a scheduler timestep; step "
                                "tracking maps timesteps by a scale",
    "DreamLiteTransformer2DModel": "a transformer layer inside a UNet (continuous input), not a stand-alone denoiser",
    "ErnieImageTransformer2DModel": "its blocks run sequence-first (tokens, batch, channels): per-row state slices the "
                                    "batch on dimension 0",
    "HiDreamImageTransformer2DModel": "not yet covered: its forward names the timestep `timesteps` and takes Llama "
                                      "hidden states of every layer",
    "Ideogram4Transformer2DModel": "its pipeline passes a reversed timestep (1 - t / 1000); step tracking maps "
                                   "timesteps by a scale",
    "JoyImageEditPlusTransformer3DModel": "not yet covered: patchified multi-image input with per-sample shape lists",
    "Kandinsky5Transformer3DModel": "its forward has no batch dimension (one sample per call)",
    "Kandinsky6SRTransformer3DModel": "super-resolution stage: its input stacks the low-resolution condition, no batch "
                                      "dimension; not yet covered",
    "Kandinsky6Transformer3DModel": "joint audio-video: fused blocks over two latent streams",
    "LTX2VideoTransformer3DModel": "joint audio-video: a second (audio) latent stream through every block; not yet "
                                   "covered",
    "LatteTransformer3DModel": "its spatial and temporal blocks fold frames or tokens into the batch dimension: "
                               "per-row state cannot follow a request",
    "LongCatAudioDiTTransformer": "audio-only",
    "Lumina2Transformer2DModel": "its pipeline passes a reversed timestep (1 - t / 1000); step tracking maps "
                                 "timesteps by a scale",
    "LuminaNextDiT2DModel": "its pipeline passes a reversed timestep (1 - t / 1000); step tracking maps timesteps by "
                            "a scale",
    "MiniMaxH3Transformer3DModel": "joint audio-video token packing",
    "MiniMaxMusic3RVQDepthDecoder": "audio-codec token decoder, not a denoiser",
    "MiniMaxMusic3Transformer1DModel": "audio-only (music generation)",
    "MochiTransformer3DModel": "its pipeline passes a reversed timestep (1000 - t); step tracking maps timesteps by a "
                               "scale",
    "OmniGenTransformer2DModel": "not yet covered: language-model input (token ids, image latent lists, position ids)",
    "QwenImage21Transformer2DModel": "lays out one token sequence for the whole batch from its first row: rows of "
                                     "different requests cannot compute apart",
    "RFD4ProteinaTransformer": "protein structure generation, not images or video",
    "SanaWMLTX2RefinerTransformer3DModel": "joint audio-video refiner (LTX-2 layout)",
    "SanaWMTransformer3DModel": "not yet covered: camera-controlled world model with chunked camera inputs",
    "StableAudio3DiTModel": "audio-only",
    "StableAudioDiTModel": "audio-only",
    "T5FilmDecoder": "audio-only (spectrogram decoder)",
    "TransformerTemporalModel": "a temporal layer inside a video UNet, not a stand-alone denoiser",
    "WanAnimate2Transformer3DModel": "list-of-samples input with a KV cache across calls",
    "WanAnimateTransformer3DModel": "not yet covered: pose and face-video inputs, input channels differ from output",
    "ZImageTransformer2DModel": "its pipeline passes a reversed timestep ((1000 - t) / 1000); step tracking maps "
                                "timesteps by a scale",
}
