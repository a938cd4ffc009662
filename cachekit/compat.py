"""Every private diffusers internal cachekit touches, in one place.

cachekit builds on diffusers' public hook API (`HookRegistry`, `ModelHook`); a few things it needs have no public
spelling yet: the `CacheContext` a pipeline sets with `transformer.cache_context(...)` is only delivered to stateful
hooks holding a `StateManager`, the block-list names and attention classes diffusers' caches match on, the names of
their hooks, and a pipeline's progress-bar settings. `check_diffusers()` asserts each of them still exists with the
expected shape, and the test suite runs it, so a diffusers release that moves one fails loudly in one test instead
of silently disabling caching. pyproject pins diffusers to the range that check passes on.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

__all__ = [
    "CacheContextReceiver",
    "CacheContext",
    "set_cache_context",
    "hook_registry",
    "existing_registry",
    "child_registries",
    "stateful_contexts",
    "transformer_block_identifiers",
    "attention_classes",
    "block_registry_has",
    "PEER_HOOK_NAMES",
    "progress_bar_config",
    "flux_pack_latents",
    "flux_unpack_latents",
    "flux_latent_image_ids",
    "sana_negative_embeds",
    "WanStreamingDecoder",
    "check_diffusers",
    "compiled_original",
    "eager_frame",
]

from diffusers.hooks import HookRegistry
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager, _set_cache_context


class CacheContextReceiver(StateManager):
    """Receives the `CacheContext` diffusers pipelines set with `transformer.cache_context(name, step_index=...)`.

    diffusers hands the context only to `StateManager` attributes of stateful hooks; holding one is how a hook
    learns the CFG branch name and the step index the pipeline declares.
    """

    def __init__(self) -> None:
        super().__init__(BaseState)

    @property
    def current(self) -> Any:
        """The context set for the call in progress, or None outside `cache_context`."""
        return self._context


def set_cache_context(module: nn.Module, context: CacheContext | None) -> None:
    """Set (None: clear) the cache context on every stateful hook under `module`, as `cache_context` does."""
    _set_cache_context(module, context)


def hook_registry(module: nn.Module) -> HookRegistry:
    """The module's diffusers hook registry, created if it has none."""
    return HookRegistry.check_if_exists_or_initialize(module)


def existing_registry(module: nn.Module) -> HookRegistry | None:
    """The module's diffusers hook registry if it has one (never creates it)."""
    return getattr(module, "_diffusers_hook", None)


def child_registries(registry: HookRegistry) -> list[HookRegistry]:
    """The registries of the sub-modules under `registry`'s module."""
    return registry._get_child_registries()


def stateful_contexts(module: nn.Module) -> list[Any]:
    """The cache contexts currently set on the stateful diffusers hooks under `module` (None where unset)."""
    registry = hook_registry(module)
    found = []
    for child in (registry, *child_registries(registry)):
        for hook in child.hooks.values():
            if hook._is_stateful:
                found.extend(attr._context for attr in vars(hook).values() if isinstance(attr, StateManager))
    return found


def transformer_block_identifiers() -> tuple[str, ...]:
    """The attribute names diffusers' block caches look for transformer block lists under."""
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    return tuple(_ALL_TRANSFORMER_BLOCK_IDENTIFIERS)


def attention_classes() -> tuple[type, ...]:
    """The module classes diffusers' attention caches (TaylorSeer, FasterCache, PAB) hook."""
    from diffusers.hooks._common import _ATTENTION_CLASSES

    return tuple(_ATTENTION_CLASSES)


def block_registry_has(block_class: type) -> bool:
    """Whether diffusers' `TransformerBlockRegistry` (used by FBCache and MagCache) knows a block class."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    try:
        TransformerBlockRegistry.get(block_class)
    except ValueError:
        return False
    return True


def _peer_hook_names() -> dict[str, tuple[str, ...]]:
    from diffusers.hooks import faster_cache, first_block_cache, mag_cache, pyramid_attention_broadcast
    from diffusers.hooks import taylorseer_cache

    return {
        "fbcache": (first_block_cache._FBC_LEADER_BLOCK_HOOK, first_block_cache._FBC_BLOCK_HOOK),
        "taylorseer": (taylorseer_cache._TAYLORSEER_CACHE_HOOK,),
        "magcache": (mag_cache._MAG_CACHE_LEADER_BLOCK_HOOK, mag_cache._MAG_CACHE_BLOCK_HOOK),
        "fastercache": (faster_cache._FASTER_CACHE_DENOISER_HOOK, faster_cache._FASTER_CACHE_BLOCK_HOOK),
        "pab": (pyramid_attention_broadcast._PYRAMID_ATTENTION_BROADCAST_HOOK,),
    }


class _LazyNames(dict):
    """`PEER_HOOK_NAMES["fbcache"]`: the hook names each diffusers cache registers, read on first use."""

    def __missing__(self, key: str) -> tuple[str, ...]:
        if not super().__len__():
            self.update(_peer_hook_names())
        if key not in self.keys():
            raise KeyError(key)
        return super().__getitem__(key)


PEER_HOOK_NAMES: dict[str, tuple[str, ...]] = _LazyNames()


def progress_bar_config(pipe: Any) -> dict[str, Any]:
    """The progress-bar settings a pipeline was given with `set_progress_bar_config` ({} if none)."""
    return dict(getattr(pipe, "_progress_bar_config", None) or {})


def flux_pack_latents(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents as FLUX's 2x2-patch token sequence (`FluxPipeline._pack_latents`)."""
    rows, channels, height, width = latents.shape
    return pipe._pack_latents(latents, rows, channels, height, width)


def flux_unpack_latents(pipe: Any, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """FLUX's token sequence back to (B, C, H, W) latents of an image of `height` x `width` pixels."""
    return pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)


def flux_latent_image_ids(pipe: Any, rows: int, height: int, width: int, device: torch.device,
                          dtype: torch.dtype) -> torch.Tensor:
    """FLUX's positional ids of the packed latent tokens (`FluxPipeline._prepare_latent_image_ids`)."""
    return pipe._prepare_latent_image_ids(rows, height, width, device, dtype)


def sana_negative_embeds(pipe: Any, texts: list[str], *, clean_caption: bool,
                         max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sana's embeddings and mask of negative prompts, as `encode_prompt` makes them: no complex human
    instruction (`SanaPipeline._get_gemma_prompt_embeds`; the public call applies it to positives only)."""
    return pipe._get_gemma_prompt_embeds(texts, device=execution_device(pipe), dtype=pipe.text_encoder.dtype,
                                         clean_caption=clean_caption, max_sequence_length=max_sequence_length,
                                         complex_human_instruction=False)


class WanStreamingDecoder:
    """Decode a Wan video's latent frames one chunk at a time, keeping the VAE's causal feature cache between chunks.

    `AutoencoderKLWan._decode` already decodes latent frame by latent frame, but it keeps the causal convolutions'
    feature cache in the VAE's own `_feat_map` and clears it on every `decode` call, so a stream cannot decode its
    frames as they finish. This decoder holds its own cache list (one per stream: streams and whole-clip decodes
    on the same VAE never share one) and calls the decoder as `_decode` does (`post_quant_conv`, the decoder with
    `feat_cache` / `feat_idx` / `first_chunk`, unpatchify, clamp), so the frames it gives are the frames a
    whole-clip `vae.decode` gives, to float rounding (`tests/test_video_streams.py` checks it).

    Latents are the VAE's (already de-normalised with `latents_mean` / `latents_std`); the clip's first latent frame
    gives one pixel frame, every later one 4 (Wan's 1 + 4 + 4 ...), whichever chunk it comes in.
    The cache holds two frames of features per causal convolution, so a stream of any length takes bounded memory.
    """

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        self._cache: list[Any] | None = [None] * vae._cached_conv_counts["decoder"]
        self._first = True
        self.latent_frames = 0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], `[B, C, F, H, W]`, of the next latent frames `[B, z, T, h, w]` of the clip."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        if self._cache is None:
            raise RuntimeError("this streaming decoder was closed")
        vae = self.vae
        x = vae.post_quant_conv(latents)
        outs = []
        for i in range(x.shape[2]):
            outs.append(vae.decoder(x[:, :, i : i + 1], feat_cache=self._cache, feat_idx=[0],
                                    first_chunk=self._first))
            self._first = False
            self.latent_frames += 1
        out = torch.cat(outs, 2)
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return torch.clamp(out, min=-1.0, max=1.0)

    def close(self) -> None:
        """Free the feature cache (what a closed stream gives back)."""
        self._cache = None

    @property
    def cached_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._cache or () if isinstance(t, torch.Tensor))


def _check_wan_vae(expect: Any) -> None:
    """What `WanStreamingDecoder` relies on: `_cached_conv_counts`, the decoder's cache arguments, `unpatchify`,
    and `_decode`'s frame-by-frame loop (its source still names `_feat_map` and `first_chunk`)."""
    from diffusers import AutoencoderKLWan
    from diffusers.models.autoencoders import autoencoder_kl_wan as wan

    expect(callable(getattr(wan, "unpatchify", None)), "autoencoder_kl_wan.unpatchify")
    parameters = set(inspect.signature(wan.WanDecoder3d.forward).parameters)
    expect({"feat_cache", "feat_idx", "first_chunk"} <= parameters,
           "WanDecoder3d.forward(x, feat_cache, feat_idx, first_chunk)")
    source = inspect.getsource(AutoencoderKLWan)
    expect("_cached_conv_counts" in source and "post_quant_conv" in source,
           "AutoencoderKLWan._cached_conv_counts / post_quant_conv")
    decode = inspect.getsource(AutoencoderKLWan._decode)
    expect("_feat_map" in decode and "first_chunk=True" in decode and "clamp" in decode,
           "AutoencoderKLWan._decode decodes frame by frame with _feat_map, first_chunk and a clamp")


def check_diffusers() -> list[str]:
    """What of the above no longer matches the installed diffusers (an empty list: everything does)."""
    problems: list[str] = []

    def expect(condition: bool, what: str) -> None:
        if not condition:
            problems.append(what)

    receiver = CacheContextReceiver()
    expect(hasattr(receiver, "_context") and receiver.current is None, "StateManager._context")
    expect(callable(getattr(HookRegistry, "_get_child_registries", None)), "HookRegistry._get_child_registries")
    expect("context" in inspect.signature(_set_cache_context).parameters, "hooks._set_cache_context(module, context)")
    expect({"name", "step_index", "num_inference_steps"} <= set(inspect.signature(CacheContext).parameters),
           "CacheContext(name, step_index, num_inference_steps)")
    try:
        expect(bool(transformer_block_identifiers()), "_common._ALL_TRANSFORMER_BLOCK_IDENTIFIERS")
        expect(bool(attention_classes()), "_common._ATTENTION_CLASSES")
    except ImportError as err:
        problems.append(f"diffusers.hooks._common: {err}")
    try:
        from diffusers.models.attention import BasicTransformerBlock

        expect(block_registry_has(BasicTransformerBlock), "_helpers.TransformerBlockRegistry knows BasicTransformerBlock")
    except ImportError as err:
        problems.append(f"diffusers.hooks._helpers: {err}")
    try:
        names = _peer_hook_names()
        expect(all(all(isinstance(n, str) and n for n in v) for v in names.values()), "peer hook names")
    except (ImportError, AttributeError) as err:
        problems.append(f"peer hook names: {err}")
    from diffusers import DiffusionPipeline

    expect(hasattr(DiffusionPipeline, "set_progress_bar_config"), "DiffusionPipeline.set_progress_bar_config")
    from diffusers import FluxPipeline, SanaPipeline

    for name in ("_pack_latents", "_unpack_latents", "_prepare_latent_image_ids"):
        expect(callable(getattr(FluxPipeline, name, None)), f"FluxPipeline.{name}")
    gemma = getattr(SanaPipeline, "_get_gemma_prompt_embeds", None)
    expect(gemma is not None and "complex_human_instruction" in inspect.signature(gemma).parameters,
           "SanaPipeline._get_gemma_prompt_embeds(..., complex_human_instruction)")
    from diffusers.hooks import ModelHook
    from diffusers.hooks.hooks import HookFunctionReference

    expect(hasattr(ModelHook, "reset_state"), "ModelHook.reset_state")
    expect("original_forward" in vars(HookFunctionReference()), "HookFunctionReference.original_forward")
    try:
        _check_wan_vae(expect)
    except (ImportError, AttributeError, OSError, TypeError) as err:
        problems.append(f"AutoencoderKLWan internals: {err}")
    return problems


def execution_device(pipe: Any) -> torch.device:
    """The device a pipeline runs its models on (diffusers' private `_execution_device`, offloading-aware)."""
    device = getattr(pipe, "_execution_device", None)
    return torch.device(device) if device is not None else next(pipe.transformer.parameters()).device


def compiled_original(module: Any) -> Any:
    """The module inside `torch.compile(module)`'s wrapper (torch's `OptimizedModule._orig_mod`), else `module`.

    `torch.compile(transformer)` returns a wrapper around the same instance; cachekit's hooks go on the instance,
    which the compiled wrapper calls, so enabling through the wrapper and through the instance is the same.
    """
    from torch._dynamo.eval_frame import OptimizedModule

    while isinstance(module, OptimizedModule):
        module = module._orig_mod
    return module


def eager_frame(fn: Any) -> Any:
    """`torch.compiler.disable(fn, recursive=False)`: dynamo breaks the graph at a call of `fn` and runs `fn`'s own
    frame in eager Python, while what `fn` calls is still compiled.

    The code of `fn` is also marked skipped in dynamo's frame callback (torch's private `skip_code`): without it,
    torch 2.14 hands the frame to dynamo's frame conversion on every call, which costs a conversion per hooked
    module call (measured: more than the whole uncached block on the digits model).
    """
    from torch._dynamo.eval_frame import skip_code

    skip_code(fn.__code__)
    return torch.compiler.disable(fn, recursive=False)
