"""`/v1/videos`: asynchronous video jobs (OpenAI's video API shape) over the runner's video streams.

    POST   /v1/videos                 body: VideoGenerationRequest -> 202, the job (status "in_progress")
    GET    /v1/videos/{id}            the job: status, progress (frames done / num_frames), time to first frame, fps
    GET    /v1/videos/{id}/content    ?format=mp4|webm|gif: the finished clip (409 until it is completed)
    POST   /v1/videos/{id}/cancel     stop it; its rows and caches are freed before the runner's next forward
    DELETE /v1/videos/{id}            cancel if running, and forget it

A job is a finite video stream (`Runner.open_video_stream(..., num_frames=N)`): frames are collected as the stream
sends them, so progress is real frames, and the result is encoded on demand with `pipelines.video_io` (off the
event loop, once per format). Limits: `max_video_jobs` generating at once (429 with Retry-After past it),
`max_video_frames` per job, `max_video_results` finished jobs kept (the oldest finished ones are forgotten first).
"""

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import Body, FastAPI, Query, Response

from cachekit.errors import UsageError
from cachekit.plans import PlanError, plan_label, resolve_plan

from .errors import ApiError
from .limits import ServerLimits
from .schemas import ErrorBody, VideoJobBody, video_request_model

__all__ = ["add_video_routes", "VideoJob", "video_stream_kwargs"]

_ERRORS = {status: {"model": ErrorBody} for status in (401, 404, 409, 413, 422, 429, 503)}
_MEDIA = {"mp4": "video/mp4", "webm": "video/webm", "gif": "image/gif"}


class VideoJob:
    """One `/v1/videos` job: its stream, the frames it has sent, its encoded results."""

    def __init__(self, job_id: str, model: str, body: Any, stream: Any, plan: str) -> None:
        self.id = job_id
        self.model = model
        self.prompt = body.prompt
        self.num_frames = body.num_frames
        self.fps = float(body.fps)
        self.plan = plan
        self.stream = stream
        self.frames: list[Any] = []
        self.status = "in_progress"
        self.error: str | None = None
        self.created_at = time.time()
        self.started = time.monotonic()
        self.completed_at: float | None = None
        self.first_frame_s: float | None = None
        self.last_frame_s: float | None = None
        self.encoded: dict[str, bytes] = {}
        self.task: asyncio.Task | None = None

    @property
    def done(self) -> bool:
        return self.status != "in_progress"

    def body(self) -> dict[str, Any]:
        fps = None
        if len(self.frames) > 1 and self.last_frame_s and self.first_frame_s is not None \
                and self.last_frame_s > self.first_frame_s:
            fps = round((len(self.frames) - 1) / (self.last_frame_s - self.first_frame_s), 3)
        return VideoJobBody(
            id=self.id, model=self.model, status=self.status, progress=round(len(self.frames) / self.num_frames, 4),
            prompt=self.prompt, num_frames=self.num_frames, frames_done=len(self.frames), fps=self.fps,
            created_at=int(self.created_at), completed_at=None if self.completed_at is None else int(self.completed_at),
            time_to_first_frame_s=None if self.first_frame_s is None else round(self.first_frame_s, 4),
            frames_per_s=fps, plan=self.plan, error=self.error).model_dump()

    def cancel(self) -> None:
        if not self.done:
            self.status = "cancelled"
            self.completed_at = time.time()
        self.stream.close()

    async def collect(self) -> None:
        """Take the stream's frames as they come, until the clip is over or the job is cancelled."""
        from .stream_socket import next_output

        try:
            while not self.done and (frame := await next_output(self.stream)) is not None:
                self.frames.append(frame.image)
                now = time.monotonic() - self.started
                self.first_frame_s = now if self.first_frame_s is None else self.first_frame_s
                self.last_frame_s = now
            if not self.done:
                complete = len(self.frames) == self.num_frames
                self.status = "completed" if complete else "failed"
                self.error = None if complete else "the stream stopped early (the runner closed or failed)"
                self.completed_at = time.time()
        finally:
            self.stream.close()


def video_stream_kwargs(body: Any, limits: ServerLimits) -> dict[str, Any]:
    """`Runner.open_video_stream`'s arguments from a request body; `ApiError` 422 for a bad cache plan."""
    try:
        plan = resolve_plan(body.cache, allow_files=False)
    except PlanError as err:
        raise ApiError(422, f"cache: {err}", param="cache") from None
    return {"seed": body.seed, "schedule": plan, "steps": body.steps, "window": body.window,
            "guidance_scale": body.guidance_scale, "negative_prompt": body.negative_prompt}


def refuse_unless_video(runner: Any, model_id: str) -> None:
    if not getattr(runner.family, "supports_video_streams", False):
        raise ApiError(422, f"this server serves {model_id!r}, an image model; videos need a video model "
                            "(cachekit serve --model digits-video)", param="model")


def add_video_routes(app: FastAPI, served: Any, limits: ServerLimits, runner_or_503: Callable[[], Any]) -> None:
    VideoRequest = video_request_model(limits)
    jobs: collections.OrderedDict[str, VideoJob] = collections.OrderedDict()
    app.state.video_jobs = jobs

    def job_or_404(video_id: str) -> VideoJob:
        job = jobs.get(video_id)
        if job is None:
            raise ApiError(404, f"no video {video_id!r}", type="not_found_error")
        return job

    def forget_old_results() -> None:
        finished = [j for j in jobs.values() if j.done]
        for job in finished[: max(len(finished) - limits.max_video_results, 0)]:
            jobs.pop(job.id, None)

    @app.post("/v1/videos", status_code=202, response_model=VideoJobBody, responses=_ERRORS,
              summary="Create a video job (answered at once; poll GET /v1/videos/{id})")
    async def create_video(response: Response, body: VideoRequest = Body(...)) -> Any:  # type: ignore[valid-type]
        runner = runner_or_503()
        refuse_unless_video(runner, served.model_id)
        if body.model is not None and body.model != served.model_id:
            raise ApiError(404, f"model: this server serves {served.model_id!r}, not {body.model!r}", param="model",
                           type="not_found_error")
        if sum(not j.done for j in jobs.values()) >= limits.max_video_jobs:
            raise ApiError(429, f"{limits.max_video_jobs} video jobs are generating already; retry later",
                           type="rate_limit_error", retryable=True, headers={"Retry-After": str(limits.retry_after_s)})
        kwargs = video_stream_kwargs(body, limits)
        try:
            stream = runner.open_video_stream(body.prompt, num_frames=body.num_frames, **kwargs)
        except UsageError as err:
            message = str(err)
            param = next((p for p in ("steps", "window", "guidance_scale", "prompt", "seed") if message.startswith(p)),
                         "cache" if "schedule" in message or "plan" in message else None)
            raise ApiError(422, message, param=param) from None
        job = VideoJob(f"video_{uuid.uuid4().hex[:16]}", served.model_id, body, stream, plan_label(body.cache))
        jobs[job.id] = job
        job.task = asyncio.ensure_future(job.collect())
        forget_old_results()
        response.headers["Location"] = f"/v1/videos/{job.id}"
        return job.body()

    @app.get("/v1/videos/{video_id}", response_model=VideoJobBody, responses=_ERRORS, summary="A video job")
    async def get_video(video_id: str) -> Any:
        return job_or_404(video_id).body()

    @app.get("/v1/videos/{video_id}/content", responses={**_ERRORS, 200: {"content": {m: {} for m in
                                                                                     _MEDIA.values()}}},
             summary="The finished clip as mp4, webm or gif")
    async def video_content(video_id: str, format: str = Query("mp4", description="mp4, webm or gif")) -> Response:
        from cachekit.pipelines.video_io import VideoDependencyError, encode_video

        job = job_or_404(video_id)
        if format not in _MEDIA:
            raise ApiError(422, f"format: one of {', '.join(_MEDIA)}, got {format!r}", param="format")
        if job.status != "completed":
            raise ApiError(409, f"video {video_id!r} is {job.status.replace('_', ' ')}; its content is there once "
                                "it is completed", type="conflict", retryable=job.status == "in_progress")
        if format not in job.encoded:
            try:
                job.encoded[format] = await asyncio.to_thread(encode_video, job.frames, format, job.fps)
            except VideoDependencyError as err:
                raise ApiError(503, str(err), type="unavailable") from None
        return Response(job.encoded[format], media_type=_MEDIA[format],
                        headers={"Content-Disposition": f'inline; filename="{video_id}.{format}"'})

    @app.post("/v1/videos/{video_id}/cancel", response_model=VideoJobBody, responses=_ERRORS,
              summary="Cancel a video job")
    async def cancel_video(video_id: str) -> Any:
        job = job_or_404(video_id)
        if job.status in ("completed", "failed"):
            raise ApiError(409, f"video {video_id!r} is {job.status} already", type="conflict")
        job.cancel()
        return job.body()

    @app.delete("/v1/videos/{video_id}", responses=_ERRORS, summary="Cancel (if running) and forget a video job")
    async def delete_video(video_id: str) -> dict[str, Any]:
        job = job_or_404(video_id)
        job.cancel()
        jobs.pop(video_id, None)
        return {"id": video_id, "object": "video", "deleted": True}


async def cancel_video_jobs(app: FastAPI) -> None:
    """At shutdown: stop every running job (their streams close with the runner anyway)."""
    for job in list(getattr(app.state, "video_jobs", {}).values()):
        job.cancel()
        if job.task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(job.task, 2)
