"""Video output: real encoding of every format read back with PyAV, and `cachekit generate` writing clips.

The clips are decoded again and compared with what went in: frame count, pixel content (mean absolute difference
after the codec's loss) and order (a bright square moving right must be found at its position in every frame).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cachekit.errors import UsageError
from cachekit.pipelines import video_io
from cachekit.pipelines.video_io import (VIDEO_SUFFIXES, encode_video, read_video, to_frames, upscale_factor,
                                         video_format, video_frame_rate, write_video)

FRAMES, SIZE = 9, 32


def moving_square(frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """[F, H, W, 3] uint8: a warm bright 8x8 square on dark blue, 3 px further right in each frame."""
    clip = np.zeros((frames, size, size, 3), np.uint8)
    clip[...] = (10, 20, 60)
    for i in range(frames):
        clip[i, 12:20, 1 + 3 * i : 9 + 3 * i] = (250, 210, 40)
    return clip


def square_column(frame: np.ndarray) -> float:
    """The square's horizontal centre in a frame, from its brightness."""
    weight = frame.astype(np.float64).mean(axis=-1)
    weight = np.clip(weight - weight.mean(), 0, None).sum(axis=0)
    return float((weight * np.arange(frame.shape[1])).sum() / weight.sum())


def check_decoded(back: np.ndarray, clip: np.ndarray, *, tolerance: float) -> None:
    assert back.shape[0] == clip.shape[0]
    factor = back.shape[1] // clip.shape[1]
    assert back.shape[1:3] == (clip.shape[1] * factor, clip.shape[2] * factor)
    expected = clip.repeat(factor, axis=1).repeat(factor, axis=2)
    assert np.abs(back.astype(np.int16) - expected).mean() < tolerance
    columns = [square_column(frame) / factor for frame in back]
    expected_columns = [square_column(frame) for frame in clip]
    assert np.allclose(columns, expected_columns, atol=0.75), (columns, expected_columns)


# ------------------------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("suffix", VIDEO_SUFFIXES)
def test_each_format_round_trips(tmp_path: Path, suffix: str) -> None:
    clip = moving_square()
    path = write_video(clip, tmp_path / f"clip{suffix}", fps=8)
    assert path == tmp_path / f"clip{suffix}" and path.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left beside it
    back = read_video(path)
    assert back.shape == (FRAMES, 128, 128, 3)  # 32 px enlarged 4x to the 128 px minimum
    check_decoded(back, clip, tolerance=0.5 if suffix == ".gif" else 3.0)  # measured: 0.0 GIF, 0.15 MP4/WebM
    assert abs(float(video_frame_rate(path)) - 8) < 0.5  # GIF stores delays in 1/100 s: 8 fps reads 8.33


def test_containers_are_what_the_suffix_says(tmp_path: Path) -> None:
    import av

    clip = moving_square()
    expected = {".mp4": ("mov,mp4,m4a,3gp,3g2,mj2", "h264", "yuv420p"), ".webm": ("matroska,webm", "vp9", "yuv420p"),
                ".gif": ("gif", "gif", "bgra")}
    for suffix, (container_name, codec, pix_fmt) in expected.items():
        with av.open(str(write_video(clip, tmp_path / f"c{suffix}"))) as container:
            stream = container.streams.video[0]
            assert container.format.name == container_name
            assert stream.codec_context.name == codec
            if suffix != ".gif":
                assert stream.codec_context.pix_fmt == pix_fmt
    data = (tmp_path / "c.mp4").read_bytes()
    assert 0 < data.find(b"moov") < data.find(b"mdat")  # faststart: a browser can play it before it has it all


def test_encode_video_gives_the_file_bytes(tmp_path: Path) -> None:
    clip = moving_square()
    data = encode_video(clip, "mp4", fps=8)
    assert data == write_video(clip, tmp_path / "c.mp4", fps=8).read_bytes()  # one encoding for file and server
    check_decoded(read_video(data), clip, tolerance=3.0)
    assert video_format("webm").media_type == "video/webm" and video_format("clip.GIF").suffix == ".gif"
    check_decoded(read_video(encode_video(clip, ".gif")), clip, tolerance=0.5)


def test_every_input_layout_gives_the_same_frames() -> None:
    clip = moving_square()
    as_float = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255  # WanPipeline output_type="pt"
    layouts = [clip, as_float, torch.from_numpy(clip).permute(0, 3, 1, 2), clip.astype(np.float32) / 255,
               [Image.fromarray(frame) for frame in clip], list(as_float)]
    for frames in layouts:
        assert np.array_equal(to_frames(frames), clip)
    grey = to_frames(clip[..., 0])
    assert grey.shape == (FRAMES, SIZE, SIZE, 3) and np.array_equal(grey[..., 1], clip[..., 0])


def test_scale_and_odd_sizes(tmp_path: Path) -> None:
    assert upscale_factor(32, 32) == 4 and upscale_factor(480, 832) == 1 and upscale_factor(33, 200) == 4
    clip = moving_square()
    assert read_video(encode_video(clip, "webm", scale=2)).shape[1:3] == (64, 64)
    odd = np.ascontiguousarray(moving_square(size=40)[:, :39, :37])
    back = read_video(encode_video(odd, "mp4", scale=1))  # yuv420p: padded by one edge row and column
    assert back.shape == (FRAMES, 40, 38, 3)
    assert np.abs(back[:, :39, :37].astype(np.int16) - odd).mean() < 3.0
    assert read_video(encode_video(odd, "gif", scale=1)).shape == (FRAMES, 39, 37, 3)  # GIF takes any size


def test_repeated_frames_are_kept_in_a_gif() -> None:
    clip = np.concatenate([moving_square()[:2]] * 3)[[0, 0, 0, 1, 1, 2, 3, 3]]
    assert read_video(encode_video(clip, "gif")).shape[0] == len(clip)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    clip = moving_square()
    cases = [
        (lambda: write_video(clip, tmp_path / "clip.avi"), "unknown video format: suffix '.avi'"),
        (lambda: write_video(clip, tmp_path / "clip"), "unknown video format"),
        (lambda: encode_video(clip, "mkv"), "use one of .mp4, .webm, .gif"),
        (lambda: write_video(clip, tmp_path / "c.mp4", fps=0), "fps must be a number in (0, 240]"),
        (lambda: write_video(clip, tmp_path / "c.mp4", fps=float("nan")), "fps must be"),
        (lambda: write_video(clip, tmp_path / "c.mp4", scale=0), "scale must be an integer factor"),
        (lambda: write_video(clip[None], tmp_path / "c.mp4"), "batch of 1 clips"),
        (lambda: write_video(clip[:0], tmp_path / "c.mp4"), "at least one frame"),
        (lambda: write_video([], tmp_path / "c.mp4"), "at least one frame"),
        (lambda: write_video(clip.astype(np.int32), tmp_path / "c.mp4"), "uint8 or floats"),
        (lambda: write_video(np.full((2, 8, 8, 3), np.nan), tmp_path / "c.mp4"), "NaN"),
    ]
    for action, message in cases:
        with pytest.raises(UsageError) as info:
            action()
        assert message in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_encoding_leaves_no_file(tmp_path: Path) -> None:
    """Frames too large for H.264's level limits fail inside FFmpeg: the error comes up, no file or temp remains."""
    big = np.zeros((1, 2, 40000, 3), np.uint8)
    with pytest.raises(UsageError, match=r"cannot encode 1 frames of 40000x2 as \.mp4 \(libx264\): "):
        write_video(big, tmp_path / "big.mp4", scale=1)
    assert list(tmp_path.iterdir()) == []


def test_missing_pyav_names_the_extra(tmp_path: Path) -> None:
    """Run in a child interpreter where `import av` fails, as it does without the `video` extra."""
    import subprocess
    import sys

    script = ("import sys; sys.modules['av'] = None\n"
              "from cachekit.pipelines.video_io import write_video, VideoDependencyError\n"
              "import numpy as np\n"
              "try:\n    write_video(np.zeros((1, 8, 8, 3), np.uint8), sys.argv[1])\n"
              "except VideoDependencyError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "c.mp4")], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}).stdout.strip()
    assert out == "writing videos needs PyAV, which is not installed: pip install 'cachekit[video]'"
    assert list(tmp_path.iterdir()) == []


def test_module_surface() -> None:
    assert VIDEO_SUFFIXES == (".mp4", ".webm", ".gif")
    assert video_io.is_video_path("a/B.MP4") and not video_io.is_video_path("a.png")


# ------------------------------------------------------------------------------- cachekit generate --model digits-video
PROMPTS = ("a handwritten 3 moving left", "a handwritten 5 moving up")
DIRECTIONS = ("left", "up")
STEPS = "3"  # FORA at interval 2 computes steps 0 and 2, reuses step 1


@pytest.fixture(scope="module")
def video_plan(tmp_path_factory):
    """A FORA schedule made for the video model by `cachekit schedule make`, and the clips PipelineCall makes
    under it for PROMPTS (seeds 0 and 1): what every generate run below must have written."""
    from cachekit.cli import main
    from cachekit.pipelines.call import PipelineCall
    from cachekit.zoo import call_defaults, load_pipeline

    schedule = tmp_path_factory.mktemp("plan") / "fora.json"
    assert main(["schedule", "make", "fora", "--model", "digits-video", "--steps", STEPS, "--interval", "2",
                 "--out", str(schedule)]) == 0
    pipe = load_pipeline("digits-video")
    pipe.set_progress_bar_config(disable=True)
    clips = PipelineCall(PROMPTS, int(STEPS), call_defaults("digits-video"), seeds=(0, 1))(pipe, str(schedule))
    return schedule, [to_frames(clip) for clip in clips]


def _down(frames: np.ndarray, factor: int) -> np.ndarray:
    """Undo the nearest-neighbour enlargement: the mean of each factor x factor block."""
    f, h, w, c = frames.shape
    return frames.reshape(f, h // factor, factor, w // factor, factor, c).astype(np.float64).mean(axis=(2, 4))


def check_clip(back: np.ndarray, expected: np.ndarray, direction: str, *, tolerance: float) -> None:
    """A decoded clip shows the expected frames (within the codec's loss), in order, moving `direction`."""
    from cachekit.zoo.digits_video_check import direction_of_clip, ink_centres

    assert back.shape == (FRAMES, 128, 128, 3)
    small = _down(back, 4)
    assert np.abs(small - expected).mean() < tolerance
    as_tensor = torch.from_numpy(small / 255).permute(0, 3, 1, 2)
    reference = torch.from_numpy(expected).permute(0, 3, 1, 2)
    assert torch.allclose(ink_centres(as_tensor), ink_centres(reference), atol=0.5)  # every frame in its place
    assert direction_of_clip(as_tensor) == direction_of_clip(reference) == direction


def test_schedule_make_knows_the_video_model(video_plan):
    import cachekit

    schedule = cachekit.Schedule.load(video_plan[0])
    assert schedule.model_class == "WanTransformer3DModel" and schedule.num_steps == 3
    assert schedule.scheduler == "FlowMatchEulerDiscreteScheduler"
    assert schedule.recompute[:, :, :].any(dim=(1, 2)).tolist() == [True, False, True]


def test_generate_writes_numbered_mp4_clips_under_a_plan(tmp_path, capsys, video_plan):
    from cachekit.cli import main

    schedule, expected = video_plan
    out = tmp_path / "clip.mp4"
    assert main(["generate", "--model", "digits-video", "--prompt", *PROMPTS, "--steps", STEPS,
                 "--schedule", str(schedule), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {tmp_path / 'clip-0.mp4'} .. {tmp_path / 'clip-1.mp4'}: 2 clip(s) of 9 frames "
                              "(32x32 px enlarged 4x) at 8 fps, 3 steps in ")
    assert "fora, reused 33% of " in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip-0.mp4", "clip-1.mp4"]
    for i, direction in enumerate(DIRECTIONS):
        check_clip(read_video(tmp_path / f"clip-{i}.mp4"), expected[i], direction, tolerance=3.0)  # measured 0.85


def test_generate_webm_clips_per_prompt_take_successive_seeds(tmp_path, capsys, video_plan):
    from cachekit.cli import main

    schedule, expected = video_plan
    assert main(["generate", "--model", "digits-video", "--prompt", PROMPTS[0], "--num-images", "2", "--steps", STEPS,
                 "--schedule", str(schedule), "--fps", "12", "--out", str(tmp_path / "c.webm")]) == 0
    assert "2 clip(s) of 9 frames (32x32 px enlarged 4x) at 12 fps" in capsys.readouterr().out
    check_clip(read_video(tmp_path / "c-0.webm"), expected[0], "left", tolerance=3.0)  # seed 0; measured 1.0
    assert float(video_frame_rate(tmp_path / "c-0.webm")) == 12
    assert not np.array_equal(read_video(tmp_path / "c-1.webm"), read_video(tmp_path / "c-0.webm"))  # seed 1


def test_generate_gif_with_a_seed_and_a_strip_png(tmp_path, capsys, video_plan):
    from cachekit.cli import main

    schedule, expected = video_plan
    common = ["generate", "--model", "digits-video", "--steps", STEPS, "--schedule", str(schedule)]
    assert main([*common, "--prompt", PROMPTS[1], "--seed", "1", "--out", str(tmp_path / "up.gif")]) == 0
    check_clip(read_video(tmp_path / "up.gif"), expected[1], "up", tolerance=1.5)  # 256 colours: measured 0.87
    assert main([*common, "--prompt", *PROMPTS, "--scale", "1", "--out", str(tmp_path / "strip.png")]) == 0
    assert "2 clip(s) of 9 frames (32x32 px) as a strip" in capsys.readouterr().out
    strip = np.asarray(Image.open(tmp_path / "strip.png").convert("RGB"))
    assert strip.shape == (2 * SIZE, FRAMES * SIZE, 3)  # one row of frames per clip, lossless
    rows = strip.reshape(2, SIZE, FRAMES, SIZE, 3).transpose(0, 2, 1, 3, 4)
    assert np.array_equal(rows, np.stack(expected))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strip.png", "up.gif"]


def test_generate_on_the_image_model_is_unchanged(tmp_path, capsys, monkeypatch):
    from cachekit.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--steps", "2"]) == 0  # the default output, as before: a PNG
    assert capsys.readouterr().out.startswith("wrote cachekit.png: 1 image(s), 2 steps in ")
    assert Image.open(tmp_path / "cachekit.png").format == "PNG" and os.listdir(tmp_path) == ["cachekit.png"]


@pytest.mark.parametrize("argv, message", [
    (["--out", "{d}/x.mp4"], "--out {d}/x.mp4: digits (PixArtAlphaPipeline) makes images, not videos; write a .png"),
    (["--fps", "4", "--out", "{d}/x.png"], "--fps applies to a video model's clips; digits (PixArtAlphaPipeline)"),
    (["--scale", "2", "--fps", "4"], "--fps and --scale apply to a video model's clips"),
    (["--model", "digits-video", "--out", "{d}/x.avi"],
     "--out {d}/x.avi: digits-video (WanPipeline) makes videos; write .mp4, .webm, .gif, or .png for a strip"),
    (["--model", "digits-video", "--fps", "4", "--out", "{d}/x.png"],
     "--fps applies to video files (.mp4, .webm, .gif), not to the PNG strip {d}/x.png"),
    (["--model", "digits-video", "--fps", "nan", "--out", "{d}/x.mp4"], "argument --fps: must be a finite number"),
    (["--model", "digits-video", "--scale", "0", "--out", "{d}/x.mp4"], "argument --scale: must be a positive"),
    (["--model", "digits-video", "--prompt", "a", "b", "--out", "{d}/taken.mp4"],
     "cannot write {d}/taken-1.mp4: it is a folder"),
    (["--model", "digits-video", "--steps", "20", "--schedule", "digits-fast", "--out", "{d}/x.mp4"],
     "schedule was made for PixArtTransformer2DModel, but the model is WanTransformer3DModel"),
])
def test_bad_combinations_are_one_line_before_anything_is_generated(tmp_path, capsys, argv, message):
    from cachekit.cli import main

    (tmp_path / "taken-1.mp4").mkdir()
    argv = [a.replace("{d}", str(tmp_path)) for a in argv]
    assert main(["generate", "--steps", "2", *argv]) == 2
    err = capsys.readouterr().err
    line = err.rstrip("\n").split("\n")[-1]  # after the loading bars, where the model had to load to tell
    assert line.startswith("cachekit generate: error: ") and err.count("error") == 1
    assert message.replace("{d}", str(tmp_path)) in line
    assert os.listdir(tmp_path) == ["taken-1.mp4"]  # nothing written, nothing temporary left


def test_generate_help_documents_video_output(capsys):
    from cachekit.cli import main

    with pytest.raises(SystemExit) as done:
        main(["generate", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--fps FPS", "--scale N", ".mp4 (H.264), .webm (VP9) or .gif", "clip-0.mp4",
                  "pip install 'cachekit[video]'", "--model digits-video", ".png strip of frames"):
        assert words in text, words


def test_the_kind_of_model_is_known_before_it_loads(tmp_path: Path) -> None:
    from cachekit.pipelines.call import makes_video, pipeline_class_name

    assert pipeline_class_name("digits") == "PixArtAlphaPipeline"
    assert pipeline_class_name("digits-video") == "WanPipeline"
    (tmp_path / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline"}')
    assert pipeline_class_name(str(tmp_path)) == "CogVideoXPipeline"
    assert pipeline_class_name(str(tmp_path / "absent")) is None and pipeline_class_name("not a repo id!") is None
    assert [makes_video(name) for name in ("WanPipeline", "CogVideoXPipeline", "PixArtAlphaPipeline",
                                           "FluxPipeline", "NoSuchPipeline")] == [True, True, False, False, False]
