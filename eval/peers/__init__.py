"""Peers: the feature caches users already have, run on the same model, prompts and seeds as cachekit's policies.

`cachekit bench` compares the uncached model, cachekit's schedules and these peers. A comparison is only fair if
every peer is configured the way its documentation intends *and really acts on the model*: several of diffusers'
caches silently do nothing on a stock PixArt pipeline (no `cache_context` is ever opened, the timestep callback is
missing, the default module patterns match no PixArt module). So a peer row counts only if its measured work went
down, and every row carries the measurement: the transformer's MAC ratio against the uncached call (counted with
`cachekit.cost.count_macs`) and the number of linear-layer calls the transformer blocks skipped. A peer that cannot
act on a model class says why in its row instead of failing.

    from cachekit.eval.peers import PEERS, PipelineCall, run_peers
    call = PipelineCall(["a handwritten 3", "the digit 7"], kwargs=DIGITS_DEFAULTS)   # 20 steps
    rows = run_peers(pipe, call)          # every peer x its sweep, taking turns on one transformer copy
    [row.as_dict() for row in rows]       # JSON for the report; row.counts says whether it may be compared

Peers (sweeps run from the mildest to the most aggressive setting, sized for ~20 denoising steps):

- ``diffusers.fbcache``     First-Block Cache, knob ``threshold``
- ``diffusers.taylorseer``  TaylorSeer, knob ``cache_interval``
- ``diffusers.magcache``    MagCache, knob ``threshold`` (magnitude ratios calibrated once on the same call)
- ``diffusers.fastercache`` FasterCache, knob ``unconditional_batch_skip_range``
- ``diffusers.pab``         Pyramid Attention Broadcast, knob ``spatial_attention_block_skip_range``
- ``cache-dit.dbcache``     cache-dit DBCache, knob ``residual_diff_threshold`` (Fn/Bn scaled to the depth)
- ``cache-dit.dbcache-taylorseer`` the same with cache-dit's TaylorSeer calibrator

How each is made to act on pipelines that do not drive diffusers' cache state (PixArt: no `CacheMixin`, the pipeline
never opens `cache_context`): a small named diffusers `ModelHook` (``cachekit.peer_step``) sits on the transformer
instance while a peer is applied. Around every transformer call it reads the live timestep (the callback PAB and
FasterCache need), sets a diffusers `CacheContext` unless the pipeline already set one (FLUX, Wan), and at step 0 of
every pipeline call resets the peer's state, which a `CacheMixin` pipeline does through `maybe_free_model_hooks` and
PixArt's never does. Nothing is patched on a class. cache-dit is applied transformer-only through a `BlockAdapter`
(its pipeline mode patches the pipeline class's `__call__`, which would leak into every other pipeline of the class).

Modules: `work` (measuring a call's work), `step_hook` (the step/context hook), `handle` (what applying returns),
`diffusers_caches` and `cachedit` (the two peer families), `registry` (the peers, rows, copies and runners).
"""

from cachekit.pipelines.call import PipelineCall

from .handle import PeerCannotAct, PeerHandle
from .registry import PEERS, Peer, PeerCopy, PeerRow, fresh_pipeline, get_peer, remove, run_peer, run_peers
from .step_hook import STEP_HOOK, PeerStepHook
from .work import WorkReport, measure_work

__all__ = [
    "PEERS",
    "Peer",
    "PeerCannotAct",
    "PeerCopy",
    "PeerHandle",
    "PeerRow",
    "PeerStepHook",
    "PipelineCall",
    "STEP_HOOK",
    "WorkReport",
    "fresh_pipeline",
    "get_peer",
    "measure_work",
    "remove",
    "run_peer",
    "run_peers",
]
