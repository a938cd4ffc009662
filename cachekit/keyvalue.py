"""`KEY=VALUE` text, the one way cachekit reads settings from a command line or a plan spec.

Values are read as JSON when they parse (`16`, `4.5`, `false`, `null`, `[1, 2]`) and kept as strings otherwise, so
`height=512`, `clean_caption=false` and `prompt_style=photo` all mean what they say.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from .errors import UsageError

__all__ = ["parse_value", "parse_key_values", "parse_options"]


def parse_value(text: str) -> Any:
    """A JSON value if `text` is one (NaN and infinities refused), else the text itself."""
    text = text.strip()
    if text.lower().lstrip("+-") in _NON_FINITE:
        raise UsageError(f"{text!r} is not a finite number")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError:
        return text
    except UsageError:
        raise UsageError(f"{text!r} is not a finite number") from None
    return value


_NON_FINITE = {"nan", "inf", "infinity"}


def _refuse_constant(name: str) -> Any:
    raise UsageError(name)


def parse_key_values(items: Iterable[str], what: str = "setting", *, dash_to_underscore: bool = False) -> dict[str, Any]:
    """`["a=1", "b=x"]` -> `{"a": 1, "b": "x"}`; a malformed or repeated item is a `UsageError` naming `what`."""
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"{what} {item!r} must look like KEY=VALUE")
        if dash_to_underscore:
            key = key.replace("-", "_")
        if key in settings:
            raise UsageError(f"{what} {key!r} is given twice")
        try:
            settings[key] = parse_value(text)
        except UsageError as err:
            raise UsageError(f"{what} {key}: {err}") from None
        value = settings[key]
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{what} {key}: {text!r} is not a finite number")
    return settings


def parse_options(text: str, what: str = "option") -> dict[str, Any]:
    """Comma-separated `key=value` options, as in plan specs: `"interval=3,forecast=2"`."""
    return parse_key_values(filter(None, (part.strip() for part in text.split(","))), what, dash_to_underscore=True)
