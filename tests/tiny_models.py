"""Tiny configs of the real diffusers transformer classes, and a plain denoising loop to drive them.

The configs follow diffusers' own test suite sizes. `denoise` is what a pipeline's loop does, reduced to the parts
caching cares about: the scheduler's timesteps, one transformer call per step (or one per CFG branch inside
`cache_context`, as Wan and FLUX pipelines do), and `scheduler.step`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from dataclasses import dataclass

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)

import cachekit


@dataclass
class TinyModel:
    name: str
    build: Callable[[], torch.nn.Module]
    latents: Callable[[int, torch.Generator], torch.Tensor]
    conditioning: Callable[[int, torch.Generator], dict]
    scheduler: Callable[[], object]
    timestep_scale: float = 1.0  # what the pipeline divides the scheduler timestep by

    def output(self, out, latents: torch.Tensor) -> torch.Tensor:
        sample = out[0]
        return sample[:, : latents.shape[1]] if sample.shape[1] != latents.shape[1] and sample.ndim == 4 else sample


def _dpm():
    return DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def _flow():
    return FlowMatchEulerDiscreteScheduler()


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


TINY_MODELS: dict[str, TinyModel] = {
    "PixArtTransformer2DModel": TinyModel(
        "PixArtTransformer2DModel",
        lambda: PixArtTransformer2DModel(
            sample_size=8, num_layers=3, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
            cross_attention_dim=16, caption_channels=16, patch_size=2, norm_type="ada_norm_single",
            use_additional_conditions=False,
        ),
        lambda b, g: _randn(g, b, 4, 8, 8),
        lambda b, g: {
            "encoder_hidden_states": _randn(g, b, 5, 16),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        },
        _dpm,
    ),
    "DiTTransformer2DModel": TinyModel(
        "DiTTransformer2DModel",
        lambda: DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
            patch_size=2, num_embeds_ada_norm=1000,
        ),
        lambda b, g: _randn(g, b, 4, 8, 8),
        lambda b, g: {"class_labels": torch.randint(0, 1000, (b,), generator=g)},
        _dpm,
    ),
    "SanaTransformer2DModel": TinyModel(
        "SanaTransformer2DModel",
        lambda: SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
            sample_size=8, patch_size=1,
        ),
        lambda b, g: _randn(g, b, 4, 8, 8),
        lambda b, g: {"encoder_hidden_states": _randn(g, b, 5, 16)},
        _flow,
    ),
    "FluxTransformer2DModel": TinyModel(
        "FluxTransformer2DModel",
        lambda: FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        ),
        lambda b, g: _randn(g, b, 16, 4),
        lambda b, g: {
            "encoder_hidden_states": _randn(g, b, 6, 32),
            "pooled_projections": _randn(g, b, 32),
            "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 3),
            "txt_ids": torch.zeros(6, 3),
        },
        _flow,
        timestep_scale=1000.0,
    ),
    "SD3Transformer2DModel": TinyModel(
        "SD3Transformer2DModel",
        lambda: SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=16, out_channels=4,
            dual_attention_layers=(0,),
        ),
        lambda b, g: _randn(g, b, 4, 8, 8),
        lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 32), "pooled_projections": _randn(g, b, 16)},
        _flow,
    ),
    "WanTransformer3DModel": TinyModel(
        "WanTransformer3DModel",
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ),
        lambda b, g: _randn(g, b, 4, 2, 8, 8),
        lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 16)},
        _flow,
    ),
    "CogVideoXTransformer3DModel": TinyModel(
        "CogVideoXTransformer3DModel",
        lambda: CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
            text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=16,
        ),
        lambda b, g: _randn(g, b, 3, 4, 8, 8),
        lambda b, g: {"encoder_hidden_states": _randn(g, b, 16, 16)},
        _dpm,
    ),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = TINY_MODELS[name].build().eval()
    # Tiny random models start with zero-initialised output layers; perturb every parameter so that caching
    # decisions change the output measurably.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return model


def denoise(
    model: torch.nn.Module,
    tiny: TinyModel,
    num_steps: int = 6,
    batch: int = 2,
    seed: int = 0,
    branches: tuple[str, ...] | None = None,
    on_step: Callable[[int], None] | None = None,
    scheduler=None,
    on_call: Callable[[int, str], None] | None = None,
    label_branches: bool = True,
) -> torch.Tensor:
    """Run a full multi-step denoising loop and return the final latents.

    With `branches`, the transformer is called once per branch label inside `cache_context(label)`, combining the
    predictions as CFG does (`uncond + 2 * (cond - uncond)`); the branches get different conditioning.
    `label_branches=False` makes the two calls without naming them, as some stock pipelines do.
    """
    gen = torch.Generator().manual_seed(seed)
    latents = tiny.latents(batch, gen)
    conds = {label: tiny.conditioning(batch, gen) for label in (branches or ("single",))}
    scheduler = scheduler or tiny.scheduler()
    scheduler.set_timesteps(num_steps)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            timestep = (t / tiny.timestep_scale).expand(batch)
            preds = {}
            for label, cond in conds.items():
                if on_call is not None:
                    on_call(i, label)
                if branches and label_branches:
                    # diffusers' own per-branch label where the model has it (FLUX, Wan), cachekit's otherwise
                    labelled = model.cache_context if hasattr(model, "cache_context") else partial(cachekit.branch, model)
                    with labelled(label):
                        out = model(latents, timestep=timestep, return_dict=False, **cond)
                else:
                    out = model(latents, timestep=timestep, return_dict=False, **cond)
                preds[label] = tiny.output(out, latents)
            if branches:
                pred = preds[branches[1]] + 2.0 * (preds[branches[0]] - preds[branches[1]])
            else:
                pred = preds["single"]
            latents = scheduler.step(pred, t, latents).prev_sample
            if on_step is not None:
                on_step(i)
    return latents


def tiny_pixart_pipeline():
    """A stock PixArtAlphaPipeline with the digits model's architecture, untrained and two blocks deep."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    from cachekit.zoo import train_digits as td

    torch.manual_seed(0)
    tokenizer = td.build_tokenizer()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=td.TEXT_DIM,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000, use_additional_conditions=False,
    ).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=td.build_text_encoder(len(tokenizer)).eval(),
                               vae=td.build_vae().eval(), transformer=transformer, scheduler=td.build_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------- many requests in one forward
@dataclass
class Request:
    """One generation served row-wise: its own key, step count, plan, noise seed and arrival tick."""

    key: str
    num_steps: int
    plan: object = None
    seed: int = 0
    arrival: int = 0


def _request_inputs(tiny: TinyModel, request: Request) -> tuple[torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(request.seed)
    return tiny.latents(1, gen), tiny.conditioning(1, gen)


def solo(model: torch.nn.Module, tiny: TinyModel, request: Request) -> torch.Tensor:
    """The request alone: a plain loop with its plan enabled the ordinary way (steps read off the timestep)."""
    scheduler = tiny.scheduler()
    if request.plan is None:
        return denoise(model, tiny, request.num_steps, batch=1, seed=request.seed, scheduler=scheduler)
    with cachekit.cached(model, request.plan, scheduler=scheduler):
        return denoise(model, tiny, request.num_steps, batch=1, seed=request.seed, scheduler=scheduler)


def _cat(values: list):
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values) if first.shape[0] == 1 else first  # unbatched inputs (FLUX ids) pass whole
    if isinstance(first, dict):
        return {k: _cat([v[k] for v in values]) for k in first}
    if isinstance(first, list) and first and isinstance(first[0], torch.Tensor):  # per-layer text states (Bria FIBO)
        return [_cat([v[i] for v in values]) for i in range(len(first))]
    return first


def serve_together(model: torch.nn.Module, tiny: TinyModel, requests: list[Request],
                   after_forward: Callable[[int, list[str]], None] | None = None) -> dict[str, torch.Tensor]:
    """Every tick, one transformer forward over the rows of all requests in flight, each at its own step.

    This is the streaming runner in miniature: per-row timesteps, keys, step counts and plans through
    `cachekit.rows`, and one scheduler per request. The model must be enabled with `cachekit.enable(model, None)`.
    """
    state = {}
    for request in requests:
        latents, cond = _request_inputs(tiny, request)
        scheduler = tiny.scheduler()
        scheduler.set_timesteps(request.num_steps)
        state[request.key] = {"latents": latents, "cond": cond, "scheduler": scheduler, "step": 0}
    done: dict[str, torch.Tensor] = {}
    tick = 0
    with torch.no_grad():
        while len(done) < len(requests):
            active = [r for r in requests if r.arrival <= tick and r.key not in done]
            tick += 1
            if not active:
                continue
            rows = [state[r.key] for r in active]
            latents = torch.cat([s["latents"] for s in rows])
            timesteps = torch.stack([s["scheduler"].timesteps[s["step"]] for s in rows])
            cond = _cat([s["cond"] for s in rows])
            with cachekit.rows(model, [s["step"] for s in rows], [r.key for r in active],
                               [r.num_steps for r in active], [r.plan for r in active]):
                out = model(latents, timestep=timesteps / tiny.timestep_scale, return_dict=False, **cond)
            pred = tiny.output(out, latents)
            for i, (request, s) in enumerate(zip(active, rows)):
                t = s["scheduler"].timesteps[s["step"]]
                s["latents"] = s["scheduler"].step(pred[i : i + 1], t, s["latents"]).prev_sample
                s["step"] += 1
                if s["step"] == request.num_steps:
                    done[request.key] = s["latents"]
            if after_forward is not None:
                after_forward(tick, [r.key for r in active])
    return done


class TinyLoopEvaluator:
    """A search evaluator on a tiny model: PSNR of a real denoising loop's final latents (as uint8 images) against
    the uncached loop's, and the predicted MAC ratio as cost."""

    quality_name = "psnr_vs_uncached"
    cost_name = "mac_ratio"

    def __init__(self, model: torch.nn.Module, name: str, num_steps: int, fail_after: int | None = None):
        from cachekit.cost import MacProfile

        self.model, self.tiny, self.num_steps = model, TINY_MODELS[name], num_steps
        gen = torch.Generator().manual_seed(0)
        latents, cond = self.tiny.latents(2, gen), self.tiny.conditioning(2, gen)
        timestep = torch.full((2,), 500.0) / self.tiny.timestep_scale
        self.profile = MacProfile.measure(model, latents, timestep=timestep, return_dict=False, **cond)
        self.reference = self._images(None)
        self.calls, self.fail_after = 0, fail_after

    def _images(self, schedule) -> torch.Tensor:
        scheduler = self.tiny.scheduler()
        if schedule is None:
            latents = denoise(self.model, self.tiny, self.num_steps, scheduler=scheduler)
        else:  # at the schedule's own step count (a joint search's candidates), judged against num_steps
            with cachekit.cached(self.model, schedule, scheduler=scheduler):
                latents = denoise(self.model, self.tiny, schedule.num_steps, scheduler=scheduler)
        flat = latents.flatten(1)[:, : 3 * 16].reshape(latents.shape[0], 3, 4, 4)  # any layout, as a tiny image
        return ((flat.clamp(-3, 3) + 3) / 6 * 255).round().to(torch.uint8)

    def evaluate(self, schedules):
        from cachekit.search.fitness import Fitness, capped_psnr

        out = []
        for schedule in schedules:
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise KeyboardInterrupt("killed mid-generation")
            self.calls += 1
            cost = self.profile.predict(schedule) * schedule.num_steps / self.num_steps
            out.append(Fitness(capped_psnr(self._images(schedule), self.reference), cost))
        return out


def _tiny_clip_tokenizer(model_max_length: int = 16):
    """A CLIP-style word tokenizer over the caption words: <bos> ... <eos>, padded with <pad>."""
    from cachekit.zoo._text import build_word_tokenizer

    return build_word_tokenizer(["<pad>", "<bos>", "<unk>", "<eos>"], eos="<eos>", pad="<pad>", unk="<unk>",
                                bos="<bos>", model_max_length=model_max_length)


def _tiny_clip_with_projection(tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, projection_dim=32,
                            max_position_embeddings=tokenizer.model_max_length,
                            hidden_act="gelu", layer_norm_eps=1e-5, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return CLIPTextModelWithProjection(config).eval()


def tiny_sd3_pipeline():
    """A stock StableDiffusion3Pipeline from tiny configs: two CLIP encoders (pooled 32 + 32), no T5 (its zeros),
    a two-block SD3 transformer on 8x8x4 latents, a VAE with SD3's scaling and shift, flow-matching Euler."""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline

    tokenizer, tokenizer_2 = _tiny_clip_tokenizer(), _tiny_clip_tokenizer()
    text_encoder = _tiny_clip_with_projection(tokenizer, 1)
    text_encoder_2 = _tiny_clip_with_projection(tokenizer_2, 2)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64, out_channels=4,
    ).eval()
    torch.manual_seed(3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=1.5035,
                        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_gemma2(seed: int):
    """A one-layer Gemma2 text encoder (what Sana and Sana-Video take) over a word tokenizer."""
    from transformers import Gemma2Config, Gemma2Model

    from cachekit.zoo._text import build_word_tokenizer

    tokenizer = build_word_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>"], eos="<eos>", pad="<pad>", unk="<unk>",
                                     bos="<bos>", model_max_length=512)
    torch.manual_seed(seed)
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    return tokenizer, text_encoder


def tiny_sana_pipeline():
    """A stock SanaPipeline from tiny configs: a one-layer Gemma2 text encoder over a word tokenizer, a two-block
    Sana transformer on 16x16x4 latents (32 px: Sana wants multiples of 32), a two-stage DC autoencoder, and Sana's
    flow DPM-Solver scheduler."""
    from diffusers import AutoencoderDC, SanaPipeline

    tokenizer, text_encoder = _tiny_gemma2(seed=1)
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=16, patch_size=2).eval()
    torch.manual_seed(3)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407).eval()
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_t5(model_max_length: int, d_model: int, d_ff: int, num_layers: int, num_heads: int, seed: int):
    """A T5 encoder (what FLUX, Chroma and LTX-Video take as their text encoder) over a word tokenizer."""
    from transformers import T5Config, T5EncoderModel

    from cachekit.zoo._text import build_word_tokenizer

    tokenizer = build_word_tokenizer(["<pad>", "</s>", "<unk>"], eos="</s>", pad="<pad>", unk="<unk>",
                                     model_max_length=model_max_length)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=d_ff, num_layers=num_layers, num_heads=num_heads,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False,
        use_cache=False)).eval()
    return tokenizer, text_encoder


def tiny_flux_pipeline():
    """A stock FluxPipeline from tiny configs: a CLIP text encoder (pooled 32) and a T5 encoder (32 wide) over word
    tokenizers, a one-double- one-single-block FLUX transformer with guidance embedding on 8x8x4 latents (16 packed
    tokens), a VAE with FLUX's scaling and shift, and FLUX's dynamically shifted flow-matching Euler scheduler.
    `default_sample_size` is set to 8 so the stock default size is the model's 16 px, not 256."""
    from diffusers import AutoencoderKL, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tiny_clip_tokenizer()
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, hidden_act="gelu", layer_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)).eval()
    tokenizer_2, text_encoder_2 = _tiny_t5(32, d_model=32, d_ff=64, num_layers=2, num_heads=4, seed=2)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        guidance_embeds=True).eval()
    torch.manual_seed(3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.default_sample_size = 8
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------ model coverage
# The classes registered in `cachekit.registry.COVERAGE_SPECS`: the smallest configs each class accepts (one or two
# blocks per block list, at least two blocks in all, 1-2 heads, 16-32 latent tokens) so every technique runs over all
# of them in a second or two per class. `CORE_MODELS` are the seven classes the per-technique test grid covers in
# depth; the coverage classes go through the same mixins, all techniques in one test per class.
import diffusers  # noqa: E402  (the coverage classes by name)

CORE_MODELS: tuple[str, ...] = tuple(sorted(TINY_MODELS))


def _flux_ids(h: int, w: int) -> torch.Tensor:
    grid = torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    return torch.stack(grid, -1).reshape(h * w, 3)


def _ids4(h: int, w: int) -> torch.Tensor:
    grid = torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), torch.zeros(1), indexing="ij")
    return torch.stack(grid, -1).reshape(h * w, 4)


def _add(name: str, build, latents, conditioning, scheduler=_flow, timestep_scale: float = 1.0) -> None:
    TINY_MODELS[name] = TinyModel(name, build, latents, conditioning, scheduler, timestep_scale)


# ---- FLUX-like double + single stream
_add("ChromaTransformer2DModel",
    lambda: diffusers.ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=8,
        approximator_hidden_dim=16, approximator_layers=1),
    lambda b, g: _randn(g, b, 16, 4),
    lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 32), "img_ids": _flux_ids(4, 4), "txt_ids": torch.zeros(6, 3)},
    timestep_scale=1000.0)
_add("BriaTransformer2DModel",
    lambda: diffusers.BriaTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[0, 4, 4]),
    lambda b, g: _randn(g, b, 16, 4),
    lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 32), "img_ids": _flux_ids(4, 4), "txt_ids": torch.zeros(6, 3)})
_add("LongCatImageTransformer2DModel",
    lambda: diffusers.LongCatImageTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
    lambda b, g: _randn(g, b, 16, 4),
    lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 32), "img_ids": _flux_ids(4, 4), "txt_ids": torch.zeros(6, 3)},
    timestep_scale=1000.0)
_add("OvisImageTransformer2DModel",
    lambda: diffusers.OvisImageTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8)),
    lambda b, g: _randn(g, b, 16, 4),
    lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 32), "img_ids": _flux_ids(4, 4), "txt_ids": torch.zeros(6, 3)},
    timestep_scale=1000.0)
_add("Flux2Transformer2DModel",
    lambda: diffusers.Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4)),
    lambda b, g: _randn(g, b, 16, 4),
    lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 32), "img_ids": _ids4(4, 4), "txt_ids": torch.zeros(6, 4),
                  "guidance": torch.full((b,), 3.5)},
    timestep_scale=1000.0)
_add("HunyuanVideoTransformer3DModel",
    lambda: diffusers.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)),
    lambda b, g: _randn(g, b, 4, 1, 4, 4),
    lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 16), "pooled_projections": _randn(g, b, 8),
                  "encoder_attention_mask": torch.ones(b, 6), "guidance": torch.full((b,), 3500.0)})
_add("HunyuanImageTransformer2DModel",
    lambda: diffusers.HunyuanImageTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(4, 4)),
    lambda b, g: _randn(g, b, 4, 4, 4),
    lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 16), "encoder_attention_mask": torch.ones(b, 6)})
_add("HunyuanVideo15Transformer3DModel",
    lambda: diffusers.HunyuanVideo15Transformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        num_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v"),
    lambda b, g: _randn(g, b, 4, 1, 4, 4),
    lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 16), "encoder_attention_mask": torch.ones(b, 6),
                  "encoder_hidden_states_2": _randn(g, b, 4, 8), "encoder_attention_mask_2": torch.ones(b, 4),
                  "image_embeds": torch.zeros(b, 4, 12)})
_add("MotifVideoTransformer3DModel",
    lambda: diffusers.MotifVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        num_layers=1, num_single_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, rope_axes_dim=(2, 2, 4)),
    lambda b, g: _randn(g, b, 4, 1, 4, 4),
    lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 16), "encoder_attention_mask": torch.ones(b, 6)})
_add("AuraFlowTransformer2DModel",
    lambda: diffusers.AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
        num_single_dit_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        caption_projection_dim=16, out_channels=4, pos_embed_max_size=16),
    lambda b, g: _randn(g, b, 4, 8, 8),
    lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 16)}, timestep_scale=1000.0)
# ---- Wan-like
_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
            freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
_add("SkyReelsV2Transformer3DModel", lambda: diffusers.SkyReelsV2Transformer3DModel(**_WAN),
    lambda b, g: _randn(g, b, 4, 2, 8, 8), lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 16)})
_add("ChronoEditTransformer3DModel", lambda: diffusers.ChronoEditTransformer3DModel(**_WAN),
    lambda b, g: _randn(g, b, 4, 2, 8, 8), lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 16)})
_add("WanVACETransformer3DModel", lambda: diffusers.WanVACETransformer3DModel(**_WAN, vace_layers=[0], vace_in_channels=4),
    lambda b, g: _randn(g, b, 4, 2, 8, 8), lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 16),
                                                  "control_hidden_states": _randn(g, b, 4, 2, 8, 8)})
_add("HeliosTransformer3DModel",
    lambda: diffusers.HeliosTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, rope_dim=(4, 4, 4),
        has_multi_term_memory_patch=False),
    lambda b, g: _randn(g, b, 4, 2, 8, 8), lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 16)})
# ---- cross-attention DiTs
_add("AllegroTransformer3DModel",
    lambda: diffusers.AllegroTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8),
    lambda b, g: _randn(g, b, 4, 2, 8, 8), lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 8)}, scheduler=_dpm)
_add("LTXVideoTransformer3DModel",
    lambda: diffusers.LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=16),
    lambda b, g: _randn(g, b, 32, 4),
    lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 16), "encoder_attention_mask": torch.ones(b, 6),
                  "num_frames": 2, "height": 4, "width": 4})
_add("SanaVideoTransformer3DModel",
    lambda: diffusers.SanaVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=16, sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32),
    lambda b, g: _randn(g, b, 4, 2, 8, 8), lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 16)})
_add("Transformer2DModel",
    lambda: diffusers.Transformer2DModel(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, cross_attention_dim=16, caption_channels=16, patch_size=2, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, use_additional_conditions=False),
    lambda b, g: _randn(g, b, 4, 8, 8),
    lambda b, g: {"encoder_hidden_states": _randn(g, b, 5, 16), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}},
    scheduler=_dpm)
# ---- MM-DiT, one stream list
_add("CogView3PlusTransformer2DModel",
    lambda: diffusers.CogView3PlusTransformer2DModel(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8,
        sample_size=8),
    lambda b, g: _randn(g, b, 4, 8, 8),
    lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 8), "original_size": torch.tensor([[16.0, 16.0]] * b),
                  "target_size": torch.tensor([[16.0, 16.0]] * b), "crop_coords": torch.zeros(b, 2)}, scheduler=_dpm)
_add("CogView4Transformer2DModel",
    lambda: diffusers.CogView4Transformer2DModel(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=2, rope_axes_dim=(4, 4)),
    lambda b, g: _randn(g, b, 4, 8, 8),
    lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 8), "original_size": torch.tensor([[16.0, 16.0]] * b),
                  "target_size": torch.tensor([[16.0, 16.0]] * b), "crop_coords": torch.zeros(b, 2)})
_add("ConsisIDTransformer3DModel",
    lambda: diffusers.ConsisIDTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        time_embed_dim=2, text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16),
    lambda b, g: _randn(g, b, 3, 4, 8, 8), lambda b, g: {"encoder_hidden_states": _randn(g, b, 16, 16)}, scheduler=_dpm)
_add("QwenImageTransformer2DModel",
    lambda: diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4)),
    lambda b, g: _randn(g, b, 16, 16),
    lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 16), "encoder_hidden_states_mask": torch.ones(b, 6),
                  "img_shapes": [(1, 4, 4)] * b}, timestep_scale=1000.0)
_add("NucleusMoEImageTransformer2DModel",
    lambda: diffusers.NucleusMoEImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
        attention_head_dim=64, num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(16, 24, 24),
        moe_enabled=False),  # the dense MLP's width rounds down to multiples of 128: 128 wide is the least
    lambda b, g: _randn(g, b, 16, 16),
    lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 16), "encoder_hidden_states_mask": torch.ones(b, 6),
                  "img_shapes": [(1, 4, 4)] * b}, timestep_scale=1000.0)
_add("JoyImageEditTransformer3DModel",
    lambda: diffusers.JoyImageEditTransformer3DModel(patch_size=[1, 2, 2], in_channels=4, out_channels=4, hidden_size=32,
        num_attention_heads=2, text_dim=16, num_layers=2, rope_dim_list=[4, 6, 6]),
    lambda b, g: _randn(g, b, 4, 1, 8, 8), lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 16)})
_add("GlmImageTransformer2DModel",
    lambda: diffusers.GlmImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, text_embed_dim=8, time_embed_dim=8, condition_dim=2, prior_vq_quantizer_codebook_size=16),
    lambda b, g: _randn(g, b, 4, 8, 8),
    lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 8), "prior_token_id": torch.randint(0, 16, (b, 16), generator=g),
                  "prior_token_drop": torch.zeros(b, dtype=torch.bool),
                  "target_size": torch.tensor([[16.0, 16.0]] * b), "crop_coords": torch.zeros(b, 2)})


def _krea_positions(text: int, h: int, w: int) -> torch.Tensor:
    positions = torch.zeros(text + h * w, 3)
    positions[text:, 1] = torch.arange(h).repeat_interleave(w).float()
    positions[text:, 2] = torch.arange(w).repeat(h).float()
    return positions


def _hunyuan_dit_rope():
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    return get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4))


_add("EasyAnimateTransformer3DModel",
     lambda: diffusers.EasyAnimateTransformer3DModel(
         attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2, num_layers=2, out_channels=4,
         patch_size=2, sample_height=8, sample_width=8, text_embed_dim=16, time_embed_dim=8),
     lambda b, g: _randn(g, b, 4, 2, 8, 8), lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 16)})
_add("BriaFiboTransformer2DModel",
     lambda: diffusers.BriaFiboTransformer2DModel(
         patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
         joint_attention_dim=32, text_encoder_dim=16, axes_dims_rope=[0, 4, 4]),
     lambda b, g: _randn(g, b, 16, 4),
     lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 32), "img_ids": _flux_ids(4, 4), "txt_ids": torch.zeros(6, 3),
                   "text_encoder_layers": [_randn(g, b, 6, 16), _randn(g, b, 6, 16)]})
_add("HunyuanVideoFramepackTransformer3DModel",  # two frames everywhere: its frame indices are unbatched, 1-D
     lambda: diffusers.HunyuanVideoFramepackTransformer3DModel(
         in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1, num_single_layers=1,
         num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
         pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), has_image_proj=True, image_proj_dim=16,
         has_clean_x_embedder=True),
     lambda b, g: _randn(g, b, 4, 2, 4, 4),
     lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 16), "pooled_projections": _randn(g, b, 8),
                   "encoder_attention_mask": torch.ones(b, 6), "guidance": torch.full((b,), 3500.0),
                   "image_embeds": _randn(g, b, 4, 16), "indices_latents": torch.arange(2.0),
                   "latents_clean": _randn(g, b, 4, 2, 4, 4), "indices_latents_clean": torch.zeros(2),
                   "latents_history_2x": _randn(g, b, 4, 2, 4, 4), "indices_latents_history_2x": torch.zeros(2),
                   "latents_history_4x": _randn(g, b, 4, 8, 4, 4), "indices_latents_history_4x": torch.zeros(8)})
_add("Flux3Transformer2DModel",
     lambda: diffusers.Flux3Transformer2DModel(
         in_channels=4, cond_in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
         num_attention_heads=2, joint_attention_dim=32, timestep_channels=16, axes_dims_rope=(4, 4, 4, 4)),
     lambda b, g: _randn(g, b, 16, 4),
     lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 32), "img_ids": _ids4(4, 4), "txt_ids": torch.zeros(6, 4)},
     timestep_scale=1000.0)
_add("Krea2Transformer2DModel",
     lambda: diffusers.Krea2Transformer2DModel(
         in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, num_key_value_heads=1,
         intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=2, text_num_attention_heads=2,
         text_num_key_value_heads=1, text_intermediate_size=16, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
         axes_dims_rope=(4, 2, 2)),
     lambda b, g: _randn(g, b, 16, 4),
     lambda b, g: {"encoder_hidden_states": _randn(g, b, 4, 2, 16), "position_ids": _krea_positions(4, 4, 4)},
     timestep_scale=1000.0)
_add("PRXTransformer2DModel",
     lambda: diffusers.PRXTransformer2DModel(
         in_channels=4, patch_size=2, context_in_dim=16, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=2,
         axes_dim=[8, 8]),
     lambda b, g: _randn(g, b, 4, 8, 8), lambda b, g: {"encoder_hidden_states": _randn(g, b, 6, 16)},
     timestep_scale=1000.0)
_add("HunyuanDiT2DModel",
     lambda: diffusers.HunyuanDiT2DModel(
         sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
         cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=8, hidden_size=16, text_len=4,
         text_len_t5=4),
     lambda b, g: _randn(g, b, 4, 8, 8),
     lambda b, g: {"encoder_hidden_states": _randn(g, b, 4, 16), "text_embedding_mask": torch.ones(b, 4),
                   "encoder_hidden_states_t5": _randn(g, b, 4, 16), "text_embedding_mask_t5": torch.ones(b, 4),
                   "image_meta_size": torch.tensor([[16.0, 16.0, 16.0, 16.0, 0.0, 0.0]] * b),
                   "style": torch.zeros(b, dtype=torch.long), "image_rotary_emb": _hunyuan_dit_rope()},
     scheduler=_dpm)
_add("PriorTransformer",
     lambda: diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=4, num_layers=2, embedding_dim=8,
                                        num_embeddings=7, additional_embeddings=4),
     lambda b, g: _randn(g, b, 8),
     lambda b, g: {"proj_embedding": _randn(g, b, 8), "encoder_hidden_states": _randn(g, b, 7, 8)}, scheduler=_dpm)
