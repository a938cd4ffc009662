"""The digits-video data (moving real digits, captions, the held-out split) and the stock WanPipeline it trains."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from cachekit.zoo import digits_data
from cachekit.zoo import digits_video_data as vd
from cachekit.zoo.digits_video_data import DIRECTIONS, VIDEO_TEMPLATES, clips, video_caption_for


# ---------------------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("num_frames", [9, 13, 17])
def test_clips_have_wan_frame_counts_and_canvas(num_frames):
    c = clips("train", 6, seed=1, num_frames=num_frames)
    assert c.frames.dtype == torch.uint8
    assert c.frames.shape == (6, num_frames, 3, vd.CANVAS_SIZE, vd.CANVAS_SIZE)
    assert (num_frames - 1) % 4 == 0 and num_frames >= 9
    assert c.as_unit().shape == (6, 3, num_frames, vd.CANVAS_SIZE, vd.CANVAS_SIZE)
    assert float(c.as_unit().min()) >= -1 and float(c.as_unit().max()) <= 1
    # Every frame shows the whole digit: the real 16x16 sample, pasted where the motion puts it.
    digits, _, sample_idx = vd._split_samples("train")
    for i in range(len(c)):
        src = digits[(sample_idx == c.sample_index[i]).nonzero().item()]
        assert int(c.frames[i].flatten(1).sum(1).min()) == int(src.sum())


@pytest.mark.parametrize("num_frames", [0, 5, 8, 10, 12])
def test_bad_frame_counts_are_refused(num_frames):
    with pytest.raises(ValueError, match="4k\\+1"):
        clips("train", 2, seed=0, num_frames=num_frames)


def _centroids(frames):
    """Centre of mass ``(x, y)`` of each frame of ``[F, 3, H, W]``."""
    g = frames.float().mean(1)
    ys, xs = torch.meshgrid(torch.arange(g.shape[1]).float(), torch.arange(g.shape[2]).float(), indexing="ij")
    mass = g.sum((1, 2))
    return torch.stack([(g * xs).sum((1, 2)) / mass, (g * ys).sum((1, 2)) / mass], 1)


def test_the_digit_moves_the_way_the_caption_says():
    c = clips("heldout", 40, seed=2)
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    for i in range(len(c)):
        d = c.direction_names[i]
        cap = c.captions[i]
        label = int(c.labels[i])
        assert d in cap.split() or {"upward": "up", "downward": "down"}.get(cap.split()[-1]) == d
        assert str(label) in cap.split() or digits_data.NUMBER_WORDS[label] in cap.split()
        move = _centroids(c.frames[i])[-1] - _centroids(c.frames[i])[0]
        expect = torch.tensor(step[d], dtype=torch.float) * c.speeds[i] * (c.frames.shape[1] - 1)
        assert torch.allclose(move, expect, atol=1.01), (d, move, expect)
    assert set(c.direction_names) == set(DIRECTIONS)


def test_captions_name_digit_and_direction_in_several_phrasings():
    for label in range(10):
        for d in DIRECTIONS:
            caps = vd.all_video_captions(label, d)
            assert len(set(caps)) == len(VIDEO_TEMPLATES) >= 8
            for cap in caps:
                words = cap.split()
                assert str(label) in words or digits_data.NUMBER_WORDS[label] in words
                assert d in words or {"up": "upward", "down": "downward"}.get(d) in words
    assert video_caption_for(3, "left", 0) == "a handwritten 3 moving left"
    assert video_caption_for(3, "right", 1) == "the digit three drifting to the right"
    with pytest.raises(ValueError):
        video_caption_for(3, "sideways")
    with pytest.raises(ValueError):
        video_caption_for(10, "left")
    # the tokenizer's vocabulary holds every caption word, image captions included
    vocab = set(vd.video_vocabulary())
    assert set(digits_data.vocabulary()) <= vocab
    assert {"moving", "drifting", "left", "right", "up", "down", "upward", "downward"} <= vocab


def test_split_reuses_the_image_split_and_is_disjoint_by_digit_sample():
    _, labels = digits_data._raw_digits()
    train_idx, held_idx = digits_data._split_indices(labels)
    train = clips("train", 3000, seed=5)
    held = clips("heldout", 1000, seed=5)
    assert set(train.sample_index.tolist()) <= set(train_idx.tolist())
    assert set(held.sample_index.tolist()) <= set(held_idx.tolist())
    assert not set(train.sample_index.tolist()) & set(held.sample_index.tolist())
    assert len(set(held.sample_index.tolist())) > 0.9 * len(held_idx)  # held-out clips use the held-out samples
    assert torch.equal(held.labels, labels[held.sample_index])
    with pytest.raises(ValueError):
        clips("test", 2)


def test_clips_are_deterministic_by_seed():
    a, b, c = clips("train", 32, seed=7), clips("train", 32, seed=7), clips("train", 32, seed=8)
    assert torch.equal(a.frames, b.frames) and a.captions == b.captions and torch.equal(a.starts, b.starts)
    assert not torch.equal(a.frames, c.frames)
    assert len(set(a.captions)) > 16
    assert len(set(a.speeds.tolist())) > 1
    assert vd.video_prompts(20, seed=1) == vd.video_prompts(20, seed=1)


# ---------------------------------------------------------------------------------------------------------- model
def test_untrained_components_round_trip_through_stock_wan_pipeline(tmp_path):
    """Build the stock components from configs, save_pretrained, load with WanPipeline offline, generate 9 frames."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    from cachekit.zoo import train_digits_video as T

    torch.manual_seed(0)
    pipe = T.build_pipeline()
    assert pipe.transformer.config.num_layers >= 8
    mb = T.save_pipeline(tmp_path, pipe)
    assert mb <= 15.0

    loaded = WanPipeline.from_pretrained(str(tmp_path), local_files_only=True)
    assert isinstance(loaded.transformer, WanTransformer3DModel)
    assert isinstance(loaded.vae, AutoencoderKLWan)
    assert isinstance(loaded.scheduler, FlowMatchEulerDiscreteScheduler)
    assert type(loaded.text_encoder).__name__ == "UMT5EncoderModel"
    assert loaded.vae_scale_factor_spatial == 4 and loaded.vae_scale_factor_temporal == 4
    ids = loaded.tokenizer("a handwritten 3 moving to the left").input_ids
    assert loaded.tokenizer.unk_token_id not in ids

    kwargs = dict(height=32, width=32, num_frames=9, num_inference_steps=2, guidance_scale=4.0,
                  max_sequence_length=T.MAX_SEQUENCE_LENGTH, output_type="pt")
    out = loaded("a handwritten 3 moving left", generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert out.shape == (1, 9, 3, 32, 32)
    assert torch.isfinite(out).all()
    again = loaded("a handwritten 3 moving left", generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert torch.equal(out, again)
    latents = loaded("a handwritten 3 moving left", generator=torch.Generator().manual_seed(0),
                     **{**kwargs, "output_type": "latent"}).frames
    assert latents.shape == (1, T.LATENT_CHANNELS, 3, 8, 8)


def test_per_frame_timesteps_reach_the_transformer():
    """A 2-D (per-token) timestep equals the 1-D one when all frames share it, and changes only its own frame's
    conditioning otherwise: this is how diffusion forcing trains and how staggered windows are denoised."""
    from cachekit.zoo import train_digits_video as T

    torch.manual_seed(0)
    tr = T.build_transformer(num_layers=8, zero_init=False).eval()
    x = torch.randn(2, T.LATENT_CHANNELS, 3, 8, 8)
    emb = torch.randn(2, T.MAX_SEQUENCE_LENGTH, T.TEXT_DIM)
    per_frame = 16
    with torch.no_grad():
        a = tr(x, timestep=torch.tensor([300.0, 300.0]), encoder_hidden_states=emb, return_dict=False)[0]
        sig = torch.full((2, 3), 0.3)
        b = tr(x, timestep=T.per_token_timesteps(sig, per_frame), encoder_hidden_states=emb, return_dict=False)[0]
        assert torch.allclose(a, b, atol=1e-5)
        sig[:, 2] = 0.9
        c = tr(x, timestep=T.per_token_timesteps(sig, per_frame), encoder_hidden_states=emb, return_dict=False)[0]
    assert not torch.allclose(c, b, atol=1e-4)
    assert T.per_token_timesteps(sig, per_frame).shape == (2, 3 * per_frame)
    gen = torch.Generator().manual_seed(0)
    s = T.frame_sigmas(256, 3, gen, p_shared=0.5)
    shared = (s[:, :1] == s).all(1)
    assert 0.3 < shared.float().mean() < 0.7 and float(s.min()) > 0 and float(s.max()) <= 1


def test_vae_training_sees_the_decoder_output_before_the_clamp():
    """AutoencoderKLWan.decode clamps to [-1, 1]; the trainer's loss reads the raw decoder output (else the gradient
    of every overshooting pixel is zero and the VAE collapses to a black canvas). The stock decode is unchanged."""
    from cachekit.zoo import train_digits_video as T

    torch.manual_seed(0)
    vae = T.build_vae()
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(3.0)  # push every pixel past the clamp
    raw = T._RawDecoderOutput(vae)
    z = torch.randn(1, T.LATENT_CHANNELS, 3, 8, 8, requires_grad=True)
    out = vae.decode(z).sample
    unclamped = raw.pop()
    raw.remove()
    assert unclamped.shape == out.shape == (1, 3, 9, 32, 32)
    assert float(unclamped.detach().min()) > 1.0 and torch.equal(out, unclamped.clamp(-1, 1))
    unclamped.mean().backward()
    assert z.grad.abs().sum() > 0
    vae.decode(z.detach())
    assert raw.chunks == []  # removed: the hook keeps nothing afterwards


def test_vae_training_decodes_the_second_chunk_from_the_cached_first_one():
    """By default the VAE trains on whole 9-frame clips, so the decoder runs once per latent frame (first frame,
    first chunk, then the second chunk from the cached features): a 5-frame crop never trains that last case."""
    from cachekit.zoo import train_digits_video as T

    torch.manual_seed(0)
    vae = T.build_vae()
    calls = []
    handle = vae.decoder.register_forward_hook(lambda _m, _i, out: calls.append(out.shape[2]))
    info = T.train_vae(vae, steps=1, batch_size=1, lr=1e-3, seed=0, kl_weight=1e-4)
    handle.remove()
    assert info["vae_steps"] == 1
    assert len(calls) == 3 and sum(calls) == 9
    with pytest.raises(SystemExit):
        T.main(["--out", "unused", "--vae-crop-frames", "6"])


def test_trainer_runs_every_stage_and_saves_a_loadable_pipeline(tmp_path):
    """Two steps of each stage through the command line entry point: VAE, latent pool, diffusion forcing, save."""
    import json

    from diffusers import WanPipeline

    from cachekit.zoo import train_digits_video as T

    out = tmp_path / "model"
    T.main(["--out", str(out), "--minutes", "0", "--vae-steps", "2", "--pool", "16", "--steps", "3",
            "--batch-size", "4", "--eval-every", "3", "--num-layers", "8", "--threads", "1"])
    info = json.loads((out / "training.json").read_text())
    assert info["vae_steps"] == 2 and info["transformer_steps"] == 3 and info["size_mb"] <= 15
    assert len(info["history"]) == 1 and {"probe_shared", "probe_indep"} <= set(info["history"][0])
    pipe = WanPipeline.from_pretrained(str(out), local_files_only=True)
    assert len(pipe.vae.config.latents_std) == T.LATENT_CHANNELS
    assert all(s > 0 for s in pipe.vae.config.latents_std)
    assert pipe.transformer.config.num_layers == 8
    with pytest.raises(SystemExit):
        T.main(["--out", str(tmp_path / "x"), "--num-layers", "4"])


def test_the_zoo_defaults_match_what_the_trainer_trains():
    from cachekit import zoo
    from cachekit.zoo import digits_video_data as data
    from cachekit.zoo import train_digits_video as trainer

    defaults = zoo.call_defaults("digits-video")
    assert (defaults["height"], defaults["width"]) == (data.CANVAS_SIZE, data.CANVAS_SIZE)
    assert defaults["num_frames"] == data.NUM_FRAMES
    assert defaults["max_sequence_length"] == trainer.MAX_SEQUENCE_LENGTH
    assert "num_inference_steps" not in defaults


def test_the_shipped_digits_video_model_loads_offline_in_the_stock_wan_pipeline():
    from diffusers import WanPipeline

    from cachekit import zoo

    pipe = zoo.load_pipeline("digits-video")
    assert isinstance(pipe, WanPipeline) and zoo.bundled_name(pipe) == "digits-video"
    assert pipe.transformer.config.num_layers >= 8
    size = sum(f.stat().st_size for f in zoo.pipeline_path("digits-video").rglob("*") if f.is_file())
    assert size <= 15 * 1024 * 1024
    pipe.set_progress_bar_config(disable=True)
    frames = pipe("a handwritten 3 moving left", num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0),
                  **zoo.call_defaults("digits-video")).frames[0]
    assert tuple(frames.shape) == (9, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------------- check
def test_the_clip_check_reads_real_clips_and_catches_wrong_prompts():
    from cachekit.zoo.digits_video_check import check_clips, check_real_clips, direction_of_clip

    real = check_real_clips(60, seed=4)
    assert real.direction == 1.0 and real.digit_frames >= 0.9  # the ceiling the model figures are read against
    c = clips("train", 20, seed=5)
    wrong_digit = [(int(label) + 1) % 10 for label in c.labels]
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    wrong = check_clips(list(c.frames), wrong_digit, [opposite[d] for d in c.direction_names])
    assert wrong.direction == 0.0 and wrong.digit_frames < 0.2
    # Float frames in 0..1 read the same as uint8 frames.
    assert direction_of_clip(c.frames[0].float() / 255) == c.direction_names[0]
    with pytest.raises(ValueError, match="as many labels"):
        check_clips(list(c.frames), wrong_digit[:3], c.direction_names)
