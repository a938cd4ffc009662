"""The HTTP API's bodies: OpenAI's images API plus cachekit's extension fields.

The request model is built per server from its `ServerLimits`, so `/openapi.json` states the real bounds (and a
fuzzer, or a client generator, sees them).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from .limits import ServerLimits

__all__ = ["generation_request_model", "video_request_model", "VideoJobBody", "GenerationInfo", "GeneratedImage", "ImagesResponse", "ErrorBody",
           "REQUEST_ID_PATTERN", "parse_size"]

REQUEST_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


def parse_size(size: str) -> tuple[int, int]:
    """OpenAI's "WIDTHxHEIGHT" as (height, width)."""
    match = _SIZE.match(size)
    if not match:
        raise ValueError(f"size must look like 256x256 (width x height), got {size!r}")
    width, height = int(match.group(1)), int(match.group(2))
    return height, width


class _GenerationBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("size", check_fields=False)
    @classmethod
    def _size_shape(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value

    @field_validator("prompt", check_fields=False)
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value


def generation_request_model(limits: ServerLimits) -> type[BaseModel]:
    """`POST /v1/images/generations`'s body under these limits."""
    fields: dict[str, Any] = {
        "prompt": (str, Field(min_length=1, max_length=limits.max_prompt_chars,
                              description="What to draw.")),
        "n": (int, Field(1, ge=1, le=limits.max_n, description="Images for this prompt; image i uses seed + i.")),
        "size": (str | None, Field(None, description="WIDTHxHEIGHT; default: the model's size.",
                                   examples=["32x32"])),
        "response_format": (Literal["b64_json"], Field("b64_json", description="Only b64_json: no file URLs.")),
        "model": (str | None, Field(None, description="The served model's id (GET /v1/models); optional.")),
        "user": (str | None, Field(None, max_length=256, description="Accepted for OpenAI compatibility.")),
        "seed": (int, Field(0, ge=0, le=2**63 - 1, description="Seed of the first image.")),
        "num_inference_steps": (int | None, Field(None, ge=2, le=limits.max_steps,
                                                  description="Default: the cache schedule's own step count (a "
                                                              "schedule records it), else 20.")),
        "guidance_scale": (float | None, Field(None, ge=0.0, le=100.0, description="Default: the model's.")),
        "negative_prompt": (str, Field("", max_length=limits.max_prompt_chars)),
        "cache": (str, Field("none", max_length=200,
                             description="'none', a shipped schedule name (e.g. digits-fast) or a policy spec "
                                         "(e.g. fora:interval=3). Never a path.")),
        "deadline_ms": (int | None, Field(None, ge=1, le=3_600_000)),
        "allow_degrade": (bool, Field(False, description="May a faster cache plan serve it to meet deadline_ms?")),
        "stream": (bool, Field(False, description="Answer with server-sent events: queue position, steps, "
                                                 "images, errors.")),
        "preview": (bool, Field(False, description="With stream: a small preview image in every step event.")),
        "request_id": (str | None, Field(None, pattern=REQUEST_ID_PATTERN,
                                         description="Your id for this request, for POST /v1/requests/{id}/cancel.")),
    }
    return create_model("ImageGenerationRequest", __base__=_GenerationBase, **fields)


def video_request_model(limits: ServerLimits) -> type[BaseModel]:
    """`POST /v1/videos`'s body under these limits (the same fields configure `WS /v1/video-stream`)."""
    fields: dict[str, Any] = {
        "prompt": (str, Field(min_length=1, max_length=limits.max_prompt_chars, description="What to film.")),
        "model": (str | None, Field(None, description="The served model's id (GET /v1/models); optional.")),
        "num_frames": (int, Field(9, ge=1, le=limits.max_video_frames, description="Pixel frames of the clip.")),
        "seed": (int, Field(0, ge=0, le=2**63 - 1)),
        "steps": (int, Field(8, ge=1, le=limits.max_steps, description="Denoising steps of every latent frame.")),
        "window": (int, Field(3, ge=2, le=64, description="Latent frames in each forward (an anchor, then frames "
                                                           "being denoised); steps must be a multiple of window - 1.")),
        "guidance_scale": (float | None, Field(None, ge=0.0, le=100.0, description="Default: the model's.")),
        "negative_prompt": (str, Field("", max_length=limits.max_prompt_chars)),
        "cache": (str, Field("none", max_length=200, description="'none' or a policy spec (e.g. fora:interval=2), "
                                                                 "applied within each position of the window.")),
        "fps": (float, Field(8.0, gt=0.0, le=60.0, description="Frame rate of the encoded result.")),
    }
    return create_model("VideoGenerationRequest", __base__=_GenerationBase, **fields)


class VideoJobBody(BaseModel):
    """A `/v1/videos` job as the API reports it (OpenAI's video object, plus cachekit's figures)."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["in_progress", "completed", "failed", "cancelled"]
    progress: float
    prompt: str
    num_frames: int
    frames_done: int
    fps: float
    created_at: int
    completed_at: int | None = None
    time_to_first_frame_s: float | None = None
    frames_per_s: float | None = None
    plan: str
    error: str | None = None


class GenerationInfo(BaseModel):
    """How one image was served."""

    request_id: str
    seed: int
    plan: str
    requested_plan: str
    degraded: bool
    num_inference_steps: int
    latency_s: float
    queue_wait_s: float
    time_to_first_step_s: float
    reused_share: float
    deadline_missed: bool | None


class GeneratedImage(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    cachekit: GenerationInfo


class ImagesResponse(BaseModel):
    created: int
    data: list[GeneratedImage]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    retryable: bool = False


class ErrorBody(BaseModel):
    """OpenAI's error shape, plus whether retrying can help."""

    error: ErrorDetail
