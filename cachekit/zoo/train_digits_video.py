"""Train the embedded "digits-video" text-to-video pipeline (a stock ``WanPipeline``) on moving sklearn digits.

    python -m cachekit.zoo.train_digits_video --out /tmp/digits_video --minutes 60

The clips come from :mod:`cachekit.zoo.digits_video_data` (9 frames of 32x32, real digit samples of the image
model's training split moving left/right/up/down). Every component is a stock diffusers / transformers class built
from a config written here, so nothing is downloaded and ``WanPipeline.from_pretrained(out)`` loads the result:

1. a word-level tokenizer over the caption words (:func:`cachekit.zoo._text.build_word_tokenizer`) and a tiny
   ``UMT5EncoderModel`` (the encoder family of Wan);
2. a small ``AutoencoderKLWan`` (two spatial and two temporal down-samplings: 9x32x32x3 frames <-> 3x8x8x8 latents)
   trained on whole 9-frame clips (the second 4-frame chunk decodes from features cached on the first, so a
   shorter crop leaves it untrained); its ``latents_mean`` / ``latents_std`` config, which ``WanPipeline``
   applies when decoding, are set to the per-channel statistics of the training latents;
3. a ``WanTransformer3DModel`` (12 blocks, width 96) and the text encoder trained jointly with Wan's flow-matching
   objective (``x_t = (1 - s) x_0 + s e``, target ``e - x_0``, timestep ``1000 s``) and **diffusion forcing**: half
   of the clips get one noise level for all frames (what a whole-clip generation sees), the other half an
   independent noise level per latent frame, passed as the transformer's per-token timestep ``[batch, tokens]``
   (``WanTransformer3DModel.forward`` takes a 2-D timestep, the Wan 2.2 TI2V path). The same weights then generate
   whole clips with the stock pipeline and denoise windows whose frames sit at staggered noise levels.
   10 % caption dropout for classifier-free guidance, EMA of the weights;
4. a ``FlowMatchEulerDiscreteScheduler`` (``shift`` 1): its per-step update is one line, so a runner can keep one
   copy per latent frame.

Stages are seeded and show tqdm progress; ``--minutes`` is a wall-clock budget shared by the stages (the VAE gets
``--vae-fraction`` of it) and the step counts are upper bounds. The result is written with
``WanPipeline.save_pretrained`` (float32; the folder must stay within ``--max-mb``, 15 MB by default) together with
``training.json`` (losses, timings, arguments).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import DIGITS_VIDEO_DEFAULTS
from ._text import build_word_tokenizer, patch_tokenizer_class
from .digits_video_data import (
    DIRECTIONS,
    NUM_FRAMES,
    VIDEO_TEMPLATES,
    clips,
    video_caption_for,
    video_vocabulary,
)

MAX_SEQUENCE_LENGTH = 16
TEXT_DIM = 64
LATENT_CHANNELS = 8
VAE_BASE_DIM = 16
SPATIAL_FACTOR = 4
TEMPORAL_FACTOR = 4
HEADS = 6
HEAD_DIM = 16
NUM_LAYERS = 12
FFN_DIM = 256
FLOW_SHIFT = 1.0
MAX_MB = 15.0
#: Recommended call settings for the trained pipeline (``pipe(prompt, **VIDEO_DEFAULTS)``): the zoo's.
VIDEO_DEFAULTS = DIGITS_VIDEO_DEFAULTS


# ------------------------------------------------------------------------------------------------------ components
def build_tokenizer():
    """Word-level tokenizer over every image and video caption word (T5 specials: pad 0, eos 1, unk 2)."""
    return build_word_tokenizer(["<pad>", "</s>", "<unk>"], eos="</s>", pad="<pad>", unk="<unk>",
                                append=video_vocabulary(), model_max_length=MAX_SEQUENCE_LENGTH)


def build_text_encoder(vocab_size: int):
    """A 2-layer ``UMT5EncoderModel`` of width 64 (Wan's text encoder family), from a config: builds offline."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16,
                     feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                     decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
    return UMT5EncoderModel(cfg)


def build_vae(latent_channels: int = LATENT_CHANNELS):
    """A small ``AutoencoderKLWan``: 2 spatial + 2 temporal down-samplings (4x / 4x), 8 latent channels by default.

    ``scale_factor_spatial`` / ``scale_factor_temporal`` in the config match the architecture (``WanPipeline``
    reads them to size its latents). ``latents_mean`` / ``latents_std`` start at 0 / 1 and are set after training.
    """
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=VAE_BASE_DIM, z_dim=latent_channels, dim_mult=[1, 2, 2], num_res_blocks=1,
                            attn_scales=[], temperal_downsample=[True, True], dropout=0.0,
                            latents_mean=[0.0] * latent_channels, latents_std=[1.0] * latent_channels,
                            scale_factor_temporal=TEMPORAL_FACTOR, scale_factor_spatial=SPATIAL_FACTOR)


def build_transformer(num_layers: int = NUM_LAYERS, zero_init: bool = True, latent_channels: int = LATENT_CHANNELS):
    """A ``WanTransformer3DModel`` (patch (1,2,2), 6 heads of 16, 12 blocks by default), identity at start.

    RoPE splits the head dim 16 into time 8 / height 4 / width 4 (all even); ``rope_max_seq_len`` 32 covers the
    patched frames, height and width of any clip up to 125 frames of 32x32.
    """
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                  in_channels=latent_channels, out_channels=latent_channels, text_dim=TEXT_DIM,
                                  freq_dim=64, ffn_dim=FFN_DIM, num_layers=num_layers, cross_attn_norm=True,
                                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    if zero_init:  # DiT-style identity start: every block's output projections and the final projection at zero
        with torch.no_grad():
            for block in model.blocks:
                for lin in (block.attn1.to_out[0], block.attn2.to_out[0], block.ffn.net[2]):
                    lin.weight.zero_()
                    lin.bias.zero_()
            model.proj_out.weight.zero_()
            model.proj_out.bias.zero_()
    return model


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)


def build_pipeline(tokenizer=None, text_encoder=None, vae=None, transformer=None, num_layers: int = NUM_LAYERS):
    """A stock ``WanPipeline`` of the given (or freshly built, untrained) components."""
    from diffusers import WanPipeline

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    return WanPipeline(tokenizer=tokenizer,
                       text_encoder=text_encoder if text_encoder is not None else build_text_encoder(len(tokenizer)),
                       vae=vae if vae is not None else build_vae(),
                       transformer=transformer if transformer is not None else build_transformer(num_layers),
                       scheduler=build_scheduler())


def folder_mb(folder) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2 ** 20


def save_pipeline(out, pipe, max_mb: float = MAX_MB) -> float:
    """``save_pretrained`` (float32 safetensors), tokenizer recorded as ``PreTrainedTokenizerFast``; returns MB.

    Raises if the folder is larger than ``max_mb``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    mi = out / "model_index.json"
    index = json.loads(mi.read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    mi.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    patch_tokenizer_class(out / "tokenizer")
    mb = folder_mb(out)
    if mb > max_mb:
        raise RuntimeError(f"pipeline at {out} is {mb:.1f} MB, over the {max_mb} MB budget")
    return mb


# ------------------------------------------------------------------------------------------------------ training
class _Budget:
    """A wall-clock deadline; ``None`` minutes means no deadline (step counts alone stop the stage)."""

    def __init__(self, minutes: Optional[float]):
        self.start = time.perf_counter()
        self.end = None if minutes is None else self.start + 60 * minutes

    def over(self) -> bool:
        return self.end is not None and time.perf_counter() > self.end

    def progress(self, step: int, steps: int) -> float:
        """How far the stage is, 0..1: the larger of the step fraction and the time fraction (drives the LR decay)."""
        frac = step / max(steps, 1)
        if self.end is not None:
            frac = max(frac, (time.perf_counter() - self.start) / (self.end - self.start))
        return min(frac, 1.0)


def _lr_factor(step: int, warmup: int, progress: float) -> float:
    """Linear warm-up, then cosine decay to 10 % over the stage's progress (steps or time, whichever is further)."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class _RawDecoderOutput:
    """The decoder's outputs before ``AutoencoderKLWan._decode``'s final ``clamp(-1, 1)``, captured by a forward hook.

    Training through the clamp kills the gradient of every pixel the decoder overshoots (background pixels sit at
    exactly -1, so an early overshoot there is permanent and the VAE collapses to a black canvas). The stock
    ``vae.decode`` still runs; the hook only keeps the per-chunk outputs it concatenates, so the loss can use them.
    """

    def __init__(self, vae):
        self.chunks = []
        self.handle = vae.decoder.register_forward_hook(lambda _m, _i, out: self.chunks.append(out))

    def pop(self) -> torch.Tensor:
        out, self.chunks = torch.cat(self.chunks, dim=2), []
        return out

    def remove(self):
        self.handle.remove()


def train_vae(vae, steps: int, batch_size: int, lr: float, seed: int, kl_weight: float, minutes=None,
              crop_frames: int = NUM_FRAMES) -> Dict[str, float]:
    """Reconstruction (MSE + L1/2) + small KL on seeded training clips, cropped to ``crop_frames`` frames.

    Whole 9-frame clips by default (1 + 4 + 4 frames): Wan's causal VAE encodes and decodes the second 4-frame chunk
    from the features it cached on the first, a third case besides the first frame and the first chunk. A VAE trained
    on 5-frame crops (1 + 4) never sees that case: it reconstructed frames 0-4 at 27-30 dB and frames 5-8 at
    16-20 dB, and the digit of those frames was read right in only 33-76% of them. Fine-tuning that VAE 40 steps on
    whole clips raised frames 5-8 to 23-25 dB and the digit reads of all frames from 76% to 86%; 40 steps on 5-frame
    crops left them at 76%. Shorter crops start at a seeded frame, so every position of the motion is a first frame
    sometimes.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    budget = _Budget(minutes)
    raw = _RawDecoderOutput(vae)
    vae.train()
    bar = tqdm(range(steps), desc="vae", dynamic_ncols=True)
    losses, done, t0 = [], 0, time.perf_counter()
    for step in bar:
        lr_now = lr * _lr_factor(step, 20, budget.progress(step, steps))
        for g in opt.param_groups:
            g["lr"] = lr_now
        batch = clips("train", batch_size, seed=seed * 1_000_003 + step)
        x = batch.as_unit()  # [B, 3, F, H, W]
        start = int(torch.randint(0, x.shape[2] - crop_frames + 1, (1,), generator=gen))
        x = x[:, :, start:start + crop_frames]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        vae.decode(z)
        rec = raw.pop()  # unclamped
        rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(rec_loss.item())
        done = step + 1
        if step % 5 == 0:
            bar.set_postfix(rec=f"{rec_loss.item():.4f}", kl=f"{kl.item():.2f}")
        if budget.over():
            tqdm.write(f"vae: time budget reached after {done} steps")
            break
    bar.close()
    raw.remove()
    vae.eval()
    secs = time.perf_counter() - t0
    return {"vae_steps": done, "vae_sec_per_step": secs / max(done, 1), "vae_first_rec_loss": losses[0],
            "vae_final_rec_loss": sum(losses[-10:]) / len(losses[-10:])}


@torch.no_grad()
def vae_psnr(vae, n: int = 64, seed: int = 12345, split: str = "heldout") -> float:
    """PSNR (dB, frames in [0, 1]) of full 9-frame clips through encode (mode) and decode."""
    x = clips(split, n, seed=seed).as_unit()
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    mse = F.mse_loss((rec + 1) / 2, (x + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def encode_pool(vae, n: int, seed: int, batch_size: int = 64) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` training clips encoded once (posterior mode): ``latents [n, C, T, h, w]``, labels, direction ids."""
    lat, labels, dirs = [], [], []
    for i in tqdm(range(0, n, batch_size), desc="encode", dynamic_ncols=True):
        batch = clips("train", min(batch_size, n - i), seed=seed * 7919 + 1 + i // batch_size)
        lat.append(vae.encode(batch.as_unit()).latent_dist.mode())
        labels.append(batch.labels)
        dirs.append(batch.directions)
    return torch.cat(lat), torch.cat(labels), torch.cat(dirs)


@torch.no_grad()
def set_latent_stats(vae, latents: torch.Tensor) -> torch.Tensor:
    """Write per-channel mean/std of ``latents`` into the VAE config (``WanPipeline`` un-normalises with them)."""
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])
    return (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)


def caption_table(tokenizer):
    """Token ids and masks of ``""`` (row 0) and every (digit, direction, template) caption, as the pipeline pads."""
    caps = [""] + [video_caption_for(d, k, t) for d in range(10) for k in range(len(DIRECTIONS))
                   for t in range(len(VIDEO_TEMPLATES))]
    tok = tokenizer(caps, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    return tok.input_ids, tok.attention_mask


def encode_text(text_encoder, ids, mask):
    """What ``WanPipeline._get_t5_prompt_embeds`` gives: hidden states with the padded positions zeroed."""
    emb = text_encoder(ids, mask).last_hidden_state
    return emb * mask.unsqueeze(-1).to(emb.dtype)


def frame_sigmas(batch_size: int, frames: int, gen: torch.Generator, p_shared: float = 0.5) -> torch.Tensor:
    """Noise levels ``[B, T]`` in (0, 1): one shared level per clip for ``p_shared`` of the clips, else one per frame.

    Shared levels are what a whole-clip generation sees; independent levels (diffusion forcing) cover every
    staggered window a frame-by-frame stream can present.
    """
    shared = torch.rand(batch_size, 1, generator=gen).expand(-1, frames)
    indep = torch.rand(batch_size, frames, generator=gen)
    use_shared = torch.rand(batch_size, 1, generator=gen) < p_shared
    return torch.where(use_shared, shared, indep).clamp(1e-3, 1.0)


def per_token_timesteps(sigmas: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """``[B, T]`` frame noise levels -> ``[B, T * tokens_per_frame]`` timesteps (``1000 sigma``), frame-major."""
    return (sigmas * 1000.0).repeat_interleave(tokens_per_frame, dim=1)


def train_transformer(transformer, text_encoder, tokenizer, latents, labels, dirs, steps, batch_size, lr, seed,
                      cfg_dropout=0.1, ema_decay=0.999, p_shared=0.5, minutes=None, eval_every=0):
    """Flow matching with diffusion forcing; returns the EMA copies and the losses.

    Every ``eval_every`` steps (0: never) the loss of a fixed held-out-seed batch is printed for shared and for
    independent noise levels, with the EMA weights.
    """
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    ids_all, mask_all = caption_table(tokenizer)
    n_t, n_dir = len(VIDEO_TEMPLATES), len(DIRECTIONS)
    p_t, p_h, p_w = transformer.config.patch_size
    _, _, frames, h, w = latents.shape
    tokens_per_frame = (h // p_h) * (w // p_w)

    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, min(200, steps // 10))

    from .train_digits import WeightEMA

    ema = WeightEMA([transformer, text_encoder], ema_decay)
    budget = _Budget(minutes)

    def lr_at(s):
        return lr * _lr_factor(s, warmup, budget.progress(s, steps))

    # A fixed probe batch (its own seed) to follow the loss without the noise of random batches.
    pg = torch.Generator().manual_seed(seed + 999)
    probe_idx = torch.randint(len(latents), (64,), generator=pg)
    probe = {"x0": latents[probe_idx], "noise": torch.randn(latents[probe_idx].shape, generator=pg),
             "cap": 1 + (labels[probe_idx] * n_dir + dirs[probe_idx]) * n_t,
             "shared": frame_sigmas(64, frames, pg, p_shared=1.0), "indep": frame_sigmas(64, frames, pg, p_shared=0.0)}

    @torch.no_grad()
    def probe_loss(tr, te, kind):
        s = probe[kind]
        xt = (1 - s.view(64, 1, frames, 1, 1)) * probe["x0"] + s.view(64, 1, frames, 1, 1) * probe["noise"]
        emb = encode_text(te, ids_all[probe["cap"]], mask_all[probe["cap"]])
        pred = tr(xt, timestep=per_token_timesteps(s, tokens_per_frame), encoder_hidden_states=emb,
                  return_dict=False)[0]
        return F.mse_loss(pred, probe["noise"] - probe["x0"]).item()

    history = []
    transformer.train()
    text_encoder.train()
    bar = tqdm(range(steps), desc="transformer", dynamic_ncols=True)
    running, done, t0 = None, 0, time.perf_counter()
    first = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = torch.randint(len(latents), (batch_size,), generator=gen)
        x0 = latents[idx]
        cap = torch.tensor([1 + (int(l) * n_dir + int(d)) * n_t + rng.randrange(n_t)
                            for l, d in zip(labels[idx].tolist(), dirs[idx].tolist())])
        drop = torch.rand(batch_size, generator=gen) < cfg_dropout
        cap = torch.where(drop, torch.zeros_like(cap), cap)
        sig = frame_sigmas(batch_size, frames, gen, p_shared)
        noise = torch.randn(x0.shape, generator=gen)
        s5 = sig.view(batch_size, 1, frames, 1, 1)
        xt = (1 - s5) * x0 + s5 * noise
        emb = encode_text(text_encoder, ids_all[cap], mask_all[cap])
        pred = transformer(xt, timestep=per_token_timesteps(sig, tokens_per_frame), encoder_hidden_states=emb,
                           return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        done = step + 1
        first = loss.item() if first is None else first
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr_at(step):.2e}")
        if eval_every and done % eval_every == 0:
            rec = {"step": done, "seconds": round(time.perf_counter() - t0, 1), "train_loss_ema": running,
                   "probe_shared": probe_loss(*ema.shadow, "shared"), "probe_indep": probe_loss(*ema.shadow, "indep")}
            history.append(rec)
            tqdm.write(json.dumps(rec))
        if budget.over():
            tqdm.write(f"transformer: time budget reached after {done} steps")
            break
    bar.close()
    secs = time.perf_counter() - t0
    info = {"transformer_steps": done, "transformer_sec_per_step": secs / max(done, 1),
            "transformer_first_loss": first, "transformer_final_loss_ema": running,
            "probe_shared_final": probe_loss(*ema.shadow, "shared"), "probe_indep_final": probe_loss(*ema.shadow, "indep"),
            "history": history}
    transformer_ema, text_encoder_ema = ema.shadow
    return transformer_ema, text_encoder_ema, info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (a WanPipeline save_pretrained folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=60.0,
                   help="wall-clock budget for all stages together (0: none, the step counts alone stop the stages)")
    p.add_argument("--vae-fraction", type=float, default=0.25, help="share of --minutes for the VAE")
    p.add_argument("--vae-steps", type=int, default=2000, help="upper bound; the budget usually stops it first")
    p.add_argument("--vae-batch-size", type=int, default=12,
                   help="clips per VAE step (12 whole clips: about the frames of the former 16 five-frame crops)")
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-crop-frames", type=int, default=NUM_FRAMES,
                   help=f"frames per VAE training clip (4k+1; default {NUM_FRAMES}, the whole clip)")
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--latent-channels", type=int, default=LATENT_CHANNELS)
    p.add_argument("--pool", type=int, default=8192, help="training clips encoded once for the transformer")
    p.add_argument("--steps", type=int, default=20000, help="upper bound; the budget usually stops it first")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--num-layers", type=int, default=NUM_LAYERS)
    p.add_argument("--p-shared", type=float, default=0.5, help="share of clips with one noise level for all frames")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--max-mb", type=float, default=MAX_MB)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.num_layers < 8:
        p.error("--num-layers must be at least 8 (the schedule space needs blocks)")
    if args.vae_crop_frames % 4 != 1 or not 1 <= args.vae_crop_frames <= NUM_FRAMES:
        p.error(f"--vae-crop-frames must be 4k+1 and at most {NUM_FRAMES}, got {args.vae_crop_frames}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t0 = time.perf_counter()
    minutes = args.minutes if args.minutes > 0 else None
    total = _Budget(minutes)

    tokenizer = build_tokenizer()
    vae = build_vae(args.latent_channels)
    info = train_vae(vae, args.vae_steps, args.vae_batch_size, args.vae_lr, args.seed, args.kl_weight,
                     minutes=None if minutes is None else minutes * args.vae_fraction,
                     crop_frames=args.vae_crop_frames)
    info["vae_psnr_heldout_db"] = vae_psnr(vae)
    info["vae_minutes"] = (time.perf_counter() - t0) / 60
    print(f"vae: held-out psnr {info['vae_psnr_heldout_db']:.1f} dB after {info['vae_steps']} steps")

    t1 = time.perf_counter()
    latents, labels, dirs = encode_pool(vae, args.pool, args.seed)
    latents = set_latent_stats(vae, latents)
    info["encode_minutes"] = (time.perf_counter() - t1) / 60

    t2 = time.perf_counter()
    torch.manual_seed(args.seed + 1)
    text_encoder = build_text_encoder(len(tokenizer))
    transformer = build_transformer(args.num_layers, latent_channels=args.latent_channels)
    left = None if total.end is None else max(0.5, (total.end - time.perf_counter()) / 60 - 0.5)  # 30 s to save
    transformer, text_encoder, tinfo = train_transformer(
        transformer, text_encoder, tokenizer, latents, labels, dirs, args.steps, args.batch_size, args.lr, args.seed,
        p_shared=args.p_shared, minutes=left, eval_every=args.eval_every)
    info.update(tinfo)
    info["transformer_minutes"] = (time.perf_counter() - t2) / 60

    pipe = build_pipeline(tokenizer, text_encoder.eval(), vae.eval(), transformer.eval())
    mb = save_pipeline(args.out, pipe, args.max_mb)
    info.update({"args": vars(args), "size_mb": mb, "total_minutes": (time.perf_counter() - t0) / 60,
                 "torch": torch.__version__, "threads": args.threads})
    (Path(args.out) / "training.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k != "history"}, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
