"""The private diffusers internals cachekit relies on are still there (fails loudly on a diffusers that moved one)."""

from __future__ import annotations

import diffusers

from cachekit.compat import check_diffusers


def test_every_private_diffusers_internal_cachekit_touches_still_exists():
    problems = check_diffusers()
    assert problems == [], f"diffusers {diffusers.__version__} changed: {problems}; update cachekit/compat.py"


def test_no_module_but_compat_imports_private_diffusers_names():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    private = re.compile(r"from diffusers[\w.]*\._\w+|from diffusers\.hooks\.hooks import|import _[A-Z]")
    offenders = [str(path.relative_to(root)) for folder in ("cachekit", "search", "eval", "pipelines")
                 for path in (root / folder).rglob("*.py")
                 if path.name != "compat.py" and private.search(path.read_text())]
    assert offenders == []
