"""The spool: complete files waiting for analysis, under the state directory. Every ingest path ends here.

    <state>/spool/<seq>.dcm          waiting (names sort in arrival order; opaque: no patient data in names or logs)
    <state>/spool/.incoming/         private staging for copies (never read by the daemon)
    <state>/spool/.names/<seq>.dcm.json   the original name (and folder) of a file taken from the watch folder,
                                     removed when the file leaves the spool
    <state>/processed/<date>/<seq>.dcm   analysed (or duplicate) files, pruned after watch.keep_processed_days
    <state>/quarantine/<seq>--<original name> (or <seq>.dcm) + the same name with .reason   files that could not be
                                     used, and why; pruned after watch.quarantine_keep_days / beyond
                                     watch.quarantine_max_mb

Other ingest paths (a DICOM C-STORE receiver, a script) hand over complete files with `Spool(state_dir).accept(...)`
(a path, bytes, or a pydicom Dataset). A file appears in the spool atomically (rename), is fsynced before the
source is removed, and is taken from there by the daemon. When the state disk is short of space `accept` raises
`SpoolFull` (a DICOM receiver should answer C-STORE with 0xA700, out of resources).

Original names may carry patient names: they are kept in the sidecar, the quarantine name and its .reason file,
never in log lines (those name spool files only).
"""
from __future__ import annotations

import datetime as dt
import errno
import itertools
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.durable import fsync_dir

_counter = itertools.count()
_counter_lock = threading.Lock()

#: longest original name kept in quarantine (UTF-8 bytes, extension included; file systems allow 255)
MAX_NAME_BYTES = 120
#: the spool name's sequence part (intake time in ns, pid, counter): what a quarantined file and its .reason share
_SEQ = re.compile(r"\d{20}-\d+-\d{6}")
#: quarantined files younger than this are never pruned for size (one may be half-way into quarantine)
PRUNE_GRACE_S = 60.0


class SpoolFull(OSError):
    """Not enough free space on the state disk to take another file."""


def safe_name(name: str, limit: int = MAX_NAME_BYTES) -> str:
    """A sender's file name made safe as one file name: no path separators, control or unprintable characters
    (nor undecodable bytes), no leading dot, at most `limit` UTF-8 bytes with the extension kept."""
    name = "".join(c if c.isprintable() and c not in "/\\" else "_" for c in name).strip().lstrip(".")
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext.encode()) > 16:
        stem, ext = name, ""
    else:
        ext = "." + ext
    stem = stem.encode()[: limit - len(ext.encode())].decode("utf-8", "ignore").rstrip()
    return (stem or "unnamed") + ext


def shown(text: str) -> str:
    """A name as one line of a .reason file: unprintable characters escaped (a name cannot forge a line)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


class Spool:
    def __init__(self, state_dir: str | Path, min_free_mb: int = 0, notify: Callable[[], None] | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "spool"
        self.incoming = self.dir / ".incoming"
        self.names = self.dir / ".names"
        self.processed_dir = self.state_dir / "processed"
        self.quarantine_dir = self.state_dir / "quarantine"
        for d in (self.dir, self.incoming, self.names, self.processed_dir, self.quarantine_dir):
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

    def accept(self, src: str | os.PathLike | bytes | bytearray | memoryview, *, keep_source: bool = False,
               original_name: str | None = None, original_folder: str = "") -> Path:
        """Take one complete file into the spool; returns its spool path.

        src: a path (moved by rename when on the same file system, else copied, fsynced and then removed; with
        keep_source=True always copied) or the file's bytes. original_name (and original_folder, relative to the
        watch folder): the sender's name, remembered (durably, before the file appears) for quarantine. Raises
        SpoolFull when the state disk is short of space.
        """
        self._check_room()
        dest = self.dir / self.new_name()
        if original_name is not None:
            self._remember(dest.name, original_name, original_folder)
        try:
            if isinstance(src, (bytes, bytearray, memoryview)):
                self._write_staged(dest, lambda f: f.write(src))
            else:
                self._move_in(Path(src), dest, keep_source)
        except BaseException:
            self._forget(dest.name)
            raise
        if self.notify:
            self.notify()
        return dest

    def _move_in(self, p: Path, dest: Path, keep_source: bool) -> None:
        """Rename p to dest (same file system), else copy it (staged, fsynced) and remove p unless kept."""
        if not keep_source:
            try:
                os.rename(p, dest)
                fsync_dir(dest.parent)
                return
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
        with open(p, "rb") as fin:
            self._write_staged(dest, lambda f: shutil.copyfileobj(fin, f, 1 << 20))
        if not keep_source:
            p.unlink()

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
        fsync_dir(dest.parent)

    # -- original names -----------------------------------------------------------------------------------------
    def _sidecar(self, name: str) -> Path:
        return self.names / (name + ".json")

    def _remember(self, name: str, original_name: str, folder: str) -> None:
        data = json.dumps({"name": original_name, "folder": folder})  # ASCII: undecodable bytes escaped too
        self._write_staged(self._sidecar(name), lambda f: f.write(data.encode("ascii")))

    def _forget(self, name: str) -> None:
        try:
            self._sidecar(name).unlink(missing_ok=True)
        except OSError:
            pass  # an orphan sidecar is removed by clean_incoming

    def original(self, name: str) -> tuple[str, str] | None:
        """(original name, folder relative to the watch folder) of a spool file, when it came from there."""
        try:
            data = json.loads(self._sidecar(name).read_text("ascii"))
            return str(data["name"]), str(data.get("folder", ""))
        except (OSError, ValueError, KeyError, TypeError):
            return None

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
        if path.exists() or not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
            _touch(dest)  # pruning counts from when the file was processed
        if path.parent == self.dir:
            self._forget(path.name)
        return dest

    def quarantine_path(self, name: str) -> Path:
        """Where spool file `name` goes in quarantine: `<seq>--<original name>` when it came from the watch folder
        (sanitised, extension kept), else its spool name."""
        orig = self.original(name)
        if orig is None:
            return self.quarantine_dir / name
        return self.quarantine_dir / f"{Path(name).stem}--{safe_name(orig[0])}"

    def quarantine(self, path: Path, reason: str, details: dict[str, str] | None = None) -> Path:
        """Move a file to quarantine/ with `<name>.reason` beside it (written first, so a reason never goes
        missing); the .reason names the original file and folder when the file came from the watch folder."""
        dest = self.quarantine_path(path.name)
        self._write_reason(dest, reason, details, self.original(path.name))
        if path.exists():
            os.replace(path, dest)
            _touch(dest)  # retention counts from when the file was quarantined
        self._forget(path.name)
        return dest

    def quarantine_file(self, src: Path, reason: str, *, original_name: str, original_folder: str = "") -> Path:
        """Move a file that is not to be read at all (too large) from the watch folder straight to quarantine;
        returns its quarantine path (`<seq>--<original name>`)."""
        self._check_room()
        dest = self.quarantine_dir / f"{Path(self.new_name()).stem}--{safe_name(original_name)}"
        self._write_reason(dest, reason, None, (original_name, original_folder))
        try:
            self._move_in(src, dest, keep_source=False)
        except BaseException:
            dest.with_name(dest.name + ".reason").unlink(missing_ok=True)
            raise
        _touch(dest)
        return dest

    @staticmethod
    def _write_reason(dest: Path, reason: str, details: dict[str, str] | None,
                      original: tuple[str, str] | None) -> None:
        lines = [f"reason: {reason}", f"time: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}"]
        lines += [f"{k}: {v}" for k, v in (details or {}).items()]
        if original is not None:
            lines += [f"original name: {shown(original[0])}",
                      f"original folder: {shown(original[1]) if original[1] else '(top of the watch folder)'}"]
        reason_file = dest.with_name(dest.name + ".reason")
        tmp = reason_file.with_name(reason_file.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, reason_file)

    def clean_incoming(self, max_age_s: float = 3600.0, now: float | None = None) -> int:
        """Remove staging leftovers of writers that died mid-copy, and name sidecars whose spool file is gone (older
        than max_age_s: a live writer's file is younger). Returns how many went."""
        cutoff = (now or time.time()) - max_age_s
        n = 0
        for d in (self.incoming, self.names):
            for f in d.iterdir() if d.is_dir() else []:
                try:
                    if f.stat().st_mtime >= cutoff:
                        continue
                    if d is self.names and f.name.endswith(".json") and (self.dir / f.name[:-5]).exists():
                        continue
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

    def prune_quarantine(self, keep_days: float, max_mb: float, now: float | None = None) -> int:
        """Delete quarantined files (with their .reason) older than keep_days, then the oldest ones while the
        quarantine holds more than max_mb (0: no limit of that kind). Returns how many files went."""
        now = now or time.time()
        entries = sorted(self._quarantined().items(), key=lambda kv: kv[1][0])  # oldest first
        total = sum(size for _, (_, size, _) in entries)
        n = 0
        for base, (when, size, files) in entries:
            old = keep_days > 0 and when < now - keep_days * 86400
            over = max_mb > 0 and total > max_mb * 2**20 and when < now - PRUNE_GRACE_S
            if not (old or over):
                continue
            for f in files:
                try:
                    f.unlink()
                except OSError:
                    pass
            total -= size
            n += 1
        return n

    def _quarantined(self) -> dict[str, tuple[float, int, list[Path]]]:
        """Quarantined files grouped with their .reason: base name → (newest mtime, total bytes, files)."""
        groups: dict[str, tuple[float, int, list[Path]]] = {}
        try:
            entries = list(os.scandir(self.quarantine_dir))
        except FileNotFoundError:
            return groups
        for e in entries:
            try:
                if not e.is_file():
                    continue
                st = e.stat()
            except OSError:
                continue
            m = _SEQ.match(e.name)  # <seq>.dcm, <seq>--<original name>, each with <...>.reason
            base = m.group(0) if m else e.name.removesuffix(".tmp").removesuffix(".reason")
            when, size, files = groups.get(base, (0.0, 0, []))
            groups[base] = (max(when, st.st_mtime), size + st.st_size, files + [Path(e.path)])
        return groups
