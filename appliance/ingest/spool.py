"""The spool: complete files waiting for analysis, under the state directory. Every ingest path ends here.

    <state>/spool/<seq>.dcm          waiting (names sort in arrival order; opaque: no patient data in names or logs)
    <state>/spool/.incoming/         private staging for copies (never read by the daemon)
    <state>/processed/<date>/<seq>.dcm   analysed (or duplicate) files, pruned after watch.keep_processed_days
    <state>/quarantine/<seq>.dcm + <seq>.dcm.reason   files that could not be used, and why

Other ingest paths (a DICOM C-STORE receiver, a script) hand over complete files with `Spool(state_dir).accept(...)`
(a path, bytes, or a pydicom Dataset). A file appears in the spool atomically (rename), is fsynced before the
source is removed, and is taken from there by the daemon. When the state disk is short of space `accept` raises
`SpoolFull` (a DICOM receiver should answer C-STORE with 0xA700, out of resources).
"""
from __future__ import annotations

import datetime as dt
import errno
import itertools
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_counter = itertools.count()
_counter_lock = threading.Lock()


class SpoolFull(OSError):
    """Not enough free space on the state disk to take another file."""


def fsync_dir(path: Path) -> None:
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


class Spool:
    def __init__(self, state_dir: str | Path, min_free_mb: int = 0, notify: Callable[[], None] | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "spool"
        self.incoming = self.dir / ".incoming"
        self.processed_dir = self.state_dir / "processed"
        self.quarantine_dir = self.state_dir / "quarantine"
        for d in (self.dir, self.incoming, self.processed_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.min_free_mb = min_free_mb
        self.notify = notify

    # -- space --------------------------------------------------------------------------------------------------
    def free_mb(self) -> float:
        return shutil.disk_usage(self.state_dir).free / 2**20

    def has_room(self) -> bool:
        return self.min_free_mb <= 0 or self.free_mb() >= self.min_free_mb

    def _check_room(self) -> None:
        if not self.has_room():
            raise SpoolFull(errno.ENOSPC, f"state disk has {self.free_mb():.0f} MB free, below the "
                                          f"{self.min_free_mb} MB minimum (watch.min_free_mb)")

    # -- taking files in ----------------------------------------------------------------------------------------
    @staticmethod
    def new_name(suffix: str = ".dcm") -> str:
        with _counter_lock:
            n = next(_counter)
        return f"{time.time_ns():020d}-{os.getpid()}-{n % 1_000_000:06d}{suffix}"

    @staticmethod
    def intake_time(path: Path) -> float | None:
        """When a spool file was taken in (its name starts with the intake time in ns)."""
        try:
            return int(Path(path).name[:20]) / 1e9
        except ValueError:
            return None

    def accept(self, src: str | os.PathLike | bytes | bytearray | memoryview, *, keep_source: bool = False) -> Path:
        """Take one complete file into the spool; returns its spool path.

        src: a path (moved by rename when on the same file system, else copied, fsynced and then removed; with
        keep_source=True always copied) or the file's bytes. Raises SpoolFull when the state disk is short of space.
        """
        self._check_room()
        dest = self.dir / self.new_name()
        if isinstance(src, (bytes, bytearray, memoryview)):
            self._write_staged(dest, lambda f: f.write(src))
        else:
            p = Path(src)
            moved = False
            if not keep_source:
                try:
                    os.rename(p, dest)
                    moved = True
                except OSError as e:
                    if e.errno != errno.EXDEV:
                        raise
            if moved:
                fsync_dir(self.dir)
            else:
                with open(p, "rb") as fin:
                    self._write_staged(dest, lambda f: shutil.copyfileobj(fin, f, 1 << 20))
                if not keep_source:
                    p.unlink()
        if self.notify:
            self.notify()
        return dest

    def accept_dataset(self, ds: Any) -> Path:
        """Take a pydicom Dataset (with file_meta, e.g. from a C-STORE event) as a DICOM Part 10 file."""
        import io

        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return self.accept(buf.getvalue())

    def _write_staged(self, dest: Path, write: Callable[[Any], Any]) -> None:
        tmp = self.incoming / (dest.name + ".part")
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.dir)

    # -- what waits -------------------------------------------------------------------------------------------
    def pending(self) -> list[Path]:
        """Spool files in arrival order."""
        try:
            names = sorted(e.name for e in os.scandir(self.dir) if not e.name.startswith(".") and e.is_file())
        except FileNotFoundError:
            return []
        return [self.dir / n for n in names]

    # -- where files end ---------------------------------------------------------------------------------------
    def processed_path(self, name: str, when: float | None = None) -> Path:
        day = dt.datetime.fromtimestamp(when or time.time()).strftime("%Y-%m-%d")
        return self.processed_dir / day / name

    def move(self, path: Path, dest: Path) -> Path:
        """Move a spool file to its final place (no-op when it is already there)."""
        if not path.exists() and dest.exists():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        try:
            os.utime(dest)  # pruning counts from when the file was processed
        except OSError:
            pass
        return dest

    def quarantine_path(self, name: str) -> Path:
        return self.quarantine_dir / name

    def quarantine(self, path: Path, reason: str, details: dict[str, str] | None = None) -> Path:
        """Move a file to quarantine/ with `<name>.reason` beside it (written first, so a reason never goes
        missing)."""
        dest = self.quarantine_path(path.name)
        lines = [f"reason: {reason}", f"time: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}"]
        lines += [f"{k}: {v}" for k, v in (details or {}).items()]
        reason_file = dest.with_name(dest.name + ".reason")
        tmp = reason_file.with_name(reason_file.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, reason_file)
        if path.exists():
            os.replace(path, dest)
        return dest

    def clean_incoming(self, max_age_s: float = 3600.0, now: float | None = None) -> int:
        """Remove staging leftovers of writers that died mid-copy (older than max_age_s: a live writer's file is
        younger). Returns how many went."""
        cutoff = (now or time.time()) - max_age_s
        n = 0
        for f in self.incoming.iterdir() if self.incoming.is_dir() else []:
            try:
                if f.stat().st_mtime < cutoff:
                    f.unlink()
                    n += 1
            except OSError:
                continue
        return n

    def prune_processed(self, keep_days: float, now: float | None = None) -> int:
        """Delete processed files older than keep_days (0: keep everything). Returns how many went."""
        if keep_days <= 0:
            return 0
        cutoff = (now or time.time()) - keep_days * 86400
        n = 0
        for day in sorted(self.processed_dir.iterdir()) if self.processed_dir.is_dir() else []:
            if not day.is_dir():
                continue
            for f in day.iterdir():
                try:
                    if f.stat().st_mtime < cutoff:
                        f.unlink()
                        n += 1
                except OSError:
                    continue
            try:
                day.rmdir()  # only when empty
            except OSError:
                pass
        return n
