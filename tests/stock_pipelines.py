"""Stock diffusers pipelines of the coverage families, built offline from tiny components, and how to call each.

A coverage family's transformer is exercised by every technique through `tiny_models.denoise`; these cases run it
through the family's own pipeline `__call__` as well (tests/test_stock_pipelines.py), where step tracking, CFG
branches and cache freeing meet the real loop. Text encoders are tiny configs over a word tokenizer
(`cachekit.zoo._text.build_word_tokenizer`), so nothing is downloaded. The groups by text encoder live in
`stock_pipelines_*.py`; `STOCK_CASES` gathers them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import diffusers
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from tiny_models import _tiny_t5


@dataclass(frozen=True)
class StockCase:
    """One stock pipeline and what a call to it takes.

    `cfg_forwards` is how its CFG reaches the transformer: "batched" (both branches in one forward of two rows) or
    "two calls" (one forward per branch and step, named by `cache_context` or not). `kwargs` go to every call (size,
    sequence length, ...), `inputs` is what to generate (a prompt, class labels, an image); `cfg` turns guidance on
    (with a negative prompt where the pipeline takes one), `no_cfg` turns it off."""

    family: str
    build: Callable[[], diffusers.DiffusionPipeline]
    cfg_forwards: str
    kwargs: dict
    inputs: dict = field(default_factory=lambda: {"prompt": "a seven"})
    cfg: dict = field(default_factory=lambda: {"guidance_scale": 3.0, "negative_prompt": "blurry"})
    no_cfg: dict = field(default_factory=lambda: {"guidance_scale": 1.0})
    output: str = "images"  # the output's attribute: "images", "frames", ...
    denoiser: str = "transformer"  # the pipeline attribute holding the denoiser
    # how the test looks at the caches after each step: `callback_on_step_end`, the older `callback(step, t, latents)`,
    # or (None, a pipeline with no step callback) after each step's last transformer forward
    step_callback: str | None = "callback_on_step_end"
    # a pipeline whose CFG is its `guider` component's, not a call argument's: the guidance scales (with CFG,
    # without) of the `ClassifierFreeGuidance` the test gives it before each call
    guider_scales: tuple[float, float] | None = None


def tiny_kl_vae(latent_channels: int = 4, **config) -> diffusers.AutoencoderKL:
    """A two-stage image VAE (2x down) with 8 and 16 channels: what most image pipelines here decode with."""
    torch.manual_seed(3)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=16, **config).eval()


def tiny_byt5(seed: int = 2):
    """ByT5's byte tokenizer (it needs no vocabulary file) and a one-layer T5 encoder over it: the glyph-text
    encoder of HunyuanImage and GLM-Image."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)).eval()
    return tokenizer, text_encoder


def tiny_wan_vae(z_dim: int = 4) -> diffusers.AutoencoderKLWan:
    """Wan's causal video VAE at its smallest (two stages, 4x in space and time; 1 + 4k frames of 16k px): Wan-family
    and Sana-Video pipelines decode with it. Its latent statistics are 0 / 1 over `z_dim` channels (the pipelines
    reshape them to the latents' channels) and `scale_factor_*` match the architecture (some pipelines read them)."""
    torch.manual_seed(3)
    return diffusers.AutoencoderKLWan(base_dim=3, z_dim=z_dim, dim_mult=[1, 1, 1], num_res_blocks=1,
                                      temperal_downsample=[True, True], latents_mean=[0.0] * z_dim,
                                      latents_std=[1.0] * z_dim, scale_factor_temporal=4,
                                      scale_factor_spatial=4).eval()


def tiny_auraflow_pipeline():
    """A stock AuraFlowPipeline from tiny configs: a one-layer UMT5 encoder over a word tokenizer, a one-joint-
    two-single-block AuraFlow transformer on 8x8x4 latents, a two-stage VAE, flow-matching Euler. Its CFG is batched
    (both branches in one forward), so the branches' rows are apart by construction."""
    from diffusers import AutoencoderKL
    from transformers import UMT5Config, UMT5EncoderModel

    from cachekit.zoo._text import build_word_tokenizer

    tokenizer = build_word_tokenizer(["<pad>", "</s>", "<unk>"], eos="</s>", pad="<pad>", unk="<unk>",
                                     model_max_length=16)
    torch.manual_seed(1)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False)).eval()
    torch.manual_seed(0)
    transformer = diffusers.AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, out_channels=4,
        pos_embed_max_size=16).eval()
    torch.manual_seed(3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16).eval()
    pipe = diffusers.AuraFlowPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                      transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_chroma_pipeline():
    """A stock ChromaPipeline from tiny configs: a two-layer T5 encoder over a word tokenizer, a one-double-
    one-single-block Chroma transformer on 8x8x4 latents (16 packed tokens), a two-stage VAE, flow-matching Euler.
    Its CFG is two unnamed transformer calls per step (conditional, then negative): the branches are told apart
    by call order, not by a `cache_context` label."""
    from diffusers import AutoencoderKL, ChromaPipeline

    tokenizer, text_encoder = _tiny_t5(16, d_model=32, d_ff=64, num_layers=2, num_heads=4, seed=1)
    torch.manual_seed(0)
    transformer = diffusers.ChromaTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=8,
        approximator_hidden_dim=16, approximator_layers=1).eval()
    torch.manual_seed(3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False).eval()
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_ltx_pipeline():
    """A stock LTXPipeline (text to video) from tiny configs: a one-layer T5 encoder over a word tokenizer, a
    two-block LTX-Video transformer, a four-stage causal video VAE compressing 4x in space and time (5 frames of
    32x32 px -> 2 x 8 x 8 latents; the pipeline wants multiples of 32), flow-matching Euler. Its CFG is batched."""
    from diffusers import AutoencoderKLLTXVideo, LTXPipeline

    tokenizer, text_encoder = _tiny_t5(16, d_model=16, d_ff=32, num_layers=1, num_heads=2, seed=1)
    torch.manual_seed(0)
    transformer = diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, caption_channels=16, patch_size=1, patch_size_t=1).eval()
    torch.manual_seed(3)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False).eval()
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                       tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_kandinsky_prior_pipeline():
    """A stock KandinskyV22PriorPipeline (text to CLIP image embedding) from tiny configs: a CLIP text encoder with a
    32-wide projection over a word tokenizer, a one-layer PriorTransformer over 32-wide embeddings, a CLIP vision
    encoder (it embeds the zero image the pipeline returns as its negative), the UnCLIP scheduler. Its CFG is
    batched against the empty prompt (a `negative_prompt` would double the prompts instead, so none is given)."""
    from diffusers import KandinskyV22PriorPipeline, PriorTransformer, UnCLIPScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from tiny_models import _tiny_clip_tokenizer, _tiny_clip_with_projection

    tokenizer = _tiny_clip_tokenizer()
    text_encoder = _tiny_clip_with_projection(tokenizer, seed=1)
    torch.manual_seed(0)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=8, embedding_dim=32, num_layers=1,
                             num_embeddings=tokenizer.model_max_length).eval()
    prior.clip_std.data.fill_(1.0)  # initialised to zero, which would make every embedding the zero vector
    torch.manual_seed(2)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=8,
        projection_dim=32)).eval()
    scheduler = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                                clip_sample=True, clip_sample_range=10.0)
    pipe = KandinskyV22PriorPipeline(prior=prior, image_encoder=image_encoder, text_encoder=text_encoder,
                                     tokenizer=tokenizer, scheduler=scheduler,
                                     image_processor=CLIPImageProcessor(crop_size=16, size=16))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_legacy_pixart_pipeline():
    """A stock PixArtAlphaPipeline around the legacy `Transformer2DModel` (PixArt's class before
    `PixArtTransformer2DModel`; old checkpoints still load into it): a one-layer T5 encoder over a word tokenizer,
    two ada-norm-single blocks on 8x8x4 latents, a two-stage VAE, DPM-Solver. Its CFG is batched."""
    from diffusers import PixArtAlphaPipeline, Transformer2DModel

    tokenizer, text_encoder = _tiny_t5(16, d_model=16, d_ff=32, num_layers=1, num_heads=2, seed=1)
    torch.manual_seed(0)
    transformer = Transformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=16, caption_channels=16, patch_size=2, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, use_additional_conditions=False).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_kl_vae(),
                               transformer=transformer, scheduler=diffusers.DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_dit_pipeline():
    """A stock DiTPipeline (class-conditional, no text) from tiny configs: a two-block DiT on 8x8x4 latents that
    predicts its variance (8 output channels), a two-stage VAE, DPM-Solver. Its CFG is batched against the null
    class; it has no step callback."""
    from diffusers import DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    pipe = DiTPipeline(transformer=transformer, vae=tiny_kl_vae(),
                       scheduler=diffusers.DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = [
    StockCase("AuraFlow", tiny_auraflow_pipeline, "batched", {"height": 16, "width": 16, "max_sequence_length": 16}),
    StockCase("Chroma", tiny_chroma_pipeline, "two calls", {"height": 16, "width": 16, "max_sequence_length": 16}),
    StockCase("LTX-Video", tiny_ltx_pipeline, "batched",
              {"height": 32, "width": 32, "num_frames": 5, "max_sequence_length": 16}, output="frames"),
    StockCase("PixArt-legacy-Transformer2D", tiny_legacy_pixart_pipeline, "batched",
              {"height": 16, "width": 16, "max_sequence_length": 16, "use_resolution_binning": False},
              step_callback="callback"),
    StockCase("DiT", tiny_dit_pipeline, "batched", {}, inputs={"class_labels": [1]}, cfg={"guidance_scale": 3.0},
              step_callback=None),
    StockCase("Kandinsky-2.2-prior", tiny_kandinsky_prior_pipeline, "batched", {}, cfg={"guidance_scale": 3.0},
              output="image_embeds", denoiser="prior"),
]
