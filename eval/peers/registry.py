"""The peers, their rows, and running them: `Peer` / `PEERS`, `PeerRow`, `run_peer` / `run_peers`, the copies.

Peers run on a copy of the pipeline's transformer, never on the pipeline itself, and never two at once: `PeerCopy`
holds the one copy that all peers take turns on (each applied for its calls, then removed, the copy checked clean).
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import dataclasses
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from cachekit.compat import existing_registry, progress_bar_config
from cachekit.pipelines.call import PipelineCall

from . import cachedit, diffusers_caches
from .handle import PeerCannotAct, PeerHandle
from .step_hook import STEP_HOOK
from .work import WorkReport, measure_work

__all__ = ["PEERS", "Peer", "PeerCopy", "PeerRow", "fresh_pipeline", "get_peer", "remove", "run_peer", "run_peers"]

ApplyFn = Callable[["Peer", Any, Any, PipelineCall, Mapping[str, Any]], PeerHandle]


# ------------------------------------------------------------------------------------------------------ the peers
@dataclasses.dataclass(frozen=True)
class Peer:
    """One cache users already have, with its main knob and a sweep of values for ~20 denoising steps.

    `requires` lists ``"module:attribute"`` names the peer needs; `available()` checks them, so a missing package or
    an older release gives a reason in the row instead of an ImportError. `check(pipe)` gives the reason it cannot
    act on a model class (None if it can); `prepare(pipe, call)` measures what the peer needs from the model before
    it can be applied (once, whatever the knob); `apply` raises `PeerCannotAct` for reasons only found then.
    """

    name: str
    family: str
    knob: str
    sweep: tuple[float | int, ...]
    summary: str
    requires: tuple[str, ...]
    install: str
    _apply: ApplyFn = dataclasses.field(repr=False)
    _check: Callable[[Any], str | None] | None = dataclasses.field(default=None, repr=False)
    _prepare: Callable[[Any, PipelineCall], dict[str, Any]] | None = dataclasses.field(default=None, repr=False)

    def available(self) -> tuple[bool, str]:
        """(True, "") if every required package and name imports, else (False, why) — never raises."""
        for requirement in self.requires:
            module_name, _, attr = requirement.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as e:
                return False, f"{module_name.split('.')[0]} is not installed ({e.__class__.__name__}); {self.install}"
            except Exception as e:  # a broken install must not take the bench down either
                return False, f"importing {module_name} failed: {type(e).__name__}: {e}"
            if attr and not hasattr(module, attr):
                version = getattr(importlib.import_module(module_name.split(".")[0]), "__version__", "?")
                return False, f"{module_name} {version} has no {attr}; {self.install}"
        return True, ""

    def check(self, pipe: Any) -> str | None:
        """Why this peer cannot act on `pipe`'s transformer, or None if it can."""
        transformer = getattr(pipe, "transformer", None)
        if not isinstance(transformer, nn.Module):
            return f"{type(pipe).__name__} has no `transformer` (peers hook diffusion transformers)"
        return self._check(pipe) if self._check is not None else None

    def refuse(self, pipe: Any) -> None:
        """Raise `PeerCannotAct` if the peer is unavailable or cannot act on `pipe`; `RuntimeError` if a peer is
        applied to `pipe` already (peers are never stacked)."""
        ok, why = self.available()
        if not ok:
            raise PeerCannotAct(why)
        reason = self.check(pipe)
        if reason is not None:
            raise PeerCannotAct(reason)
        registry = existing_registry(pipe.transformer)
        if registry is not None and registry.get_hook(STEP_HOOK) is not None:
            raise RuntimeError("a peer is already applied to this transformer: remove it or use fresh_pipeline")

    def prepare(self, pipe: Any, call: PipelineCall) -> dict[str, Any]:
        """What the peer measures on the model and call before it can be applied ({} for most peers): MagCache's
        calibrated ratios, FasterCache's CFG layout. The same for every knob value; pass it to `apply` to reuse it."""
        return self._prepare(pipe, call) if self._prepare is not None else {}

    def apply(self, pipe: Any, knob: float | int, call: PipelineCall,
              prepared: Mapping[str, Any] | None = None) -> PeerHandle:
        """Apply the peer at `knob` to `pipe.transformer` for calls shaped like `call`; returns a removable handle.

        Apply to a copy (`PeerCopy`, `fresh_pipeline`): peers are never stacked. `prepared` is `prepare(pipe, call)`
        measured before (measured now if None). Raises `PeerCannotAct` with the reason when the peer cannot act on
        this model or call.
        """
        self.refuse(pipe)
        return self._apply(self, pipe, knob, call, self.prepare(pipe, call) if prepared is None else prepared)


PEERS: tuple[Peer, ...] = (
    Peer("diffusers.fbcache", "diffusers", "threshold", (0.05, 0.1, 0.2),
         "First-Block Cache: skip all blocks after the first while the first block's residual barely changes",
         ("diffusers.hooks:apply_first_block_cache",), "pip install -U diffusers",
         diffusers_caches.apply_fbcache, diffusers_caches.check_block_registry),
    Peer("diffusers.taylorseer", "diffusers", "cache_interval", (2, 3, 4),
         "TaylorSeer: forecast attention outputs by first-order Taylor expansion between full steps",
         ("diffusers.hooks:apply_taylorseer_cache",), "pip install -U diffusers",
         diffusers_caches.apply_taylorseer, diffusers_caches.check_attention),
    Peer("diffusers.magcache", "diffusers", "threshold", (0.02, 0.06, 0.12),
         "MagCache: skip the blocks while calibrated residual-magnitude ratios accumulate little error",
         ("diffusers.hooks:apply_mag_cache",), "pip install -U diffusers",
         diffusers_caches.apply_magcache, diffusers_caches.check_block_registry, diffusers_caches.prepare_magcache),
    Peer("diffusers.fastercache", "diffusers", "unconditional_batch_skip_range", (2, 3, 5),
         "FasterCache: reuse self-attention every other step and approximate the CFG-unconditional branch",
         ("diffusers.hooks:apply_faster_cache",), "pip install -U diffusers",
         diffusers_caches.apply_fastercache, diffusers_caches.check_attention, diffusers_caches.prepare_fastercache),
    Peer("diffusers.pab", "diffusers", "spatial_attention_block_skip_range", (2, 3, 5),
         "Pyramid Attention Broadcast: broadcast self- (every N) and cross-attention (every 3N) in the middle steps",
         ("diffusers.hooks:apply_pyramid_attention_broadcast",), "pip install -U diffusers",
         diffusers_caches.apply_pab, diffusers_caches.check_attention, diffusers_caches.prepare_pab),
    Peer("cache-dit.dbcache", "cache-dit", "residual_diff_threshold", (0.08, 0.12, 0.24),
         "cache-dit DBCache: compute the first Fn and last Bn blocks, reuse the middle while the Fn residual holds",
         ("cache_dit:enable_cache", "cache_dit:BlockAdapter", "cache_dit:DBCacheConfig"), "pip install cache-dit",
         cachedit.apply_dbcache),
    Peer("cache-dit.dbcache-taylorseer", "cache-dit", "residual_diff_threshold", (0.12, 0.24, 0.36),
         "cache-dit DBCache with its TaylorSeer calibrator forecasting the reused residual (order 1)",
         ("cache_dit:enable_cache", "cache_dit:BlockAdapter", "cache_dit:TaylorSeerCalibratorConfig"),
         "pip install cache-dit", cachedit.apply_dbcache_taylorseer),
)


def get_peer(name: str) -> Peer:
    """The peer called `name` (see `PEERS`)."""
    for peer in PEERS:
        if peer.name == name:
            return peer
    raise KeyError(f"no peer {name!r}; known: {', '.join(p.name for p in PEERS)}")


def remove(handle: PeerHandle) -> None:
    """Take a peer off the pipeline it was applied to (same as `handle.remove()`)."""
    handle.remove()


# ------------------------------------------------------------------------------------------------------ the copies
def _hooks_left(transformer: nn.Module) -> str | None:
    """What a peer left on `transformer` (diffusers hooks, a replaced forward), or None if it is clean."""
    for name, module in transformer.named_modules():
        registry = existing_registry(module)
        if registry is not None and registry.hooks:
            return f"hooks {', '.join(registry.hooks)} on {name or type(transformer).__name__}"
    if getattr(transformer, "_is_cached", False) or not _forward_is_own(transformer):
        return "a replaced forward (cache-dit?)"
    return None


def _forward_is_own(module: nn.Module) -> bool:
    """Whether `module.forward` is its class's forward (removing diffusers hooks leaves it as an instance attribute)."""
    forward = vars(module).get("forward")
    return forward is None or (getattr(forward, "__func__", None) is type(module).forward
                               and getattr(forward, "__self__", None) is module)


def fresh_pipeline(pipe: Any) -> Any:
    """A pipeline sharing every component with `pipe` except a deep copy of its transformer (and scheduler).

    The VAE and text encoder are shared (peers do not touch them); the small, stateful scheduler is copied too so the
    copy's denoising loop is independent. The copy is built the documented diffusers way, `type(pipe)(**pipe.components)`.
    """
    left = _hooks_left(pipe.transformer)
    if left is not None:
        raise ValueError(f"the transformer carries {left}: pass the uncached pipeline (remove peers, "
                         "cachekit.disable) before copying it")
    components = dict(pipe.components)
    components["transformer"] = copy_module.deepcopy(pipe.transformer)
    if components.get("scheduler") is not None:
        components["scheduler"] = copy_module.deepcopy(pipe.scheduler)
    new = type(pipe)(**components)
    if hasattr(new, "set_progress_bar_config"):
        new.set_progress_bar_config(**progress_bar_config(pipe))
    return new


class PeerCopy:
    """One transformer copy of `pipe` on which peers take turns, for calls shaped like `call`.

    `with copy.applied(peer, knob): ...` applies the peer to the copy, and removes it on the way out, after which the
    copy must be clean again (removing a peer restores the uncached model exactly; a peer that leaves anything behind
    gets the copy renewed and an error). So however many peers and knob values run, one copy is alive and no two
    caches are ever stacked. What a peer measures on the model before it can be applied (`Peer.prepare`: MagCache's
    calibration run, FasterCache's probe) is measured once per peer and reused by every knob value and application.
    The copy is made when first used. A model that does not fit in memory twice needs one load for it instead.
    """

    def __init__(self, pipe: Any, call: PipelineCall) -> None:
        self.source = pipe
        self.call = call
        self._pipe: Any = None
        self._prepared: dict[Peer, dict[str, Any]] = {}

    @property
    def pipe(self) -> Any:
        """The pipeline with the transformer copy (made now if it was not yet)."""
        if self._pipe is None:
            self._pipe = fresh_pipeline(self.source)
        return self._pipe

    def prepared(self, peer: Peer) -> dict[str, Any]:
        """`peer.prepare(...)` on the copy, measured on first use (after `peer.refuse`) and kept."""
        if peer not in self._prepared:
            peer.refuse(self.pipe)
            self._prepared[peer] = peer.prepare(self.pipe, self.call)
        return self._prepared[peer]

    @contextlib.contextmanager
    def applied(self, peer: Peer, knob: float | int) -> Iterator[PeerHandle]:
        """The copy with `peer` at `knob` applied inside the block, clean again outside it."""
        try:
            handle = peer.apply(self.pipe, knob, self.call, self.prepared(peer))
        except BaseException:
            self._renew_if_dirty()
            raise
        try:
            yield handle
        finally:
            handle.remove()
            left = self._renew_if_dirty()
            if left is not None:
                raise RuntimeError(f"removing {peer.name} left {left}; the transformer copy was renewed")

    def _renew_if_dirty(self) -> str | None:
        left = None if self._pipe is None else _hooks_left(self._pipe.transformer)
        if left is not None:  # never let one peer's leftovers reach the next: a new copy of the uncached model
            self._pipe.transformer = copy_module.deepcopy(self.source.transformer)
        return left


# ------------------------------------------------------------------------------------------------------------ rows
@dataclasses.dataclass
class PeerRow:
    """One peer at one knob value on one model: did it act, what did it skip, and if not, why.

    `status`: ``"acted"`` (work measurably went down), ``"no-skip"`` (it ran and skipped nothing: not a valid
    comparison row), ``"unavailable"`` (package missing), ``"cannot-act"`` (the peer cannot act on this model or
    call) or ``"error"`` (it raised while running; the reason has the exception).
    """

    peer: str
    family: str
    knob: str
    value: float | int | None
    status: str
    reason: str = ""
    work: WorkReport | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def caveat(self) -> str:
        """What a reader must know to read a row that acted (the peer's `details["caveat"]`; "" for none)."""
        return str(self.details.get("caveat", ""))

    @property
    def counts(self) -> bool:
        """Whether the row may enter a comparison: the peer really skipped work on this model."""
        return self.status == "acted"

    @property
    def images(self) -> Any:
        return None if self.work is None else self.work.images

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready row (the images are left out)."""
        return {"peer": self.peer, "family": self.family, "knob": self.knob, "value": self.value,
                "status": self.status, "counts": self.counts, "reason": self.reason, "caveat": self.caveat,
                "work": None if self.work is None else self.work.as_dict(), "config": self.config,
                "details": self.details}


def _why_not(peer: Peer, pipe: Any) -> tuple[str, str] | None:
    """(status, reason) of a peer that cannot run on `pipe` at any knob value, or None if it may."""
    ok, why = peer.available()
    if not ok:
        return "unavailable", why
    reason = peer.check(pipe)
    return None if reason is None else ("cannot-act", reason)


def run_peer(pipe: Any, peer: Peer, knob: float | int, call: PipelineCall, baseline: WorkReport | None = None, *,
             on: PeerCopy | None = None) -> PeerRow:
    """Apply `peer` at `knob` to a copy of `pipe` (`on`, else a new `PeerCopy`), run `call`, measure, remove; never
    raises for the peer. Without `baseline` the uncached call is measured first (on `pipe` itself, never hooked)."""
    row = PeerRow(peer.name, peer.family, peer.knob, knob, "unavailable")
    refused = _why_not(peer, pipe)
    if refused is not None:
        row.status, row.reason = refused
        return row
    if on is not None and on.call != call:
        raise ValueError("the PeerCopy was made for another call")
    if baseline is None:
        baseline = measure_work(pipe, call)
    target = on if on is not None else PeerCopy(pipe, call)
    try:
        with target.applied(peer, knob) as handle:
            row.config, row.details = handle.config, handle.details
            row.work = measure_work(target.pipe, call, baseline)
    except PeerCannotAct as e:
        row.status, row.reason = "cannot-act", str(e)
        return row
    except Exception as e:  # a peer failing on a model is a result to report, not a crash of the bench
        row.status, row.reason = "error", f"{type(e).__name__}: {e}"
        return row
    if row.work.skipped_work:
        row.status = "acted"
        row.reason = (f"MAC ratio {row.work.mac_ratio:.3f}, "
                      f"{row.work.skipped_linear_calls} of {row.work.baseline_block_linear_calls} block linear calls "
                      "skipped")
    else:
        row.status = "no-skip"
        row.reason = f"ran and skipped nothing at {peer.knob}={knob} (MAC ratio {row.work.mac_ratio:.3f})"
    return row


def run_peers(pipe: Any, call: PipelineCall, peers: Sequence[Peer] = PEERS,
              knobs: Mapping[str, Sequence[float | int]] | None = None, baseline: WorkReport | None = None,
              progress: bool = True, *, on: PeerCopy | None = None) -> list[PeerRow]:
    """Every peer over its sweep (or `knobs[peer.name]`) on `pipe` and `call`, all on one transformer copy (`on`,
    else one `PeerCopy` made for these rows), one peer at a time.

    A peer that is unavailable or cannot act on the model gets a single row (value None) saying why. The uncached
    call is measured once, on `pipe` itself, unless `baseline` is given.
    """
    from tqdm.auto import tqdm

    on = on if on is not None else PeerCopy(pipe, call)
    jobs = [(peer, value) for peer in peers for value in ((knobs or {}).get(peer.name) or peer.sweep)]
    rows: list[PeerRow] = []
    settled: set[str] = set()
    for peer, value in tqdm(jobs, desc="peers", disable=not progress):
        if peer.name in settled:
            continue
        refused = _why_not(peer, pipe)
        if refused is None:
            baseline = baseline if baseline is not None else measure_work(pipe, call)
            row = run_peer(pipe, peer, value, call, baseline, on=on)
        else:
            row = PeerRow(peer.name, peer.family, peer.knob, value, *refused)
        if row.status in ("unavailable", "cannot-act"):  # about the model or the install, not about the value
            row.value = None
            settled.add(peer.name)
        rows.append(row)
    return rows
