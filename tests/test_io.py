"""Atomic writes and KEY=VALUE parsing: one home each, and what they promise."""

from __future__ import annotations

import os

import pytest

from cachekit.errors import UsageError
from cachekit.io import OutputError, atomic_write, check_writable, write_text
from cachekit.keyvalue import parse_key_values, parse_options


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_write(target) as f:
            f.write("half")
            1 / 0
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["out.json"]


def test_a_folder_or_unwritable_target_is_named_in_the_error(tmp_path):
    with pytest.raises(OutputError, match=f"cannot write {tmp_path}: it is a folder"):
        write_text(tmp_path, "x")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # running as root: permissions do not bind
            pytest.skip("permissions are not enforced for this user")
        with pytest.raises(OutputError, match=f"cannot write {locked / 'x.json'}: no permission"):
            check_writable(locked / "x.json")
    finally:
        locked.chmod(0o700)
    assert sorted(os.listdir(tmp_path)) == ["locked"]


def test_write_creates_missing_folders(tmp_path):
    write_text(tmp_path / "a" / "b" / "c.txt", "hello")
    assert (tmp_path / "a" / "b" / "c.txt").read_text() == "hello"


def test_key_values():
    assert parse_key_values(["height=512", "clean_caption=false", "style=photo", "ratios=[1, 2]"]) == {
        "height": 512, "clean_caption": False, "style": "photo", "ratios": [1, 2]}
    assert parse_options("interval=3,forecast-order=2") == {"interval": 3, "forecast_order": 2}
    for bad, message in (("x", "KEY=VALUE"), ("=1", "KEY=VALUE"), ("g=nan", "finite"), ("g=-Infinity", "finite")):
        with pytest.raises(UsageError, match=message):
            parse_key_values([bad], "--pipeline-arg")
    with pytest.raises(UsageError, match="given twice"):
        parse_key_values(["a=1", "a=2"])
