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
    check_decoded(back, clip, tolerance=0.5 if suffix == ".gif" else 3.0)
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
    with pytest.raises(Exception):
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
