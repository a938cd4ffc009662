"""Train the embedded "digits" text-to-image pipeline (PixArt-alpha architecture) on the bundled sklearn digits.

    python -m cachekit.zoo.train_digits --out cachekit/zoo/digits

Three stages, all seeded, on CPU with 2 threads:

1. a small ``AutoencoderKL`` (16x16x3 images <-> 8x8x4 latents) trained on the training split;
2. the latents of the training split, standardised per channel; the shift and scale are folded exactly into the VAE's
   1x1 ``quant_conv`` / ``post_quant_conv`` (PixArt's pipeline has no ``shift_factor``), so ``scaling_factor`` is 1;
3. a tiny ``T5EncoderModel`` and a 28-block ``PixArtTransformer2DModel`` trained jointly with the epsilon-prediction
   objective (linear betas 1e-4..0.02, 1000 steps, min-SNR-5 weighting, 10 % caption dropout for classifier-free
   guidance, EMA of the weights).

The result is written with ``PixArtAlphaPipeline.save_pretrained`` (transformer and VAE as fp16 safetensors; diffusers
loads them as float32; the T5 stays float32 because transformers >= 5 would otherwise load it as fp16).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._text import build_word_tokenizer, patch_tokenizer_class
from .digits_data import IMAGE_SIZE, TEMPLATES, caption_for, load_split

MAX_SEQUENCE_LENGTH = 16
TEXT_DIM = 64
WIDTH = 64
HEADS = 4
NUM_LAYERS = 28
LATENT_CHANNELS = 4
LATENT_SIZE = IMAGE_SIZE // 2


def build_tokenizer():
    return build_word_tokenizer(["<pad>", "</s>", "<unk>"], eos="</s>", pad="<pad>", unk="<unk>",
                                model_max_length=MAX_SEQUENCE_LENGTH)


def build_text_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(cfg)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                         latent_channels=LATENT_CHANNELS, norm_num_groups=16, sample_size=IMAGE_SIZE)


def build_transformer(zero_init_cross_attention: bool = True):
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=WIDTH // HEADS, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, num_layers=NUM_LAYERS, cross_attention_dim=WIDTH, sample_size=LATENT_SIZE,
        patch_size=2, caption_channels=TEXT_DIM, norm_type="ada_norm_single", norm_elementwise_affine=False,
        norm_eps=1e-6, num_embeds_ada_norm=1000, attention_bias=True, activation_fn="gelu-approximate",
        dropout=0.0)
    # DiT-style identity start: every block's output projections and the final projection start at zero.
    with torch.no_grad():
        for block in model.transformer_blocks:
            outs = (block.attn1.to_out[0], block.ff.net[2]) + ((block.attn2.to_out[0],) if zero_init_cross_attention else ())
            for lin in outs:
                lin.weight.zero_()
                lin.bias.zero_()
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()
    return model


def build_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                       beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
                                       prediction_type=prediction_type, lower_order_final=True)


def _to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int, kl_weight: float):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    x_all = _to_unit(images)
    vae.train()
    bar = tqdm(range(steps), desc="vae", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(x_all), (batch_size,), generator=gen)
        x = x_all[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(rec=f"{rec_loss.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval()
    with torch.no_grad():
        post = vae.encode(x_all).latent_dist
        rec = vae.decode(post.mode()).sample.clamp(-1, 1)
        mse = F.mse_loss((rec + 1) / 2, (x_all + 1) / 2).item()
    return post.mode(), {"vae_psnr_db": 10 * math.log10(1.0 / max(mse, 1e-12)), "vae_final_rec_loss": rec_loss.item()}


@torch.no_grad()
def standardize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Fold per-channel standardisation of the latents into the VAE's 1x1 quant convs (exact; no shift_factor).

    PixArt's pipeline only divides by ``scaling_factor``; it has no shift. These latents have a large mean offset, so
    the encoder's ``quant_conv`` is rewritten to emit (z - m) / s per channel and ``post_quant_conv`` to undo it. The
    VAE's input/output mapping is unchanged; ``scaling_factor`` stays 1.0.
    """
    c = latents.shape[1]
    m = latents.mean(dim=(0, 2, 3))
    s = latents.std(dim=(0, 2, 3))
    qc, pq = vae.quant_conv, vae.post_quant_conv
    qc.weight[:c] /= s.view(-1, 1, 1, 1)
    qc.bias[:c] = (qc.bias[:c] - m) / s
    qc.bias[c:] -= 2 * torch.log(s)
    pq.bias += pq.weight[:, :, 0, 0] @ m
    pq.weight *= s.view(1, -1, 1, 1)
    return (latents - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)


class WeightEMA:
    def __init__(self, modules, decay: float):
        self.decay = decay
        self.shadow = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
        self.modules = modules

    @torch.no_grad()
    def update(self, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        for s, m in zip(self.shadow, self.modules):
            for ps, pm in zip(s.parameters(), m.parameters()):
                ps.lerp_(pm, 1 - d)


def train_diffusion(transformer, text_encoder, tokenizer, latents, labels, steps, batch_size, lr, seed,
                    cfg_dropout=0.1, ema_decay=0.999, min_snr_gamma=5.0, on_checkpoint=None, checkpoint_every=0,
                    prediction_type="epsilon"):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    betas = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # min-SNR weighting (Hang et al. 2023): min(snr, gamma)/snr for epsilon, min(snr, gamma)/(snr + 1) for v.
    weight_t = torch.clamp(snr, max=min_snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)

    # Every caption is tokenised once, exactly as the pipeline does it (padding to MAX_SEQUENCE_LENGTH).
    captions = [""] + [caption_for(d, t) for d in range(10) for t in range(len(TEMPLATES))]
    tok = tokenizer([c.lower().strip() for c in captions], padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                    truncation=True, add_special_tokens=True, return_tensors="pt")
    ids_all, mask_all = tok.input_ids, tok.attention_mask

    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = min(200, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    ema = WeightEMA([transformer, text_encoder], ema_decay)
    transformer.train()
    text_encoder.train()
    n_templates = len(TEMPLATES)
    bar = tqdm(range(steps), desc="diffusion", dynamic_ncols=True)
    running = None
    for step in bar:
        idx = torch.randint(len(latents), (batch_size,), generator=gen)
        x0 = latents[idx]
        lab = labels[idx]
        cap_idx = torch.tensor([1 + int(l) * n_templates + rng.randrange(n_templates) for l in lab.tolist()])
        drop = torch.rand(batch_size, generator=gen) < cfg_dropout
        cap_idx = torch.where(drop, torch.zeros_like(cap_idx), cap_idx)
        ids, mask = ids_all[cap_idx], mask_all[cap_idx]
        t = torch.randint(0, 1000, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        emb = text_encoder(ids, attention_mask=mask)[0]
        pred = transformer(xt, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t,
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        loss = (per * weight_t[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update(step)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            on_checkpoint(step + 1, ema.shadow[0], ema.shadow[1])
    transformer_ema, text_encoder_ema = ema.shadow
    return transformer_ema, text_encoder_ema, {"diffusion_final_loss_ema": running}


def _fix_tokenizer_class(out: Path):
    """Record the tokenizer as ``PreTrainedTokenizerFast`` (a name transformers 4.x and 5.x both know)."""
    mi = out / "model_index.json"
    index = json.loads(mi.read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    mi.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    patch_tokenizer_class(out / "tokenizer")


def save_pipeline(out, tokenizer, text_encoder, vae, transformer, prediction_type="epsilon"):
    """Write the pipeline with ``save_pretrained`` (fp16 transformer and VAE, fp32 text encoder)."""
    from diffusers import PixArtAlphaPipeline

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=copy.deepcopy(text_encoder).float(),
                               vae=copy.deepcopy(vae).half(), transformer=copy.deepcopy(transformer).half(),
                               scheduler=build_scheduler(prediction_type))
    pipe.save_pretrained(out, safe_serialization=True)
    _fix_tokenizer_class(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "digits"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=250)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="also write the EMA pipeline to --out every N steps (to evaluate while training)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon")
    p.add_argument("--vae-from", help="reuse the VAE of an earlier run of this script (a pipeline folder) instead of "
                                      "training it again; same seed and settings give the same VAE")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t0 = time.perf_counter()

    images, labels = load_split("train")
    tokenizer = build_tokenizer()
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae", dtype=torch.float32).eval()
        with torch.no_grad():
            latents = vae.encode(_to_unit(images)).latent_dist.mode()
        info = json.loads((Path(args.vae_from) / "training.json").read_text())
        info = {k: v for k, v in info.items() if k.startswith("vae")}
        info["vae_from"] = str(args.vae_from)
    else:
        vae = build_vae()
        latents, info = train_vae(vae, images, args.vae_steps, args.batch_size, args.vae_lr, args.seed,
                                  args.kl_weight)
        latents = standardize_latents(vae, latents)
        vae.register_to_config(scaling_factor=1.0)
    with torch.no_grad():  # the folded VAE must give the same images and the standardised latents
        x = _to_unit(images[:256])
        z = vae.encode(x).latent_dist.mode()
        assert torch.allclose(z, latents[:256], atol=1e-3), "latent standardisation fold failed"
    info["vae_minutes"] = (time.perf_counter() - t0) / 60
    print(f"vae: psnr {info['vae_psnr_db']:.1f} dB, latents standardised per channel (mean 0, std 1)")

    t1 = time.perf_counter()
    torch.manual_seed(args.seed + 1)
    text_encoder = build_text_encoder(len(tokenizer))
    transformer = build_transformer()

    def checkpoint(step, transformer_ema, text_encoder_ema):
        save_pipeline(args.out, tokenizer, text_encoder_ema, vae, transformer_ema, args.prediction_type)
        (Path(args.out) / "training.json").write_text(json.dumps({"checkpoint_step": step, **info}, indent=2) + "\n")
        tqdm.write(f"checkpoint at step {step} written to {args.out}")

    transformer, text_encoder, dinfo = train_diffusion(transformer, text_encoder, tokenizer, latents, labels,
                                                       args.steps, args.batch_size, args.lr, args.seed,
                                                       on_checkpoint=checkpoint, checkpoint_every=args.checkpoint_every,
                                                       prediction_type=args.prediction_type)
    info.update(dinfo)
    info["diffusion_minutes"] = (time.perf_counter() - t1) / 60

    save_pipeline(args.out, tokenizer, text_encoder, vae, transformer, args.prediction_type)
    info.update({"args": vars(args), "total_minutes": (time.perf_counter() - t0) / 60,
                 "train_images": len(images), "torch": torch.__version__})
    (Path(args.out) / "training.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    print(json.dumps(info, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
