"""Tester mixins: every caching technique over every registered tiny model config, as diffusers' cache testers do.

A technique is a subclass of `CacheTechniqueTester` that says how to build its plan for a model, once reusing nothing
and once reusing something. The mixin then checks, for each model class in `cachekit.registry.supported_models()`:

- nothing reused: the output is bit-identical to the never-hooked model;
- reuse acts: rows were served from cache and the output changed (and stays finite);
- disable restores: afterwards the model computes exactly what a never-hooked model computes;
- double enable raises.

Adding a model to the registry (and its tiny config to `tiny_models.TINY_MODELS`) tests it with every technique.
A technique that cannot act on a model (TGATE without cross-attention) says why in `not_applicable`, and the
mixin checks that building its plan there is a clear error instead of silently doing nothing.

The core classes (`MODELS`) get each check as its own test; the coverage classes (`COVERAGE_MODELS`) get all of
them through `sweep`, one test per class (`test_techniques.py`).
"""

from __future__ import annotations

import pytest
import torch

import cachekit
from cachekit.registry import supported_models
from tiny_models import CORE_MODELS, TINY_MODELS, build, denoise

STEPS = 6
MODELS = [name for name in supported_models() if name in CORE_MODELS]
"""The classes each check runs on as its own test: the seven core classes, in depth."""
COVERAGE_MODELS = [name for name in supported_models() if name not in CORE_MODELS]
"""The coverage classes: each goes through every technique's checks in one test (`sweep`), so that forty more
classes cost about a second each instead of a test per check."""


def run(model: torch.nn.Module, name: str, plan=None) -> tuple[torch.Tensor, cachekit.sessions]:
    """The tiny model's denoising loop, with `plan` enabled for the loop if given; returns (latents, stats)."""
    tiny = TINY_MODELS[name]
    scheduler = tiny.scheduler()
    if plan is None:
        return denoise(model, tiny, STEPS, scheduler=scheduler), None
    with cachekit.cached(model, plan, scheduler=scheduler):
        latents = denoise(model, tiny, STEPS, scheduler=scheduler)
        stats = cachekit.sessions(model)[0].stats
    return latents, stats


class CacheTechniqueTester:
    """Mixin: the four checks of one technique, over every registered model class."""

    def plan(self, model: torch.nn.Module, reuse: bool):
        """The technique's plan for `model` at `STEPS` steps: reusing nothing (`reuse=False`) or something."""
        raise NotImplementedError

    def not_applicable(self, model: torch.nn.Module) -> str | None:
        """A regex of the error building the plan raises on a model the technique cannot act on (None: it can)."""
        return None

    @pytest.fixture(params=MODELS)
    def name(self, request) -> str:
        return request.param

    @pytest.fixture
    def model(self, name: str) -> torch.nn.Module:
        return build(name)

    def _plan_or_skip(self, model: torch.nn.Module, reuse: bool):
        reason = self.not_applicable(model)
        if reason is not None:
            with pytest.raises((ValueError, TypeError), match=reason):
                self.plan(model, reuse)
            pytest.skip(f"{type(self).__name__} cannot act on {type(model).__name__} (checked: a clear error)")
        return self.plan(model, reuse)

    def sweep(self, model: torch.nn.Module, name: str, reference: torch.Tensor, *, check_restore: bool = True) -> bool:
        """The four checks on one model in one pass, against its uncached `reference`; False where the technique
        cannot act on the model (after checking that it says so clearly). `check_restore=False` leaves the run
        after disabling to the caller, who sweeps many techniques and checks once at the end."""
        reason = self.not_applicable(model)
        if reason is not None:
            with pytest.raises((ValueError, TypeError), match=reason):
                self.plan(model, True)
            return False
        out, stats = run(model, name, self.plan(model, reuse=False))
        assert torch.equal(out, reference) and stats.reused == 0, f"{type(self).__name__}: nothing reused"
        plan = self.plan(model, reuse=True)
        out, stats = run(model, name, plan)
        assert stats.reused > 0, f"{type(self).__name__}: nothing was reused"
        assert torch.isfinite(out).all() and not torch.equal(out, reference), f"{type(self).__name__}: reuse"
        assert cachekit.sessions(model) == []
        with cachekit.cached(model, plan, scheduler=TINY_MODELS[name].scheduler()):
            with pytest.raises(RuntimeError, match="already enabled"):
                cachekit.enable(model, plan)
        if check_restore:
            assert torch.equal(run(model, name)[0], reference), f"{type(self).__name__}: disable restores"
        return True

    def test_nothing_reused_is_exact(self, model, name):
        plan = self._plan_or_skip(model, reuse=False)
        reference, _ = run(model, name)
        out, stats = run(model, name, plan)
        assert torch.equal(out, reference)
        assert stats.reused == 0

    def test_reuse_acts(self, model, name):
        plan = self._plan_or_skip(model, reuse=True)
        reference, _ = run(model, name)
        out, stats = run(model, name, plan)
        assert stats.reused > 0
        assert torch.isfinite(out).all() and not torch.equal(out, reference)

    def test_disable_restores(self, model, name):
        plan = self._plan_or_skip(model, reuse=True)
        run(model, name, plan)
        assert cachekit.sessions(model) == []
        after, _ = run(model, name)
        assert torch.equal(after, run(build(name), name)[0])

    def test_double_enable_raises(self, model, name):
        plan = self._plan_or_skip(model, reuse=True)
        with cachekit.cached(model, plan, scheduler=TINY_MODELS[name].scheduler()):
            with pytest.raises(RuntimeError, match="already enabled"):
                cachekit.enable(model, plan)
        assert cachekit.sessions(model) == []
