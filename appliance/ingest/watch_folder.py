"""Watch folder: files exported by the CT console are taken into the spool once complete.

Events come from watchdog, and a periodic rescan catches what events miss (network shares often send none).
A file is taken when its size and mtime have not changed for `stable_seconds` and it parses as complete DICOM
(header readable, pixel data all there). A stable file that still does not parse after `incomplete_seconds` is
taken anyway, so the pipeline quarantines it with the reason. Temporary names (`ignore` patterns: dot-files,
*.part, *.tmp, …) are left alone until renamed.

End markers (`end_markers`: DICOMDIR, COMPLETE, *.done) signal that an export is complete: once every other file in
the marker's folder has been taken, the series listed in a DICOMDIR, or those whose files came from that folder,
get a completion hint. Markers then go to processed/ like any file.

Log lines name spool files only: export file and folder names may carry patient names.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.config import WatchConfig
from appliance.ingest.dicom_reader import Rejected, read_dataset
from appliance.ingest.spool import Spool, SpoolFull

log = logging.getLogger("ctriage.watch")


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.lower(), p.lower()) for p in patterns)


def completeness(path: Path) -> tuple[str | None, str]:
    """(why the file is not complete yet or None, its SeriesInstanceUID or "")."""
    try:
        ds = read_dataset(path)
    except Rejected as e:
        return e.reason, ""
    except OSError as e:
        return f"cannot read: {e.strerror}", ""
    series = str(ds.get("SeriesInstanceUID", "") or "")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if "PixelData" not in ds:
        if rows and cols:
            return "image header without pixel data (file still being written?)", series
        return None, series
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and not ts.is_compressed:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
        need = rows * cols * frames * spp * bits // 8
        have = len(ds.PixelData)
        if have < need:
            return f"pixel data incomplete ({have} of {need} bytes)", series
    return None, series


def dicomdir_series(path: Path) -> list[str]:
    """SeriesInstanceUIDs listed in a DICOMDIR (empty when it cannot be read)."""
    try:
        ds = read_dataset(path)
    except Rejected:
        return []
    out = []
    for rec in ds.get("DirectoryRecordSequence", []) or []:
        if str(rec.get("DirectoryRecordType", "")).upper() == "SERIES" and rec.get("SeriesInstanceUID"):
            uid = str(rec.SeriesInstanceUID)
            if uid not in out:
                out.append(uid)
    return out


@dataclass
class _Candidate:
    size: int
    mtime: float
    since: float  # when size/mtime were last seen changing
    first: float


class WatchFolder:
    """Moves complete files from `root` into the spool; calls `on_hint(series_uid, reason)` for end markers."""

    def __init__(self, root: str | Path, spool: Spool, cfg: WatchConfig,
                 on_hint: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = Path(root)
        self.spool, self.cfg, self.on_hint, self.clock = spool, cfg, on_hint, clock
        self._cands: dict[Path, _Candidate] = {}
        self._markers: dict[Path, float] = {}
        self._folder_series: OrderedDict[Path, set[str]] = OrderedDict()
        self._dirty: set[Path] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer = None
        self._last_scan = 0.0
        self._warned: set[str] = set()
        self.blocked: str | None = None  # why files are not being taken (disk space, missing folder)
        self.taken = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # an unmounted share, no permission: keep rescanning, health says why
            self.blocked = f"watch folder {self.root} is not usable: {e.strerror or e}"
            log.error("%s", self.blocked)
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer

            watcher = self

            class _Handler(FileSystemEventHandler):
                def on_any_event(self, event) -> None:  # created, modified, moved, closed
                    if event.is_directory:
                        return
                    p = getattr(event, "dest_path", "") or event.src_path
                    if p:
                        with watcher._lock:
                            watcher._dirty.add(Path(os.fsdecode(p)))
                        watcher._wake.set()

            self._observer = Observer()
            self._observer.schedule(_Handler(), str(self.root), recursive=True)
            self._observer.start()
        except Exception as e:  # inotify limits, unsupported file system: the rescan still works
            log.warning("watch folder: file events unavailable (%s: %s); relying on the %gs rescan",
                        type(e).__name__, e, self.cfg.rescan_seconds)
            self._observer = None
        try:  # what waits in the folder is known before the caller's first quiet-time check (a restart)
            self.poll()
        except Exception:  # noqa: BLE001 - the thread polls again
            log.exception("watch folder: first poll failed")
        self._thread = threading.Thread(target=self._run, name="watch-folder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            try:
                self._observer.stop()
                self._observer.join(5)
            except Exception:
                pass
        if self._thread is not None:
            self._thread.join(10)

    def waiting(self, now: float | None = None) -> int:
        """Files seen in the folder and not taken yet (a file first seen longer ago than twice
        `incomplete_seconds` plus a minute no longer counts: one that grows for ever must not hold series open)."""
        now = self.clock() if now is None else now
        limit = 2 * self.cfg.incomplete_seconds + 60.0
        for _ in range(5):  # the watcher thread changes the dict: copy it, again if it changed meanwhile
            try:
                cands = list(self._cands.values())
                break
            except RuntimeError:
                continue
        else:
            return 1
        return sum(1 for c in cands if now - c.first < limit)

    def _run(self) -> None:
        tick = min(0.5, max(0.05, self.cfg.stable_seconds / 4))
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # never let the watcher die
                log.exception("watch folder: poll failed")
            self._wake.wait(tick)
            self._wake.clear()

    # -- one round ---------------------------------------------------------------------------------------------
    def poll(self, now: float | None = None) -> int:
        """Discover (events, rescan when due), then take what is ready. Returns files taken."""
        now = self.clock() if now is None else now
        if now - self._last_scan >= self.cfg.rescan_seconds or self._last_scan == 0.0:
            self._last_scan = now
            self._rescan(now)
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for p in dirty:
            self._consider(p, now)
        return self._take_ready(now)

    def _rescan(self, now: float) -> None:
        if not self.root.is_dir():
            self.blocked = f"watch folder {self.root} does not exist"
            return
        if self.blocked and "watch folder" in self.blocked:
            self.blocked = None
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not matches(d, self.cfg.ignore)]
            for name in filenames:
                self._consider(Path(dirpath) / name, now)

    def _consider(self, p: Path, now: float) -> None:
        try:
            rel = p.relative_to(self.root)
        except ValueError:
            return
        if any(matches(part, self.cfg.ignore) for part in rel.parts):
            return
        if matches(p.name, self.cfg.end_markers):
            self._markers.setdefault(p, now)
            return
        if p not in self._cands:
            try:
                st = p.stat()
            except OSError:
                return
            self._cands[p] = _Candidate(st.st_size, st.st_mtime, now, now)

    def _take_ready(self, now: float) -> int:
        taken = 0
        for p in sorted(self._cands):
            c = self._cands[p]
            try:
                st = p.stat()
            except OSError:  # gone (renamed or removed by the sender)
                del self._cands[p]
                continue
            if st.st_size != c.size or st.st_mtime != c.mtime:
                c.size, c.mtime, c.since = st.st_size, st.st_mtime, now
                continue
            waited = now - c.since
            if waited < self.cfg.stable_seconds or (st.st_size == 0 and waited < self.cfg.incomplete_seconds):
                continue
            why, series = completeness(p)
            if why is not None and now - c.since < self.cfg.incomplete_seconds:
                continue  # stable but not parseable yet: give the sender time
            if not self.spool.has_room():
                self.blocked = (f"state disk has {self.spool.free_mb():.0f} MB free, below "
                                f"watch.min_free_mb = {self.spool.min_free_mb}: not taking files")
                if "disk" not in self._warned:
                    self._warned.add("disk")
                    log.error("watch folder: %s", self.blocked)
                return taken
            try:
                dest = self.spool.accept(p)
            except SpoolFull as e:
                self.blocked = str(e)
                return taken
            except OSError as e:
                if str(p) not in self._warned:
                    self._warned.add(str(p))
                    log.warning("watch folder: cannot take a file (%s); will retry", e.strerror or type(e).__name__)
                continue
            self.blocked = None
            self._warned.discard("disk")
            del self._cands[p]
            taken += 1
            self.taken += 1
            if series:
                fs = self._folder_series.setdefault(p.parent, set())
                fs.add(series)
                self._folder_series.move_to_end(p.parent)
                while len(self._folder_series) > 256:
                    self._folder_series.popitem(last=False)
            log.debug("watch folder: took %s%s", dest.name, f" (incomplete: {why})" if why else "")
        self._handle_markers(now)
        return taken

    def _handle_markers(self, now: float) -> None:
        for m in sorted(self._markers):
            folder = m.parent
            if any(folder == c.parent or folder in c.parents for c in self._cands):
                continue  # files of this export are still arriving
            try:
                st = m.stat()
            except OSError:
                del self._markers[m]
                continue
            if now - self._markers[m] < self.cfg.stable_seconds:
                continue
            uids: list[str] = dicomdir_series(m) if m.name.upper() == "DICOMDIR" and st.st_size else []
            for f in [f for f in self._folder_series if f == folder or folder in f.parents]:
                for u in sorted(self._folder_series.pop(f)):
                    if u not in uids:
                        uids.append(u)
            kind = "DICOMDIR" if m.name.upper() == "DICOMDIR" else "end marker file"
            for u in uids:
                if self.on_hint:
                    self.on_hint(u, f"end marker: {kind} received")
            try:
                self.spool.move(m, self.spool.processed_path(self.spool.new_name(".marker")))
            except OSError as e:
                log.warning("watch folder: cannot move an end marker (%s)", e.strerror or type(e).__name__)
                continue
            del self._markers[m]
            log.info("watch folder: end marker (%s) for %d series", kind, len(uids))
