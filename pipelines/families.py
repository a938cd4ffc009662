"""What the runner must know about a pipeline family to take its denoising loop apart, one adapter per family.

The runner serves many requests at different steps in one transformer forward, so it cannot call the pipeline's
`__call__`; it runs the same pieces the stock loop runs, row by row: the pipeline's own `encode_prompt`,
`prepare_latents`, scheduler and VAE. An adapter says how those pieces fit for one family (which inputs the
transformer takes, how CFG rows are laid out, how the output is split). Families are registered by pipeline class
name; a pipeline with no adapter gets a one-line error naming those that have one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from cachekit.compat import execution_device
from cachekit.errors import UsageError

__all__ = ["TextConditioning", "PipelineFamily", "PixArtFamily", "register_family", "family_of", "family_names"]


@dataclasses.dataclass(frozen=True)
class TextConditioning:
    """One text's embeddings as the transformer takes them (batch dimension 1)."""

    embeds: torch.Tensor
    mask: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        return self.embeds.numel() * self.embeds.element_size() + (0 if self.mask is None else self.mask.numel() * self.mask.element_size())


class PipelineFamily(Protocol):
    """The pieces of a family's denoising loop, each working on rows of any number of requests."""

    name: str

    def settings(self, pipe: Any, overrides: dict[str, Any]) -> dict[str, Any]:
        """Resolution and text settings of a request (the model's call defaults under the caller's)."""

    def call_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The stock pipeline call arguments that give these settings (for a solo call or a cost profile)."""

    def group_key(self, settings: dict[str, Any]) -> tuple:
        """Requests with equal keys can share a forward (same latent shape and text length)."""

    def encode(self, pipe: Any, texts: Sequence[str], settings: dict[str, Any]) -> list[TextConditioning]:
        """Embeddings of distinct texts, in one text-encoder call."""

    def initial_latents(self, pipe: Any, generator: torch.Generator, settings: dict[str, Any]) -> torch.Tensor:
        """The request's starting noise, drawn exactly as the stock pipeline draws it for a batch of one."""

    def forward(self, pipe: Any, latents: torch.Tensor, timesteps: torch.Tensor,
                texts: Sequence[TextConditioning], settings: dict[str, Any]) -> torch.Tensor:
        """The transformer's prediction for every row (learned-sigma channels dropped)."""

    def decode(self, pipe: Any, latents: torch.Tensor) -> list[Any]:
        """Finished latents of any number of requests to PIL images, in one VAE call."""


class PixArtFamily:
    """PixArt-Alpha and PixArt-Sigma (and the bundled digits model, a tiny PixArt-Alpha)."""

    name = "pixart"
    _TEXT_SETTINGS = ("max_sequence_length", "clean_caption")

    def settings(self, pipe: Any, overrides: dict[str, Any]) -> dict[str, Any]:
        from .call import model_call_defaults

        merged = {**model_call_defaults(pipe), **overrides}
        default_size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        height = int(merged.get("height") or default_size)
        width = int(merged.get("width") or default_size)
        factor = pipe.vae_scale_factor * pipe.transformer.config.patch_size
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise UsageError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
        return {"height": height, "width": width,
                "max_sequence_length": int(merged.get("max_sequence_length", 120)),
                "clean_caption": bool(merged.get("clean_caption", False))}

    def call_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        # the runner serves exactly the requested size: resolution binning would resize it
        return {**settings, "use_resolution_binning": False}

    def group_key(self, settings: dict[str, Any]) -> tuple:
        return (settings["height"], settings["width"], settings["max_sequence_length"])

    def encode(self, pipe: Any, texts: Sequence[str], settings: dict[str, Any]) -> list[TextConditioning]:
        embeds, mask, _, _ = pipe.encode_prompt(
            list(texts), do_classifier_free_guidance=False, device=execution_device(pipe),
            clean_caption=settings["clean_caption"], max_sequence_length=settings["max_sequence_length"])
        return [TextConditioning(embeds[i : i + 1], mask[i : i + 1]) for i in range(len(texts))]

    def initial_latents(self, pipe: Any, generator: torch.Generator, settings: dict[str, Any]) -> torch.Tensor:
        return pipe.prepare_latents(1, pipe.transformer.config.in_channels, settings["height"], settings["width"],
                                    pipe.transformer.dtype, execution_device(pipe), generator)

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
