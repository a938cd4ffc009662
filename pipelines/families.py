"""What the runner must know about a pipeline family to take its denoising loop apart, one adapter per family.

The runner serves many requests at different steps in one transformer forward, so it cannot call the pipeline's
`__call__`; it runs the same pieces the stock loop runs, row by row: the pipeline's own `encode_prompt`,
`prepare_latents`, scheduler and VAE. An adapter says how those pieces fit for one family (which inputs the
transformer takes, how CFG rows are laid out, how the output is split). Families are registered by pipeline class
name; a pipeline with no adapter gets a one-line error naming those that have one.

Shipped: PixArt-Alpha/Sigma, Stable Diffusion 3 (`StableDiffusion3Pipeline`), Sana (`SanaPipeline`), FLUX.1
(`FluxPipeline`, guidance-distilled: one row per request, `cfg_rows = False`) and Wan (`WanPipeline`: a request is
a whole clip; video streams need `supports_video_streams`). A new adapter subclasses `StockFamily` (DDPM-style
defaults) and overrides what differs; image streams need `supports_streams` (PixArt only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from cachekit.compat import (flux_latent_image_ids, flux_pack_latents, flux_unpack_latents,
                             sana_negative_embeds)
from cachekit.errors import UsageError

__all__ = ["TextConditioning", "PipelineFamily", "StockFamily", "PixArtFamily", "StableDiffusion3Family", "SanaFamily",
           "FluxFamily", "WanFamily",
           "fresh_scheduler", "stock_default", "register_family", "family_of", "family_names"]


@dataclasses.dataclass(frozen=True)
class TextConditioning:
    """One text's embeddings as the transformer takes them (batch dimension 1)."""

    embeds: torch.Tensor
    mask: torch.Tensor | None
    pooled: torch.Tensor | None = None  # a pooled text embedding (SD3's, FLUX's `pooled_projections`)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.embeds, self.mask, self.pooled) if t is not None)


class PipelineFamily(Protocol):
    """The pieces of a family's denoising loop, each working on rows of any number of requests."""

    name: str

    def settings(self, pipe: Any, overrides: dict[str, Any]) -> dict[str, Any]:
        """Resolution and text settings of a request (the model's call defaults under the caller's)."""

    def call_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The stock pipeline call arguments that give these settings (for a solo call or a cost profile)."""

    def group_key(self, settings: dict[str, Any]) -> tuple:
        """Requests with equal keys can share a forward (same latent shape and text length)."""

    def text_key(self, settings: dict[str, Any]) -> tuple:
        """The settings that change a text's embeddings (the prompt LRU's key, besides the text)."""

    def encode(self, pipe: Any, texts: Sequence[str], settings: dict[str, Any], device: torch.device,
               negative: bool = False) -> list[TextConditioning]:
        """Embeddings of distinct texts, in one text-encoder call. `negative=True` (asked only of a family with
        `negatives_apart`) encodes them as the stock call encodes negative prompts."""

    def initial_latents(self, pipe: Any, generators: Sequence[torch.Generator], settings: dict[str, Any],
                        device: torch.device) -> torch.Tensor:
        """The starting noise of one request per generator, in one call: row i exactly as the stock pipeline draws
        it for a batch of one from generator i (diffusers draws a generator list row by row). On `device`, the
        pipeline's execution device, which the caller resolves once: diffusers walks every module to find it, and
        reads the dtype by walking parameters, so a call per request cost milliseconds each."""

    def scheduler(self, pipe: Any, num_steps: int, settings: dict[str, Any], device: torch.device) -> Any:
        """A request's own scheduler, its timesteps set as the stock call sets them (shift `mu`, sigmas)."""

    def extra_step_kwargs(self, pipe: Any, generator: torch.Generator) -> dict[str, Any]:
        """What the stock loop passes to `scheduler.step` besides the prediction, timestep and latents."""

    def model_input(self, scheduler: Any, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The transformer's input rows for latents at timestep t (the scheduler's input scaling, if any)."""

    def forward(self, pipe: Any, latents: torch.Tensor, timesteps: torch.Tensor,
                texts: Sequence[TextConditioning], settings: dict[str, Any]) -> torch.Tensor:
        """The transformer's prediction for every row (learned-sigma channels dropped). A family with
        `cfg_rows = False` also takes `guidance`, every row's guidance scale (None: the stock default)."""

    def x0(self, scheduler: Any, latents: torch.Tensor, prediction: torch.Tensor,
           t: torch.Tensor) -> torch.Tensor | None:
        """The clean-image estimate after a step (`latents` already stepped, `prediction` guided); None if unknown."""

    def decode(self, pipe: Any, latents: torch.Tensor) -> list[Any]:
        """Finished latents of any number of requests to PIL images, in one VAE call."""


def stock_default(pipe: Any, name: str, fallback: Any) -> Any:
    """The default of one of the pipeline's `__call__` arguments (the stock call's, e.g. its guidance scale)."""
    import inspect

    try:
        parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    except (TypeError, ValueError):
        return fallback
    if parameter is None or parameter.default is inspect.Parameter.empty or parameter.default is None:
        return fallback
    return parameter.default


def fresh_scheduler(scheduler: Any, num_steps: int, device: torch.device, **set_timesteps: Any) -> Any:
    """A request's own scheduler: the pipeline's configuration, its own step state."""
    own = type(scheduler).from_config(scheduler.config)
    own.set_timesteps(num_steps, device=device, **set_timesteps)
    if hasattr(own, "set_begin_index"):
        own.set_begin_index(0)
    return own


class StockFamily:
    """Defaults for an adapter: settings with height, width and max_sequence_length (requests share a forward when
    all three match), a noise-prediction (DDPM-style) scheduler, no step kwargs, no image streams."""

    name = "stock"
    supports_streams = False  # `Runner.open_stream` needs a DDPM-style scheduler (alphas_cumprod)
    supports_video_streams = False  # `Runner.open_video_stream` needs per-frame noise levels (a video family)
    negatives_apart = False  # True: the stock call encodes a negative prompt differently from the same positive one
    cfg_rows = True  # False: guidance-distilled, one row per request, its scale passed to `forward(guidance=...)`

    def call_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        return dict(settings)

    def group_key(self, settings: dict[str, Any]) -> tuple:
        return (settings["height"], settings["width"], settings["max_sequence_length"])

    def text_key(self, settings: dict[str, Any]) -> tuple:
        return (settings["max_sequence_length"],)

    def scheduler(self, pipe: Any, num_steps: int, settings: dict[str, Any], device: torch.device) -> Any:
        return fresh_scheduler(pipe.scheduler, num_steps, device)

    def extra_step_kwargs(self, pipe: Any, generator: torch.Generator) -> dict[str, Any]:
        return {}

    def model_input(self, scheduler: Any, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale = getattr(scheduler, "scale_model_input", None)
        return latents if scale is None else scale(latents, t)

    def x0(self, scheduler: Any, latents: torch.Tensor, prediction: torch.Tensor,
           t: torch.Tensor) -> torch.Tensor | None:
        alphas = getattr(scheduler, "alphas_cumprod", None)
        if alphas is None:
            return None
        a = alphas[int(t)].to(prediction.device, prediction.dtype)
        return (latents - (1 - a).sqrt() * prediction) / a.sqrt()


class _FlowMatching:
    """Flow-matching pieces (FlowMatchEulerDiscreteScheduler): the stock call's shift `mu`, x0 = x - sigma * v."""

    def scheduler(self, pipe: Any, num_steps: int, settings: dict[str, Any], device: torch.device) -> Any:
        config = pipe.scheduler.config
        kwargs = {}
        if config.get("use_dynamic_shifting", None):
            kwargs["mu"] = self.shift_mu(pipe, settings)
        return fresh_scheduler(pipe.scheduler, num_steps, device, **kwargs)

    def image_seq_len(self, pipe: Any, settings: dict[str, Any]) -> int:
        patch = pipe.transformer.config.patch_size
        scale = pipe.vae_scale_factor
        return (settings["height"] // scale // patch) * (settings["width"] // scale // patch)

    default_max_shift = 1.16  # what the stock call assumes when the scheduler config has none

    def shift_mu(self, pipe: Any, settings: dict[str, Any]) -> float:
        config = pipe.scheduler.config
        base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", self.default_max_shift)
        m = (max_shift - base_shift) / (max_len - base_len)
        return self.image_seq_len(pipe, settings) * m + (base_shift - m * base_len)

    def x0(self, scheduler: Any, latents: torch.Tensor, prediction: torch.Tensor,
           t: torch.Tensor) -> torch.Tensor | None:
        sigmas, index = getattr(scheduler, "sigmas", None), getattr(scheduler, "step_index", None)
        if sigmas is None or index is None:
            return None
        sigma = sigmas[index].to(prediction.device, prediction.dtype)  # the stepped latents' sigma
        return latents - sigma * prediction


def _resolution(pipe: Any, merged: dict[str, Any], default_size: int, factor: int | None = None) -> tuple[int, int]:
    """The requested size (the default where none is given), checked against the family's size `factor`
    (default: the VAE's scale times the transformer's patch)."""
    height = int(merged.get("height") or default_size)
    width = int(merged.get("width") or default_size)
    factor = factor or pipe.vae_scale_factor * pipe.transformer.config.patch_size
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise UsageError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
    return height, width


class PixArtFamily(StockFamily):
    """PixArt-Alpha and PixArt-Sigma (and the bundled digits model, a tiny PixArt-Alpha)."""

    name = "pixart"
    supports_streams = True
    _TEXT_SETTINGS = ("max_sequence_length", "clean_caption")

    def settings(self, pipe: Any, overrides: dict[str, Any]) -> dict[str, Any]:
        from .call import model_call_defaults

        merged = {**model_call_defaults(pipe), **overrides}
        height, width = _resolution(pipe, merged, pipe.transformer.config.sample_size * pipe.vae_scale_factor)
        return {"height": height, "width": width,
                "max_sequence_length": int(merged.get("max_sequence_length", 120)),
                "clean_caption": bool(merged.get("clean_caption", False))}

    def call_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        # the runner serves exactly the requested size: resolution binning would resize it
        return {**settings, "use_resolution_binning": False}

    def text_key(self, settings: dict[str, Any]) -> tuple:
        return (settings["max_sequence_length"], settings["clean_caption"])

    def extra_step_kwargs(self, pipe: Any, generator: torch.Generator) -> dict[str, Any]:
        return pipe.prepare_extra_step_kwargs(generator, 0.0)

    def encode(self, pipe: Any, texts: Sequence[str], settings: dict[str, Any],
               device: torch.device) -> list[TextConditioning]:
        embeds, mask, _, _ = pipe.encode_prompt(
            list(texts), do_classifier_free_guidance=False, device=device,
            clean_caption=settings["clean_caption"], max_sequence_length=settings["max_sequence_length"])
        return [TextConditioning(embeds[i : i + 1], mask[i : i + 1]) for i in range(len(texts))]

    def initial_latents(self, pipe: Any, generators: Sequence[torch.Generator], settings: dict[str, Any],
                        device: torch.device) -> torch.Tensor:
        return pipe.prepare_latents(len(generators), pipe.transformer.config.in_channels, settings["height"],
                                    settings["width"], pipe.transformer.dtype, device, list(generators))

    def forward(self, pipe: Any, latents: torch.Tensor, timesteps: torch.Tensor,
                texts: Sequence[TextConditioning], settings: dict[str, Any]) -> torch.Tensor:
        transformer = pipe.transformer
        rows = latents.shape[0]
        added = {"resolution": None, "aspect_ratio": None}
        if transformer.config.sample_size == 128:  # PixArt-Alpha 1024's micro-conditions, as the stock loop adds them
            dtype, device = texts[0].embeds.dtype, latents.device
            added = {"resolution": torch.tensor([settings["height"], settings["width"]], dtype=dtype,
                                                device=device).repeat(rows, 1),
                     "aspect_ratio": torch.tensor([settings["height"] / settings["width"]], dtype=dtype,
                                                  device=device).repeat(rows, 1)}
        prediction = transformer(
            latents, encoder_hidden_states=torch.cat([t.embeds for t in texts]),
            encoder_attention_mask=torch.cat([t.mask for t in texts]), timestep=timesteps.to(latents.device),
            added_cond_kwargs=added, return_dict=False)[0]
        if transformer.config.out_channels // 2 == transformer.config.in_channels:  # learned sigma
            prediction = prediction.chunk(2, dim=1)[0]
        return prediction

    def decode(self, pipe: Any, latents: torch.Tensor) -> list[Any]:
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(images, output_type="pil")


class StableDiffusion3Family(_FlowMatching, StockFamily):
    """Stable Diffusion 3 and 3.5 (`StableDiffusion3Pipeline`): two CLIP encoders and T5 (or its zeros when the
    pipeline has no `text_encoder_3`), pooled projections, flow matching, CFG as two rows."""

    name = "sd3"

    def settings(self, pipe: Any, overrides: dict[str, Any]) -> dict[str, Any]:
        from .call import model_call_defaults

        merged = {**model_call_defaults(pipe), **overrides}
        height, width = _resolution(pipe, merged, pipe.default_sample_size * pipe.vae_scale_factor)
        return {"height": height, "width": width, "max_sequence_length": int(merged.get("max_sequence_length", 256))}

    def encode(self, pipe: Any, texts: Sequence[str], settings: dict[str, Any],
               device: torch.device) -> list[TextConditioning]:
        # a negative prompt is encoded like a positive one in the stock call (clip_skip None)
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=list(texts), prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            device=device, max_sequence_length=settings["max_sequence_length"])
        return [TextConditioning(embeds[i : i + 1], None, pooled[i : i + 1]) for i in range(len(texts))]

    def initial_latents(self, pipe: Any, generators: Sequence[torch.Generator], settings: dict[str, Any],
                        device: torch.device) -> torch.Tensor:
        encoder = pipe.text_encoder if pipe.text_encoder is not None else pipe.transformer
        return pipe.prepare_latents(len(generators), pipe.transformer.config.in_channels, settings["height"],
                                    settings["width"], encoder.dtype, device, list(generators))

    def forward(self, pipe: Any, latents: torch.Tensor, timesteps: torch.Tensor,
                texts: Sequence[TextConditioning], settings: dict[str, Any]) -> torch.Tensor:
        return pipe.transformer(
            hidden_states=latents, timestep=timesteps.to(latents.device),
            encoder_hidden_states=torch.cat([t.embeds for t in texts]),
            pooled_projections=torch.cat([t.pooled for t in texts]), return_dict=False)[0]

    def decode(self, pipe: Any, latents: torch.Tensor) -> list[Any]:
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        images = pipe.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(images, output_type="pil")


class SanaFamily(_FlowMatching, StockFamily):
    """Sana (`SanaPipeline`): Gemma2 text embeddings with a mask, the complex human instruction before positive
    prompts only (negatives are encoded without it), a flow-prediction scheduler, timestep_scale, CFG as two rows."""

    name = "sana"
    negatives_apart = True

    @staticmethod
    def _stock_instruction(pipe: Any) -> tuple[str, ...]:
        default = stock_default(pipe, "complex_human_instruction", ())
        return tuple(default) if isinstance(default, (list, tuple)) else ()

    def settings(self, pipe: Any, overrides: dict[str, Any]) -> dict[str, Any]:
        import math

        from .call import model_call_defaults

        merged = {**model_call_defaults(pipe), **overrides}
        factor = math.lcm(32, pipe.vae_scale_factor * pipe.transformer.config.patch_size)  # SanaPipeline wants 32
        height, width = _resolution(pipe, merged, pipe.transformer.config.sample_size * pipe.vae_scale_factor, factor)
        instruction = merged.get("complex_human_instruction", self._stock_instruction(pipe))
        return {"height": height, "width": width,
                "max_sequence_length": int(merged.get("max_sequence_length", 300)),
                "clean_caption": bool(merged.get("clean_caption", False)),
                "complex_human_instruction": tuple(instruction or ())}

    def call_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        # the runner serves exactly the requested size: resolution binning would resize it
        return {**settings, "complex_human_instruction": list(settings["complex_human_instruction"]),
                "use_resolution_binning": False}

    def text_key(self, settings: dict[str, Any]) -> tuple:
        return (settings["max_sequence_length"], settings["clean_caption"], settings["complex_human_instruction"])

    def extra_step_kwargs(self, pipe: Any, generator: torch.Generator) -> dict[str, Any]:
        return pipe.prepare_extra_step_kwargs(generator, 0.0)

    def model_input(self, scheduler: Any, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return latents  # the stock loop does not scale the model input

    def encode(self, pipe: Any, texts: Sequence[str], settings: dict[str, Any], device: torch.device,
               negative: bool = False) -> list[TextConditioning]:
        if negative:  # what encode_prompt does for the negative prompt: no instruction, no index selection
            embeds, mask = sana_negative_embeds(pipe, list(texts), clean_caption=settings["clean_caption"],
                                                max_sequence_length=settings["max_sequence_length"])
        else:
            embeds, mask, _, _ = pipe.encode_prompt(
                list(texts), do_classifier_free_guidance=False, device=device,
                clean_caption=settings["clean_caption"], max_sequence_length=settings["max_sequence_length"],
                complex_human_instruction=list(settings["complex_human_instruction"]))
        return [TextConditioning(embeds[i : i + 1], mask[i : i + 1]) for i in range(len(texts))]

    def initial_latents(self, pipe: Any, generators: Sequence[torch.Generator], settings: dict[str, Any],
                        device: torch.device) -> torch.Tensor:
        return pipe.prepare_latents(len(generators), pipe.transformer.config.in_channels, settings["height"],
                                    settings["width"], torch.float32, device, list(generators))

    def forward(self, pipe: Any, latents: torch.Tensor, timesteps: torch.Tensor,
                texts: Sequence[TextConditioning], settings: dict[str, Any]) -> torch.Tensor:
        transformer = pipe.transformer
        dtype = transformer.dtype
        prediction = transformer(
            latents.to(dtype), encoder_hidden_states=torch.cat([t.embeds for t in texts]).to(dtype),
            encoder_attention_mask=torch.cat([t.mask for t in texts]),
            timestep=timesteps.to(latents.device) * transformer.config.timestep_scale, return_dict=False)[0].float()
        if transformer.config.out_channels // 2 == transformer.config.in_channels:  # learned sigma
            prediction = prediction.chunk(2, dim=1)[0]
        return prediction

    def decode(self, pipe: Any, latents: torch.Tensor) -> list[Any]:
        images = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(images, output_type="pil")


class FluxFamily(_FlowMatching, StockFamily):
    """FLUX.1 (`FluxPipeline`): CLIP pooled + T5 embeddings, guidance-distilled (one row per request, its guidance
    scale embedded; no CFG rows, so a negative prompt is ignored as the stock call ignores it at true_cfg_scale 1),
    2x2-packed latents with img_ids/txt_ids, flow matching with sigmas and the shift `mu` of the stock call.

    A request's latents stay unpacked (B, C, H, W) in the runner: the forward packs them and unpacks the prediction
    (a permutation), and the Euler step is elementwise, so every value is the one the stock loop computes."""

    name = "flux"
    cfg_rows = False
    default_max_shift = 1.15

    def settings(self, pipe: Any, overrides: dict[str, Any]) -> dict[str, Any]:
        from .call import model_call_defaults

        merged = {**model_call_defaults(pipe), **overrides}
        height, width = _resolution(pipe, merged, pipe.default_sample_size * pipe.vae_scale_factor,
                                    pipe.vae_scale_factor * 2)  # packing takes 2x2 latent patches
        return {"height": height, "width": width, "max_sequence_length": int(merged.get("max_sequence_length", 512))}

    def image_seq_len(self, pipe: Any, settings: dict[str, Any]) -> int:
        return (settings["height"] // (pipe.vae_scale_factor * 2)) * (settings["width"] // (pipe.vae_scale_factor * 2))

    def scheduler(self, pipe: Any, num_steps: int, settings: dict[str, Any], device: torch.device) -> Any:
        import numpy as np

        mu = self.shift_mu(pipe, settings)
        if pipe.scheduler.config.get("use_flow_sigmas", False):
            return fresh_scheduler(pipe.scheduler, num_steps, device, mu=mu)
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)  # as the stock call passes them to retrieve_timesteps
        return fresh_scheduler(pipe.scheduler, None, device, sigmas=sigmas, mu=mu)

    def encode(self, pipe: Any, texts: Sequence[str], settings: dict[str, Any],
               device: torch.device) -> list[TextConditioning]:
        embeds, pooled, _ = pipe.encode_prompt(prompt=list(texts), prompt_2=None, device=device,
                                               max_sequence_length=settings["max_sequence_length"])
        return [TextConditioning(embeds[i : i + 1], None, pooled[i : i + 1]) for i in range(len(texts))]

    def initial_latents(self, pipe: Any, generators: Sequence[torch.Generator], settings: dict[str, Any],
                        device: torch.device) -> torch.Tensor:
        dtype = pipe.text_encoder_2.dtype if pipe.text_encoder_2 is not None else pipe.transformer.dtype
        packed, _ = pipe.prepare_latents(len(generators), pipe.transformer.config.in_channels // 4,
                                         settings["height"], settings["width"], dtype, device, list(generators))
        return flux_unpack_latents(pipe, packed, settings["height"], settings["width"])

    def forward(self, pipe: Any, latents: torch.Tensor, timesteps: torch.Tensor,
                texts: Sequence[TextConditioning], settings: dict[str, Any],
                guidance: Sequence[float] | None = None) -> torch.Tensor:
        transformer = pipe.transformer
        rows, _, height, width = latents.shape
        device = latents.device
        packed = flux_pack_latents(pipe, latents)
        embeds = torch.cat([t.embeds for t in texts])
        img_ids = flux_latent_image_ids(pipe, rows, height // 2, width // 2, device, latents.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype)
        guidance_rows = None
        if transformer.config.guidance_embeds:
            if guidance is None:
                guidance = [float(stock_default(pipe, "guidance_scale", 3.5))] * rows
            guidance_rows = torch.tensor([float(g) for g in guidance], device=device, dtype=torch.float32)
        prediction = transformer(
            hidden_states=packed, timestep=timesteps.to(device=device, dtype=latents.dtype) / 1000,
            guidance=guidance_rows, pooled_projections=torch.cat([t.pooled for t in texts]),
            encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        scale = pipe.vae_scale_factor
        return flux_unpack_latents(pipe, prediction, height * scale, width * scale)

    def decode(self, pipe: Any, latents: torch.Tensor) -> list[Any]:
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        images = pipe.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(images, output_type="pil")


class WanFamily(_FlowMatching, StockFamily):
    """Wan 2.1 (`WanPipeline`, and the bundled digits-video model): UMT5 embeddings with no mask, flow matching
    (the stock call sets plain timesteps: no shift `mu`), CFG as two rows, a request is a whole clip of
    `num_frames` frames whose latents are `[1, C, T, h, w]` (T = 1 + (num_frames - 1) // 4).

    For video streams (`supports_video_streams`): the transformer takes a 2-D timestep `[rows, tokens]` (one noise
    level per token, frame-major), the way the digits-video model was trained with independent per-frame noise
    (`cachekit.zoo.train_digits_video.per_token_timesteps`), and `denormalize` turns latents into what the VAE
    decodes (`WanStreamingDecoder` decodes them a chunk at a time)."""

    name = "wan"
    supports_video_streams = True

    def settings(self, pipe: Any, overrides: dict[str, Any]) -> dict[str, Any]:
        from .call import model_call_defaults

        merged = {**model_call_defaults(pipe), **overrides}
        factor = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
        height, width = _resolution(pipe, {"height": merged.get("height", 480), "width": merged.get("width", 832)},
                                    0, factor)
        frames = int(merged.get("num_frames", 81))
        temporal = pipe.vae_scale_factor_temporal
        if frames < 1 or (frames - 1) % temporal:
            raise UsageError(f"num_frames must be {temporal}k+1 for this model (1, {1 + temporal}, "
                             f"{1 + 2 * temporal}, ...), got {frames}")
        return {"height": height, "width": width, "num_frames": frames,
                "max_sequence_length": int(merged.get("max_sequence_length", 512))}

    def group_key(self, settings: dict[str, Any]) -> tuple:
        return (settings["height"], settings["width"], settings["num_frames"], settings["max_sequence_length"])

    def model_input(self, scheduler: Any, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return latents  # the stock loop does not scale the model input

    def encode(self, pipe: Any, texts: Sequence[str], settings: dict[str, Any],
               device: torch.device) -> list[TextConditioning]:
        embeds, _ = pipe.encode_prompt(list(texts), do_classifier_free_guidance=False, device=device,
                                       max_sequence_length=settings["max_sequence_length"])
        embeds = embeds.to(pipe.transformer.dtype)
        return [TextConditioning(embeds[i : i + 1], None) for i in range(len(texts))]

    def initial_latents(self, pipe: Any, generators: Sequence[torch.Generator], settings: dict[str, Any],
                        device: torch.device) -> torch.Tensor:
        return pipe.prepare_latents(len(generators), pipe.transformer.config.in_channels, settings["height"],
                                    settings["width"], settings["num_frames"], torch.float32, device,
                                    list(generators))

    def latent_frame(self, pipe: Any, generator: torch.Generator, settings: dict[str, Any],
                     device: torch.device) -> torch.Tensor:
        """One latent frame of noise `[1, C, 1, h, w]` (a stream's newest frame), from the stream's generator."""
        shape = (1, pipe.transformer.config.in_channels, 1, settings["height"] // pipe.vae_scale_factor_spatial,
                 settings["width"] // pipe.vae_scale_factor_spatial)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)

    def tokens_per_frame(self, pipe: Any, settings: dict[str, Any]) -> int:
        _, p_h, p_w = pipe.transformer.config.patch_size
        scale = pipe.vae_scale_factor_spatial
        return (settings["height"] // scale // p_h) * (settings["width"] // scale // p_w)

    def forward(self, pipe: Any, latents: torch.Tensor, timesteps: torch.Tensor,
                texts: Sequence[TextConditioning], settings: dict[str, Any]) -> torch.Tensor:
        transformer = pipe.transformer
        return transformer(hidden_states=latents.to(transformer.dtype), timestep=timesteps.to(latents.device),
                           encoder_hidden_states=torch.cat([t.embeds for t in texts]), return_dict=False)[0].float()

    def denormalize(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the VAE decodes them (the stock call's `latents_mean` / `latents_std`)."""
        config = pipe.vae.config
        latents = latents.to(pipe.vae.dtype)
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        return latents * std + mean

    def normalize(self, pipe: Any, encoded: torch.Tensor) -> torch.Tensor:
        """VAE latents (`vae.encode(...).latent_dist.mean`) as the transformer's latents (the inverse of
        `denormalize`)."""
        config = pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(encoded.device, encoded.dtype)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(encoded.device, encoded.dtype)
        return ((encoded - mean) / std).float()

    def decode(self, pipe: Any, latents: torch.Tensor) -> list[Any]:
        """Each request's clip as a list of PIL frames."""
        video = pipe.vae.decode(self.denormalize(pipe, latents), return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="pil")


_FAMILIES: dict[str, Callable[[], PipelineFamily]] = {}


def register_family(pipeline_class_names: Sequence[str], factory: Callable[[], PipelineFamily]) -> None:
    """Teach the runner a pipeline family (what `Runner` uses to take the pipeline's loop apart)."""
    for name in pipeline_class_names:
        _FAMILIES[name] = factory


def family_names() -> list[str]:
    return sorted(_FAMILIES)


def family_of(pipe: Any) -> PipelineFamily:
    name = type(pipe).__name__
    factory = _FAMILIES.get(name)
    if factory is None:
        raise UsageError(f"the runner has no adapter for {name} yet; it serves {', '.join(family_names())} "
                         "(pipelines.families.register_family adds one)")
    return factory()


register_family(("PixArtAlphaPipeline", "PixArtSigmaPipeline"), PixArtFamily)
register_family(("StableDiffusion3Pipeline",), StableDiffusion3Family)
register_family(("SanaPipeline",), SanaFamily)
register_family(("FluxPipeline",), FluxFamily)
register_family(("WanPipeline",), WanFamily)
