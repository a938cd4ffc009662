"""What one client may ask of the server: every bound in one place, each with its own error."""

from __future__ import annotations

import dataclasses

__all__ = ["ServerLimits"]


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Bounds on requests, bodies and streams.

    They keep one client from taking the runner from the others: a huge prompt or size costs the text encoder and
    the VAE for everyone in the batch, and a stream flooding frames costs decode time on the event loop.
    """

    max_prompt_chars: int = 1000
    max_n: int = 4
    max_steps: int = 100
    max_side: int = 1024  # pixels, either side
    max_body_bytes: int = 64 * 1024
    max_frame_bytes: int = 2 * 1024 * 1024
    max_frame_pixels: int = 1024 * 1024
    max_frames_per_s: float = 30.0
    max_streams: int = 8
    max_video_frames: int = 241  # pixel frames of one /v1/videos job (a WS video stream runs until it is closed)
    max_video_jobs: int = 8  # /v1/videos jobs generating at once (more: 429)
    max_video_results: int = 32  # finished jobs whose frames the server keeps for download (oldest go first)
    shutdown_grace_s: float = 10.0
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"ServerLimits.{field.name} must be a positive number, got {value!r}")
