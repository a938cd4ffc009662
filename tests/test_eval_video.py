"""The video evaluation (`cachekit.eval.video`, `cachekit eval --model digits-video`) on real clips and the real model.

What the numbers mean is checked on real clips, whose answers are known: real frames against themselves have FID 0,
a digit that moves rigidly is perfectly consistent while frames of different digits are not, clips played backwards
move the wrong way. FVD runs through real model files written here (a TorchScript 3D-conv network and a tiny
VideoMAE folder): no FVD network can be downloaded, and the point is the path and the formula. The command line runs
end to end on the bundled digits-video model with a few clips and steps.
"""

from __future__ import annotations

import json
import math
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from scipy import linalg

from cachekit.errors import UsageError
from cachekit.eval.cli import main as eval_main
from cachekit.eval.fidelity import SSIM
from cachekit.eval.reference import reference_clips
from cachekit.eval.suite import MetricConfig
from cachekit.eval.fvd import FVD, I3DFeatures, VideoMAEFeatures, load_video_features
from cachekit.eval.prompts import digits_prompts, digits_video_prompts
from cachekit.eval.video import VideoMetricFactory, VideoPromptSet, parse_video_metric_names, video_prompt_set
from cachekit.eval.weights import MissingWeightsError

CLIP_FEATURES = MetricConfig(names=[], fid_features="clip", kid_subsets=10)  # the digits CLIP: fast on CPU


class TinyVideoNet(torch.nn.Module):
    """A small real 3D-conv clip network, saved as TorchScript: the stand-in for an I3D file."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(3, 8, kernel_size=4, stride=4)
        self.pool = torch.nn.AdaptiveAvgPool3d((2, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 3, T, H, W] in -1..1
        return self.pool(torch.relu(self.conv(x))).flatten(1)


class TinyVideoNetWithFlags(TinyVideoNet):
    """The same network with the StyleGAN-V I3D's call flags: logits unless `return_features=True`."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        feats = self.pool(torch.relu(self.conv(x))).flatten(1)
        return feats if return_features else feats[:, :2]


def _script(module: torch.nn.Module, path) -> None:
    with warnings.catch_warnings():  # torch deprecates TorchScript, but FVD's I3D files are TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(module.eval()), str(path))


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fvd") / "tiny_i3d.pt"
    _script(TinyVideoNet(), path)
    return path


def test_an_i3d_with_stylegan_v_flags_gives_its_features(tmp_path, heldout):
    _script(TinyVideoNetWithFlags(), tmp_path / "flags.pt")
    assert load_video_features(tmp_path / "flags.pt")(heldout.frames[:2]).shape == (2, 64)


@pytest.fixture(scope="module")
def factory():
    return VideoMetricFactory(CLIP_FEATURES, "fid,kid,clip,temporal,motion", reference_clips_num=20)


@pytest.fixture(scope="module")
def heldout():
    return reference_clips("digits-video-heldout", 20)


def _scores(factory, clips, prompts, labels, directions):
    suite = factory.suite(include_fidelity=False)
    suite.update(clips, prompts, labels, directions)
    return suite.compute(), suite.per_frame()


def _real(c):
    return c.frames, c.captions, c.labels.tolist(), c.direction_names


# ------------------------------------------------------------------------------------------- metrics on real clips
def test_real_frames_against_themselves_and_the_train_floor(factory, heldout):
    same, per_frame = _scores(factory, *_real(heldout))
    assert abs(same["fid"]) < 1e-6 * max(1.0, factory.reference.sigma.trace().item())
    floor, _ = _scores(factory, *_real(reference_clips("digits-video-train", 20)))
    assert floor["fid"] > same["fid"] + 0.1  # other digit samples, other paths: a real, positive floor
    # real clips show their digit and move their way (the check's own ceiling is 96% of frames)
    assert same["direction"] == 1.0 and same["digit_frames"] > 0.85 and len(per_frame["digit"]) == 9


def test_temporal_consistency_takes_motion_out_and_catches_flicker(factory, heldout):
    frames, prompts, labels, directions = _real(heldout)
    moving, _ = _scores(factory, frames, prompts, labels, directions)
    frozen, _ = _scores(factory, frames[:, :1].expand_as(frames).contiguous(), prompts, labels, directions)
    # each frame from another clip: another digit sample every frame
    n, f = frames.shape[:2]
    flicker = torch.stack([torch.stack([frames[(i + t) % n, t] for t in range(f)]) for i in range(n)])
    flickering, _ = _scores(factory, flicker, prompts, labels, directions)
    assert frozen["temporal"] == pytest.approx(1.0, abs=1e-4)
    # a rigidly moving digit is nearly as consistent as a frozen one (crops snap to whole pixels), far more than
    # whole frames would say, and a digit changing from frame to frame is not
    whole = SSIM()
    whole.update(frames[:, 1:].flatten(0, 1), frames[:, :-1].flatten(0, 1))
    assert moving["temporal"] > 0.9 > float(whole.compute())
    assert flickering["temporal"] < 0.6
    assert frozen["direction"] < 0.5  # frozen clips do not move the prompted way; flicker's digits are wrong
    assert flickering["digit_frames"] < moving["digit_frames"]


def test_clips_played_backwards_move_the_wrong_way(factory, heldout):
    frames, prompts, labels, directions = _real(heldout)
    backwards, _ = _scores(factory, frames.flip(1), prompts, labels, directions)
    assert backwards["direction"] == 0.0
    assert backwards["digit_frames"] > 0.85  # the digit is still right


def test_clip_score_reads_the_prompted_digit(factory, heldout):
    frames, prompts, labels, directions = _real(heldout)
    right, _ = _scores(factory, frames, prompts, labels, directions)
    wrong_prompts = [f"a handwritten {(label + 5) % 10}" for label in labels]
    wrong, _ = _scores(factory, frames, wrong_prompts, labels, directions)
    assert right["clip"] > wrong["clip"] + 20


def test_fidelity_per_frame_against_the_uncached_clip(heldout):
    factory = VideoMetricFactory(CLIP_FEATURES, "psnr,ssim", reference_clips_num=2)
    frames, prompts, labels, directions = _real(heldout)
    suite = factory.suite()
    noisy = (frames.float() + torch.randn(frames.shape, generator=torch.Generator().manual_seed(0)) * 8)
    suite.update(noisy.clamp(0, 255).round().to(torch.uint8), prompts, labels, directions, baseline=frames)
    values, per_frame = suite.compute(), suite.per_frame()
    assert 25 < values["psnr"] < 35 and 0 < values["ssim"] < 1
    assert len(per_frame["psnr"]) == 9 and all(25 < v < 35 for v in per_frame["psnr"])
    same = factory.suite()
    same.update(frames, prompts, labels, directions, baseline=frames)
    assert math.isinf(same.compute()["psnr"]) and same.compute()["ssim"] == pytest.approx(1.0)


def test_metric_names_and_prompts():
    assert parse_video_metric_names("fid, temporal,motion,fid") == ["fid", "temporal", "motion"]
    with pytest.raises(UsageError, match="unknown video metric"):
        parse_video_metric_names("fid,lpips")
    prompts = video_prompt_set(8, seed=3)
    assert len(prompts) == 8 and prompts.labels[:3] == [0, 1, 2]
    assert prompts.prompts == digits_video_prompts(8, seed=3).prompts  # the set every command uses
    with pytest.raises(UsageError, match="digit and direction"):
        VideoPromptSet.from_prompt_set(digits_prompts(4))
    assert all(d in p or {"up": "upward", "down": "downward"}[d] in p
               for p, d in zip(prompts.prompts, prompts.directions) if d in ("up", "down"))


# ------------------------------------------------------------------------------------------------------------ FVD
def test_fvd_is_the_frechet_distance_of_clip_features(i3d_file, heldout):
    factory = VideoMetricFactory(CLIP_FEATURES, "motion", reference_clips_num=20, fvd_checkpoint=i3d_file)
    assert factory.names == ["motion", "fvd"]
    net, real = factory.fvd_network, heldout.frames
    assert isinstance(net, I3DFeatures)
    ref_feats = factory.fvd_reference.features
    assert ref_feats.shape == (20, 64)
    fvd = FVD(factory.fvd_network, factory.fvd_reference)
    fvd.update(real)
    assert abs(fvd.compute()) < 1e-6
    frozen = real[:, :1].expand_as(real).contiguous()
    fvd.reset()
    fvd.update(frozen)
    got = fvd.compute()
    # the textbook formula, with scipy's matrix square root
    a, b = ref_feats.double().numpy(), net(frozen).double().numpy()
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert got > 0 and got == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_fvd_from_a_videomae_folder(tmp_path, heldout):
    from transformers import VideoMAEConfig, VideoMAEModel

    config = VideoMAEConfig(image_size=32, patch_size=16, num_frames=4, tubelet_size=2, hidden_size=32,
                            num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    VideoMAEModel(config).save_pretrained(tmp_path / "videomae")
    net = load_video_features(tmp_path / "videomae")
    assert isinstance(net, VideoMAEFeatures) and net.num_frames == 4 and net.size == 32
    feats = net(heldout.frames[:3])
    assert feats.shape == (3, 32) and torch.isfinite(feats).all()
    assert net.info()["sha256"]


def test_fvd_checkpoint_errors(tmp_path):
    with pytest.raises(MissingWeightsError, match="never downloads"):
        load_video_features(tmp_path / "missing.pt")
    (tmp_path / "notes.txt").write_text("not a network")
    with pytest.raises(UsageError, match="not a TorchScript file"):
        load_video_features(tmp_path / "notes.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(UsageError, match="not a VideoMAE folder"):
        load_video_features(tmp_path / "folder")
    with pytest.raises(UsageError, match="--fvd-checkpoint"):
        VideoMetricFactory(CLIP_FEATURES, "fid,fvd", reference_clips_num=2)


def test_cli_refuses_bad_video_options_in_one_line(tmp_path, capsys):
    cases = [
        (["--model", "digits-video", "--fvd-checkpoint", str(tmp_path / "none.pt")], "FVD checkpoint not found"),
        (["--model", "digits", "--fvd-checkpoint", str(tmp_path)], "for video models"),
        (["--model", "digits-video", "--prompts", "coco"], "its own prompts"),
        (["--model", "digits-video", "--metrics", "fid,lpips"], "unknown video metric"),
        (["--model", "digits-video", "--metrics", "fvd"], "--fvd-checkpoint"),
        (["--model", "digits-video", "--metrics", "fid,bogus"], "unknown metric"),
    ]
    for argv, message in cases:
        assert eval_main(argv + ["--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err, (argv, err)


def test_help_names_the_video_options(capsys):
    with pytest.raises(SystemExit) as done:
        eval_main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in ("--fvd-checkpoint", "--ref-clips", "--timing-clips", "--fps", "digits-video", "temporal"):
        assert option in text


# ------------------------------------------------------------------------------------------ the CLI, end to end
def test_cli_end_to_end_on_the_bundled_video_model(tmp_path, i3d_file, capsys):
    from cachekit.pipelines.video_io import read_video

    out = tmp_path / "eval"
    argv = ["--model", "digits-video", "--schedule", "fora:interval=2", "--num", "4", "--steps", "3",
            "--batch-size", "4", "--fid-features", "clip", "--kid-subsets", "5", "--ref-clips", "8",
            "--fvd-checkpoint", str(i3d_file), "--warmup", "0", "--repeats", "1", "--timing-clips", "2",
            "--grid", "2", "--device", "cpu", "--out", str(out)]
    assert eval_main(argv) == 0
    printed = capsys.readouterr().out
    assert "uncached: speedup 1.00x" in printed and "s for 2 clips" in printed and "real clips" in printed
    for name in ("report.json", "report.md", "strips.png", "preview.gif", "per_frame.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "cachekit.eval.video_report" and report["model"] == "digits-video"
    assert list(report["schedules"]) == ["uncached", "fora:interval=2"]
    base, cached = report["schedules"]["uncached"], report["schedules"]["fora:interval=2"]
    for entry in (base, cached):
        assert {"fid", "kid", "clip", "temporal", "digit_frames", "digit_clips", "direction", "fvd"} <= set(
            entry["metrics"])
        assert entry["seconds_per_call"] > 0 and entry["latency"]["batch_size"] == 2
        assert len(entry["per_frame"]["digit"]) == 9
    assert "psnr" not in base["metrics"] and 0 < cached["metrics"]["ssim"] < 1
    assert len(cached["per_frame"]["psnr"]) == 9 and cached["macs_ratio"] < 1
    assert report["real"]["source"] == "digits-video-train" and report["real"]["clips"] == 4
    assert report["reference"]["clips"] == 8 and report["reference"]["frames"] == 72
    preview = read_video(out / "preview.gif")
    assert preview.shape[0] == 9  # one animation frame per clip frame: 2 prompts x (uncached, fora) side by side
    md = (out / "report.md").read_text()
    assert "real clips (digits-video-train)" in md and "preview.gif" in md and "time for 2 clips" in md
