"""Atomic file writes: a crash or a full disk never leaves a half-written file, nor a temporary one beside it.

Every file cachekit writes (schedules, calibrations, checkpoints, reports, images) goes through `atomic_path` or
`atomic_write`: the content goes to a hidden temporary file in the target's own folder, which is renamed over the
target only once complete. If anything fails, the temporary file is removed and the error names the real target,
not the temporary path.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import CachekitError

__all__ = ["OutputError", "atomic_path", "atomic_write", "check_writable", "write_text", "save_figure", "read_json"]


class OutputError(CachekitError, OSError):
    """An output location cachekit cannot write: a folder where a file is expected, no permission, a full disk."""


def check_writable(path: str | os.PathLike, *, directory: bool = False) -> Path:
    """Fail now, before any work, if `path` cannot be written (a file, or with `directory=True` a folder).

    Checks what can be checked without writing: a file target is not an existing folder, a folder target is not an
    existing file, and the nearest existing parent is a writable folder. Returns the path as a `Path`.
    """
    target = Path(path).expanduser()
    if str(path) == "":
        raise OutputError("the output path is empty")
    if directory:
        if target.exists() and not target.is_dir():
            raise OutputError(f"cannot write into {target}: it is a file, not a folder")
    elif target.is_dir():
        raise OutputError(f"cannot write {target}: it is a folder; give a file name")
    parent = target if directory and target.is_dir() else target.parent
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"cannot write {target}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {target}: no permission to write in {parent}")
    return target


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to; it replaces `path` when the block ends without error.

    `suffix` is the temporary file's extension (default: the target's), for writers that infer the format from it
    (PIL, matplotlib). Missing parent folders are created.
    """
    target = check_writable(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                        suffix=f".tmp{target.suffix if suffix is None else suffix}")
    except OSError as err:
        raise OutputError(f"cannot write {target}: {err.strerror or err}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as err:
        _remove_quietly(tmp)
        if isinstance(err, CachekitError):
            raise
        reason = err.strerror or errno.errorcode.get(err.errno or 0, "") or str(err)
        raise OutputError(f"cannot write {target}: {reason}") from err
    except BaseException:
        _remove_quietly(tmp)
        raise


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """`with atomic_write(path) as f: f.write(...)`: an `open(path, mode)` that only ever leaves the whole file."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_write writes whole files; mode must start with 'w', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a whole text file (UTF-8) atomically."""
    with atomic_write(path, encoding="utf-8") as f:
        f.write(text)


def save_figure(figure: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> None:
    """Save a matplotlib figure atomically, in the format its file name says (PNG by default)."""
    target = Path(path)
    fmt = target.suffix.lstrip(".") or "png"
    with atomic_path(target) as tmp:
        figure.savefig(tmp, format=fmt, **savefig_kwargs)


def read_json(path: str | os.PathLike, what: str, error: type[Exception] = CachekitError) -> Any:
    """The JSON content of a file a user named; a missing file, a folder or non-JSON is `error` naming `what`."""
    if os.path.isdir(path):
        raise error(f"{path} is a folder, not a {what} file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{what} file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path} is not a {what} file: not JSON ({err})") from None


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
