"""Durable files: all or nothing, permissions, no temporary left behind."""
from __future__ import annotations

import os
import stat

import pytest

from appliance.durable import atomic_write, fsync_dir


def test_atomic_write_replaces_whole_content_with_mode_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "secret.key"
    atomic_write(p, "old")
    atomic_write(p, b"new bytes", mode=0o600)
    assert p.read_bytes() == b"new bytes"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert [x.name for x in tmp_path.iterdir()] == ["secret.key"]
    fsync_dir(tmp_path)  # no error on a real folder
    fsync_dir(tmp_path / "missing")  # nor on a missing one


def test_a_failed_write_keeps_the_old_content(tmp_path, monkeypatch):
    p = tmp_path / "status.json"
    atomic_write(p, "{}")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(p, "{\"half\": ")
    assert p.read_text() == "{}" and [x.name for x in tmp_path.iterdir()] == ["status.json"]
