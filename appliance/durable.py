"""Durable files: written completely or not at all, and still there after a power cut.

`atomic_write(path, data)` writes a hidden temporary file in the same folder, fsyncs it, renames it over `path`
and fsyncs the folder, so a reader sees the old content or the new one, never half of it. `fsync_dir(path)` makes a
rename or an unlink in `path` durable. Pure standard library: every layer may use it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (its entries: renames, new and removed files); silently a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, mode: int | None = None,
                 sync_dir: bool = True) -> Path:
    """Write `data` (str: UTF-8) to `path` completely or not at all; `mode`: file permissions (e.g. 0o600),
    set before the data is written. Returns the path."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else bytes(data)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return path
