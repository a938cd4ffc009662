"""Calibration: what reusing each cached output would cost, measured once on the uncached model.

A schedule solver needs, for every cacheable unit (a component, or a whole block in block mode) and every pair of
steps i <= t, the error of serving step t from the output cached at step i. Reuse always serves the output of the
*last computed* step, never the previous step's (possibly itself reused) value, so the whole upper triangle is needed,
not just neighbouring steps. One uncached run over a few calibration prompts records it:

- `rel_l1[b, c, i, t]`  = |o_t - o_i|_1 / |o_t|_1    (the error CacheQuant-style solvers use)
- `cosine[b, c, i, t]`  = 1 - cos(o_t, o_i)          (BAC's similarity, as a distance)

each averaged over samples (batch rows: a CFG pipeline contributes two rows per prompt), with the sample count behind
every entry. The same run times every unit's forward on the target device (median over calls) and the remainder of
the transformer forward outside the units, and the MACs come from `cachekit.cost.MacProfile`, so a solver can budget
either.

Outputs are read by a recording hook registered on diffusers' `HookRegistry` under the name `cachekit.calibrate`; the
step index is read from the cachekit session, enabled with the full (exact) schedule for the duration, so it is never
inferred from call counts. Everything is removed again afterwards.
"""

from __future__ import annotations

import inspect
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn
from tqdm.auto import tqdm

import cachekit
from cachekit.cost import MacProfile
from cachekit.errors import UsageError
from cachekit.io import atomic_path, atomic_write
from cachekit.pipelines.call import PipelineCall
from cachekit.eval.latency import time_call
from cachekit.hooks import CacheSession, session_of
from cachekit.registry import ModelLayout, resolve_layout
from cachekit.schedule import Schedule
from cachekit.state import StepRows, map_tensors

__all__ = [
    "CALIBRATE_HOOK",
    "CALIBRATION_FORMAT",
    "CALIBRATION_VERSION",
    "DEFAULT_MAX_FEATURES",
    "METRICS",
    "Calibration",
    "CalibrationError",
    "calibrate",
    "calibrate_transformer",
]

CALIBRATE_HOOK = "cachekit.calibrate"
CALIBRATION_FORMAT = "cachekit.calibration"
CALIBRATION_VERSION = 1
DEFAULT_MAX_FEATURES = 65536
METRICS = ("l1", "cosine")
"""Error metrics a calibration holds: relative L1 and cosine distance (1 - cosine similarity)."""


class CalibrationError(ValueError):
    """A calibration file that is missing, corrupt, or does not fit what it is used for."""


# ---------------------------------------------------------------------------------------------------------- result
@dataclass
class Calibration:
    """Reuse errors, latency and MACs of every cacheable unit of one model at one step count.

    Units are `(block, component)` pairs in the layout of `mode` (`components == ("block",)` in block mode). Error
    tensors are `[blocks, components, steps, steps]`; entry `[b, c, i, t]` (i <= t) is the mean error of serving
    step t from the output computed at step i. Entries below the diagonal and of absent components are 0.
    """

    model_class: str
    mode: str
    components: tuple[str, ...]
    present: torch.Tensor  # [blocks, components] bool
    num_steps: int
    rel_l1: torch.Tensor  # [blocks, components, steps, steps] float64
    cosine: torch.Tensor  # [blocks, components, steps, steps] float64, 1 - cos
    pair_counts: torch.Tensor  # [steps, steps] samples behind each (i, t) entry
    num_samples: int
    latency: torch.Tensor  # [blocks, components] median seconds per call of each unit
    latency_remainder: float  # median seconds per transformer forward spent outside the units
    macs: dict[str, Any]  # MacProfile fields: model_class, components, total, per_component, per_block
    meta: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- views
    @property
    def num_blocks(self) -> int:
        return int(self.present.shape[0])

    def errors(self, metric: str = "l1") -> torch.Tensor:
        """`[blocks, components, steps, steps]` reuse errors in `metric` ('l1' or 'cosine')."""
        if metric == "l1":
            return self.rel_l1
        if metric == "cosine":
            return self.cosine
        raise ValueError(f"unknown error metric {metric!r}; expected one of {list(METRICS)}")

    def mac_profile(self) -> MacProfile:
        """The core's cost model, rebuilt from the stored MACs (so predictions match `MacProfile.predict`)."""
        m = self.macs
        return MacProfile(
            str(m["model_class"]),
            tuple(m["components"]),
            int(m["total"]),
            m["per_component"].double(),
            m["per_block"].double(),
        )

    def unit_costs(self, kind: str = "macs") -> tuple[torch.Tensor, float]:
        """Per-call cost `[blocks, components]` of each unit and the cost of one whole transformer forward.

        `kind` is 'macs' (counted) or 'latency' (seconds measured on the calibration device). Absent units cost 0.
        """
        if kind == "macs":
            if self.mode == "block":
                per_unit = self.macs["per_block"].double()[:, None].clone()
            else:
                per_unit = self.macs["per_component"].double().clone()
            total = float(self.macs["total"])
        elif kind == "latency":
            per_unit = self.latency.double().clone()
            total = float(per_unit[self.present].sum()) + float(self.latency_remainder)
            if total <= 0:
                raise CalibrationError("this calibration has no latency measurements; budget MACs instead")
        else:
            raise ValueError(f"unknown cost {kind!r}; expected 'macs' or 'latency'")
        per_unit[~self.present] = 0.0
        return per_unit, total

    def summary(self) -> str:
        """A readable overview: what was calibrated, on what, and the mean neighbour / worst error per block."""
        t = self.num_steps
        lines = [
            f"{self.model_class}: {t} steps x {self.num_blocks} blocks x {list(self.components)} ({self.mode} mode)",
            f"samples: {self.num_samples}   device: {self.meta.get('device')}   prompts: "
            f"{len(self.meta.get('prompts') or [])}",
        ]
        if t > 1:
            idx = torch.arange(t - 1)
            neighbour = self.rel_l1[:, :, idx, idx + 1].mean(-1)  # [B, C]
            far = self.rel_l1[:, :, 0, t - 1]
            lines.append("rel. L1 of reuse, per block (next step / first->last step):")
            for b in range(self.num_blocks):
                cells = [
                    f"{name}={float(neighbour[b, c]):.3f}/{float(far[b, c]):.3f}"
                    for c, name in enumerate(self.components)
                    if bool(self.present[b, c])
                ]
                lines.append(f"  {b:>3} " + " ".join(cells))
        lines.append(
            f"latency per forward: {float(self.latency[self.present].sum()) + self.latency_remainder:.4g} s "
            f"(outside units {self.latency_remainder:.3g} s);  MACs per forward: {float(self.macs['total']):.4g}"
        )
        return "\n".join(lines)

    # ---------------------------------------------------------------- files
    def _meta(self) -> dict[str, Any]:
        return {
            "format": CALIBRATION_FORMAT,
            "version": CALIBRATION_VERSION,
            "model_class": self.model_class,
            "mode": self.mode,
            "components": list(self.components),
            "num_steps": self.num_steps,
            "num_blocks": self.num_blocks,
            "num_samples": self.num_samples,
            "latency_remainder": self.latency_remainder,
            "macs_model_class": self.macs["model_class"],
            "macs_components": list(self.macs["components"]),
            "macs_total": int(self.macs["total"]),
            **self.meta,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write `path` (a torch file loadable with `weights_only=True`) and a readable `<path>.json` beside it.

        The torch file is self-contained; the JSON repeats its metadata (model, components, steps, prompts, samples,
        device) and per-block latency so a person can see what a calibration is without loading it.
        """
        path = os.fspath(path)
        meta = self._meta()
        payload = {
            "meta": json.dumps(meta),
            "present": self.present.clone(),
            "rel_l1": self.rel_l1.clone(),
            "cosine": self.cosine.clone(),
            "pair_counts": self.pair_counts.clone(),
            "latency": self.latency.clone(),
            "macs_per_component": self.macs["per_component"].clone(),
            "macs_per_block": self.macs["per_block"].clone(),
        }
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        readable = {**meta, "latency_s": self.latency.tolist(), "summary": self.summary().splitlines()}
        with atomic_write(f"{path}.json") as f:
            json.dump(readable, f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        """Read a file written by `save`; raises `FileNotFoundError` or `CalibrationError` with one-line reasons."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"calibration file not found: {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            meta = json.loads(payload["meta"])
        except Exception as err:  # torch raises many types for a file that is not one of ours
            raise CalibrationError(f"{path} is not a cachekit calibration ({type(err).__name__})") from None
        if meta.get("format") != CALIBRATION_FORMAT:
            raise CalibrationError(f"{path} is not a cachekit calibration (format {meta.get('format')!r})")
        if meta.get("version") != CALIBRATION_VERSION:
            raise CalibrationError(
                f"{path}: calibration version {meta.get('version')!r}; this cachekit reads {CALIBRATION_VERSION}"
            )
        core = {
            "format", "version", "model_class", "mode", "components", "num_steps", "num_blocks", "num_samples",
            "latency_remainder", "macs_model_class", "macs_components", "macs_total",
        }
        try:
            return cls(
                model_class=meta["model_class"],
                mode=meta["mode"],
                components=tuple(meta["components"]),
                present=payload["present"].bool(),
                num_steps=int(meta["num_steps"]),
                rel_l1=payload["rel_l1"].double(),
                cosine=payload["cosine"].double(),
                pair_counts=payload["pair_counts"],
                num_samples=int(meta["num_samples"]),
                latency=payload["latency"].double(),
                latency_remainder=float(meta["latency_remainder"]),
                macs={
                    "model_class": meta["macs_model_class"],
                    "components": tuple(meta["macs_components"]),
                    "total": int(meta["macs_total"]),
                    "per_component": payload["macs_per_component"].double(),
                    "per_block": payload["macs_per_block"].double(),
                },
                meta={k: v for k, v in meta.items() if k not in core},
            )
        except KeyError as err:
            raise CalibrationError(f"{path}: corrupt calibration, missing {err}") from None


# ---------------------------------------------------------------------------------------------------------- recording
def _rows_matrix(value: Any, batch: int) -> torch.Tensor:
    """All batched tensors of a unit's output (or residual), one flat row per batch row: `[batch, features]`."""
    parts: list[torch.Tensor] = []

    def take(t: torch.Tensor) -> None:
        if t.ndim > 0 and t.shape[0] == batch and t.is_floating_point():
            parts.append(t.detach().reshape(batch, -1))

    map_tensors(take, value)
    if not parts:
        raise RuntimeError("a calibrated unit returned no batched floating-point tensor")
    return parts[0] if len(parts) == 1 else torch.cat([p.to(parts[0].dtype) for p in parts], 1)


class _Recorder:
    """State of one calibration run: the forward in progress, the per-generation history, the running sums."""

    def __init__(
        self,
        session: CacheSession,
        layout: ModelLayout,
        num_steps: int,
        device: torch.device,
        max_features: int | None,
        seed: int,
        bar: Any,
    ) -> None:
        blocks, comps, t = layout.num_blocks, len(layout.components), num_steps
        self.session = session
        self.num_steps = num_steps
        self.device = device
        self.max_features = max_features
        self.seed = seed
        self.bar = bar
        self.l1_sum = torch.zeros(blocks, comps, t, t, dtype=torch.float64)
        self.cos_sum = torch.zeros(blocks, comps, t, t, dtype=torch.float64)
        self.pair_counts = torch.zeros(t, t, dtype=torch.float64)
        self.num_samples = 0
        self.unit_seconds: dict[tuple[int, int], list[float]] = {}
        self.remainders: list[float] = []
        self.pending: list[tuple[int, int, torch.Tensor, float]] = []
        self.pending_rows: StepRows | None = None
        self.history: dict[tuple[int, int, tuple], tuple[torch.Tensor, list[int]]] = {}
        self.feature_index: dict[tuple[int, int], torch.Tensor] = {}
        self.first_inputs: tuple[tuple, dict] | None = None
        self._last_step: int | None = None

    def time(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """Run `fn` once, timed on the device (CUDA events on GPU, perf_counter on CPU), and return its output."""
        holder: list[Any] = []
        seconds = time_call(lambda: holder.append(fn()), self.device)
        return holder[0], seconds

    def stash(self, block: int, comp: int, rows: StepRows, value: Any, seconds: float) -> None:
        if rows.uniform_step is None:
            raise RuntimeError("calibration runs plain generations: every batch row must be at the same step")
        self.pending_rows = rows
        flat = self._features(block, comp, _rows_matrix(value, rows.batch_size))
        self.pending.append((block, comp, flat, seconds))
        self.unit_seconds.setdefault((block, comp), []).append(seconds)

    def _features(self, block: int, comp: int, flat: torch.Tensor) -> torch.Tensor:
        """The coordinates compared for this unit, as float32 (a fixed random subset when there are too many)."""
        if self.max_features is None or flat.shape[1] <= self.max_features:
            return flat.to(torch.float32, copy=True)  # a copy: the block may modify its output in place later
        key = (block, comp)
        if key not in self.feature_index:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + block * 101 + comp)
            index = torch.randperm(flat.shape[1], generator=gen)[: self.max_features].sort().values
            self.feature_index[key] = index.to(flat.device)
        return flat.index_select(1, self.feature_index[key]).float()

    def flush(self, forward_seconds: float) -> None:
        """After a transformer forward: turn the stashed outputs into error sums (outside the timed region)."""
        pending, rows = self.pending, self.pending_rows
        self.pending, self.pending_rows = [], None
        if rows is None:
            return
        self.remainders.append(max(0.0, forward_seconds - sum(p[3] for p in pending)))
        step, batch = rows.uniform_step, rows.batch_size
        if step == 0:
            self.num_samples += batch
        seen: list[int] = []
        for block, comp, flat, _ in pending:
            key = (block, comp, rows.keys)
            if step == 0 or key not in self.history:
                self.history[key] = (flat.new_empty(self.num_steps, *flat.shape), [])
            buffer, filled = self.history[key]
            prev = [i for i in filled if i < step]
            if prev:
                past = buffer[prev]  # [n, batch, features]
                rel = (past - flat).abs().sum(-1) / flat.abs().sum(-1).clamp_min(torch.finfo(flat.dtype).tiny)
                cos = F.cosine_similarity(past, flat.expand_as(past), dim=-1, eps=1e-12)
                self.l1_sum[block, comp, prev, step] += rel.sum(1).double().cpu()
                self.cos_sum[block, comp, prev, step] += (1.0 - cos).clamp_min(0.0).sum(1).double().cpu()
            buffer[step] = flat
            filled.append(step)
            seen = prev
            if step == self.num_steps - 1:
                del self.history[key]
        self.pair_counts[seen + [step], step] += batch
        if self.bar is not None and step != self._last_step:  # one tick per step, however many CFG branches
            self.bar.update(1)
            self._last_step = step


class _UnitRecordHook(ModelHook):
    """On a component (or a whole block): time its forward and stash its output (or block residual) for the step."""

    def __init__(self, recorder: _Recorder, block: int, comp: int, residual_of: tuple[str, ...] | None) -> None:
        super().__init__()
        self.recorder = recorder
        self.block = block
        self.comp = comp
        self.residual_of = residual_of
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self._signature = inspect.signature(type(module).forward)
        return module

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        rows = self.recorder.session.current_rows()
        if rows is None:  # outside a tracked transformer forward: nothing to record
            return self.fn_ref.original_forward(*args, **kwargs)
        output, seconds = self.recorder.time(lambda: self.fn_ref.original_forward(*args, **kwargs))
        value = output
        if self.residual_of is not None:  # block mode: the block's residual output - input, per stream
            bound = self._signature.bind(None, *args, **kwargs)
            outputs = output if isinstance(output, tuple) else (output,)
            value = tuple(
                out - bound.arguments.get(name)
                for out, name in zip(outputs, self.residual_of)
                if isinstance(out, torch.Tensor) and isinstance(bound.arguments.get(name), torch.Tensor)
            )
        self.recorder.stash(self.block, self.comp, rows, value, seconds)
        return output


class _ForwardRecordHook(ModelHook):
    """On the transformer: time the whole forward, keep its first inputs (for MACs), then fold in the errors."""

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.recorder.first_inputs is None:
            self.recorder.first_inputs = (args, dict(kwargs))
        output, seconds = self.recorder.time(lambda: self.fn_ref.original_forward(*args, **kwargs))
        self.recorder.flush(seconds)
        return output


def _attach(transformer: nn.Module, layout: ModelLayout, recorder: _Recorder, mode: str) -> list[nn.Module]:
    hooked = [transformer]
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_ForwardRecordHook(recorder), CALIBRATE_HOOK)
    for ref in layout.blocks:
        if mode == "block":
            hook = _UnitRecordHook(recorder, ref.index, 0, ref.group.residual_outputs)
            HookRegistry.check_if_exists_or_initialize(ref.module).register_hook(hook, CALIBRATE_HOOK)
            hooked.append(ref.module)
            continue
        for c, name in enumerate(layout.components):
            if bool(layout.present[ref.index, c]):
                module = getattr(ref.module, name)
                HookRegistry.check_if_exists_or_initialize(module).register_hook(
                    _UnitRecordHook(recorder, ref.index, c, None), CALIBRATE_HOOK
                )
                hooked.append(module)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    return hooked


def _detach(transformer: nn.Module, hooked: Sequence[nn.Module]) -> None:
    for module in hooked:
        module._diffusers_hook.remove_hook(CALIBRATE_HOOK, recurse=False)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()


def _device_of(module: nn.Module) -> torch.device:
    for param in module.parameters():
        return param.device
    return torch.device("cpu")


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


# ------------------------------------------------------------------------------------------------- entry points
def calibrate_transformer(
    transformer: nn.Module,
    run: Callable[[], Any],
    num_steps: int,
    *,
    scheduler: Any,
    mode: str = "component",
    macs: MacProfile | None = None,
    max_features: int | None = DEFAULT_MAX_FEATURES,
    seed: int = 0,
    progress: bool = True,
    generations: int | None = None,
    meta: dict[str, Any] | None = None,
) -> Calibration:
    """Calibrate a transformer while `run()` drives it through complete `num_steps`-step generations.

    `run` is any loop that calls the transformer with `scheduler`'s timesteps (a pipeline call, or the plain loop of
    `tests/tiny_models.denoise`); it may run several generations (batches of prompts), each one from step 0.

    Args:
        scheduler: the scheduler whose timesteps `run` uses; the cachekit step tracker reads the step from it.
        mode: 'component' (ECAD: each component's raw output) or 'block' (whole-block residuals, FORA-style).
        macs: the MAC profile to record; measured on the first transformer call's inputs when omitted.
        max_features: compare at most this many output coordinates per row, chosen at random once per unit (None:
            all). Every unit's output at every step is kept until its generation ends; for PixArt at 1024 px that
            is tens of GB in full, about 1 GB at the default 65536, which estimates both metrics closely. The
            small bundled model's outputs are compared whole.
        seed: seeds the coordinate subset.
        generations: how many generations `run` makes, for the progress bar's total.
        meta: extra JSON-able metadata to record (prompts, call settings).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    if max_features is not None and max_features < 1:
        raise ValueError(f"max_features must be positive, got {max_features}")
    if session_of(transformer) is not None:
        raise RuntimeError("cachekit is enabled on this transformer; call cachekit.disable before calibrating")
    layout = resolve_layout(transformer, mode)
    device = _device_of(transformer)
    schedule = Schedule.full(transformer, num_steps, mode=mode, scheduler=type(scheduler).__name__)
    cachekit.enable(transformer, schedule, scheduler=scheduler)
    session = cachekit.sessions(transformer)[0]
    total = generations * num_steps if generations else None
    bar = tqdm(total=total, desc="calibrate", unit="step", disable=not progress, leave=False)
    recorder = _Recorder(session, layout, num_steps, device, max_features, seed, bar)
    hooked: list[nn.Module] = []
    start = time.perf_counter()
    try:
        hooked = _attach(transformer, layout, recorder, mode)
        with torch.no_grad():
            run()
    finally:
        _detach(transformer, hooked)
        cachekit.disable(transformer)
        bar.close()
    seconds = time.perf_counter() - start

    counts = recorder.pair_counts
    if recorder.num_samples == 0 or bool((counts.diagonal() == 0).any()):
        missing = (counts.diagonal() == 0).nonzero().flatten().tolist()
        raise RuntimeError(
            f"calibration saw no complete {num_steps}-step generation (steps never run: {missing}); "
            f"`run` must call the transformer at every step of the scheduler's {num_steps} timesteps"
        )
    denom = counts.clamp_min(1.0)
    blocks, comps = layout.num_blocks, len(layout.components)
    latency = torch.zeros(blocks, comps, dtype=torch.float64)
    for (b, c), values in recorder.unit_seconds.items():
        latency[b, c] = _median(values)
    extra = dict(meta or {})
    if macs is None:
        args, kwargs = recorder.first_inputs
        macs = MacProfile.measure(transformer, *args, **kwargs)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        extra["mac_rows"] = int(hidden.shape[0])  # MACs are for one forward of this many batch rows
    return Calibration(
        model_class=layout.model_class,
        mode=mode,
        components=layout.components,
        present=layout.present.clone(),
        num_steps=num_steps,
        rel_l1=recorder.l1_sum / denom,
        cosine=recorder.cos_sum / denom,
        pair_counts=counts,
        num_samples=recorder.num_samples,
        latency=latency,
        latency_remainder=_median(recorder.remainders),
        macs={
            "model_class": macs.model_class,
            "components": tuple(macs.components),
            "total": int(macs.total),
            "per_component": macs.per_component.double().clone(),
            "per_block": macs.per_block.double().clone(),
        },
        meta={
            "device": str(device),
            "timer": "cuda-events" if device.type == "cuda" else "perf_counter",
            "scheduler": type(scheduler).__name__,
            "dtype": str(next(transformer.parameters()).dtype).replace("torch.", ""),
            "max_features": max_features,
            "calibration_seconds": round(seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra,
        },
    )


def calibrate(
    pipe: Any,
    prompts: Sequence[str],
    num_steps: int,
    *,
    batch_size: int | None = None,
    seed: int = 0,
    mode: str = "component",
    max_features: int | None = DEFAULT_MAX_FEATURES,
    progress: bool = True,
    **call_kwargs: Any,
) -> Calibration:
    """Calibrate a stock diffusers pipeline's transformer on `prompts`, `num_steps` steps each.

    The pipeline runs uncached (outputs are exact; only latents are produced, no VAE decode) in batches of
    `batch_size` prompts (all at once by default), prompt k seeded with `seed + k`. `call_kwargs` go to every
    pipeline call (e.g. `guidance_scale`, `height`, `width`); use the same settings you will generate with, since
    errors depend on them. MACs are counted with `MacProfile.measure` on the transformer's first call of the run
    (its batch rows are recorded as `meta["mac_rows"]`); schedules only use their ratios.
    """
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise UsageError("calibration needs at least one prompt")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"batch_size must be positive, got {batch_size}")
    size = batch_size or len(prompts)
    call = PipelineCall(tuple(prompts), num_steps, call_kwargs, tuple(seed + k for k in range(len(prompts))),
                        output_type="latent")
    chunks = call.chunks(size)

    def run() -> None:
        for chunk in chunks:
            chunk(pipe)

    settings = {k: v for k, v in call_kwargs.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return calibrate_transformer(
        pipe.transformer,
        run,
        num_steps,
        scheduler=pipe.scheduler,
        mode=mode,
        max_features=max_features,
        seed=seed,
        progress=progress,
        generations=len(chunks),
        meta={"pipeline": type(pipe).__name__, "prompts": prompts, "seed": seed, "batch_size": size,
              "call_kwargs": settings},
    )
