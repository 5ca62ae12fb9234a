"""Watch folder: files exported by the CT console are taken into the spool once complete.

Events come from watchdog, and a periodic rescan catches what events miss (network shares often send none).
A file is taken when its size and mtime have not changed for `stable_seconds` and it is complete DICOM: the header
parses to its end and the file holds everything it declares — an image (an image SOP class, or Rows and Columns)
has pixel data, whose declared length (compressed: fragments up to the sequence delimiter) is on disk. A slow
writer's pause therefore never splits a file, wherever the pause falls. A close-after-write event (Linux inotify)
lets a file whose pixel data is whole be taken without waiting out `stable_seconds`; it is a hint, never proof
(a slow writer may close between chunks). Size and mtime are checked again right before the move.

A stable file that is still not complete after `incomplete_seconds` is taken anyway, so the pipeline quarantines it
with the reason. A file larger than `max_file_mb` goes to quarantine unread. Temporary names (`ignore` patterns:
dot-files, *.part, *.tmp, …) are left alone until renamed.

End markers (`end_markers`: DICOMDIR, COMPLETE, *.done) signal that an export is complete: once every other file in
the marker's folder has been taken, the series listed in a DICOMDIR, or those whose files came from that folder,
get a completion hint. Markers then go to processed/ like any file.

Log lines name spool files only: export file and folder names may carry patient names. The original name goes with
the file into the spool (a sidecar), and into quarantine's file name and .reason.
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
from typing import NamedTuple

from appliance.config import WatchConfig
from appliance.ingest.completeness import check_complete
from appliance.ingest.dicom_file import Rejected, read_dataset
from appliance.ingest.spool import Spool, SpoolFull

log = logging.getLogger("ctriage.watch")

#: watchdog events that say nothing about a file's content (our own completeness checks cause them)
IGNORED_EVENTS = {"opened", "closed_no_write"}


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.lower(), p.lower()) for p in patterns)


class Completeness(NamedTuple):
    why: str | None  # why the file is not complete yet; None: complete
    series: str  # its SeriesInstanceUID, or ""
    pixels: bool  # complete up to the end of whole pixel data (proof enough to act on a close-write hint)


def completeness(path: Path) -> Completeness:
    """Whether a file is complete DICOM, from its header and the pixel data's extent on disk (never loaded)."""
    ext = check_complete(path)
    series = str(ext.ds.get("SeriesInstanceUID", "") or "") if ext.ds is not None else ""
    return Completeness(ext.why, series, ext.why is None and ext.pixels)


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
    checked: tuple[int, float] | None = None  # the (size, mtime) `result` was found for
    result: Completeness | None = None


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
        self._closed_new: dict[Path, tuple[int, float]] = {}  # from the event thread: (size, mtime) at close-write
        self._closed: dict[Path, tuple[int, float]] = {}
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
                    if event.is_directory or event.event_type in IGNORED_EVENTS:
                        return
                    p = getattr(event, "dest_path", "") or event.src_path
                    if p:
                        watcher._event(Path(os.fsdecode(p)), event.event_type == "closed")

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

    def _event(self, p: Path, closed: bool) -> None:
        """A file event (watchdog thread). A close-after-write records the file's size and mtime right then."""
        st = None
        if closed:
            try:
                st = p.stat()
            except OSError:
                pass
        with self._lock:
            self._dirty.add(p)
            if st is not None:
                self._closed_new[p] = (st.st_size, st.st_mtime)
        self._wake.set()

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
            closed, self._closed_new = self._closed_new, {}
        for p in dirty:
            self._consider(p, now)
        self._closed.update(closed)
        for p in [p for p in self._closed if p not in self._cands]:
            del self._closed[p]
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
                self._drop(p)
                continue
            key = (st.st_size, st.st_mtime)
            if key != (c.size, c.mtime):
                c.size, c.mtime, c.since = st.st_size, st.st_mtime, now
            waited = now - c.since
            hinted = self._closed.get(p) == key  # closed after its last write: check now, but prove it
            if waited < self.cfg.stable_seconds and not hinted:
                continue
            if st.st_size == 0 and waited < self.cfg.incomplete_seconds:
                continue
            if st.st_size > self.cfg.max_file_mb * 2**20:
                if waited >= self.cfg.stable_seconds and self._room():
                    self._quarantine_large(p, st.st_size, key, now)
                continue
            result = self._completeness(p, c, key)
            if waited < self.cfg.stable_seconds and not result.pixels:
                continue  # a close-write hint alone proves nothing
            if result.why is not None and waited < self.cfg.incomplete_seconds:
                continue  # stable but not complete yet: give the sender time
            if not self._room():
                return taken
            if not self._unchanged(p, key, now):
                continue  # the writer resumed: never move a growing file
            try:
                dest = self.spool.accept(p, original_name=p.name, original_folder=self._folder(p))
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
            self._drop(p)
            taken += 1
            self.taken += 1
            if result.series:
                fs = self._folder_series.setdefault(p.parent, set())
                fs.add(result.series)
                self._folder_series.move_to_end(p.parent)
                while len(self._folder_series) > 256:
                    self._folder_series.popitem(last=False)
            why = result.why
            log.debug("watch folder: took %s%s", dest.name, f" (incomplete: {why})" if why else "")
        self._handle_markers(now)
        return taken

    def _drop(self, p: Path) -> None:
        self._cands.pop(p, None)
        self._closed.pop(p, None)

    def _completeness(self, p: Path, c: _Candidate, key: tuple[int, float]) -> Completeness:
        """The file's completeness, parsed again only when its size or mtime changed since the last check."""
        if c.checked != key or c.result is None:
            c.result, c.checked = completeness(p), key
        return c.result

    def _unchanged(self, p: Path, key: tuple[int, float], now: float) -> bool:
        try:
            st = p.stat()
        except OSError:
            return False
        if (st.st_size, st.st_mtime) == key:
            return True
        c = self._cands[p]
        c.size, c.mtime, c.since = st.st_size, st.st_mtime, now
        return False

    def _room(self) -> bool:
        if self.spool.has_room():
            return True
        self.blocked = (f"state disk has {self.spool.free_mb():.0f} MB free, below "
                        f"watch.min_free_mb = {self.spool.min_free_mb}: not taking files")
        if "disk" not in self._warned:
            self._warned.add("disk")
            log.error("watch folder: %s", self.blocked)
        return False

    def _folder(self, p: Path) -> str:
        """The folder a file came from, relative to the watch folder ("" at its top)."""
        rel = p.parent.relative_to(self.root)
        return "" if rel == Path(".") else rel.as_posix()

    def _quarantine_large(self, p: Path, size: int, key: tuple[int, float], now: float) -> None:
        """Too large to be a CT slice: straight to quarantine, never parsed (nor read into memory)."""
        if not self._unchanged(p, key, now):
            return
        mb, limit = size / 2**20, self.cfg.max_file_mb
        reason = f"file too large: {mb:.1f} MB, over watch.max_file_mb = {limit} MB (not read)"
        try:
            dest = self.spool.quarantine_file(p, reason, original_name=p.name, original_folder=self._folder(p))
        except OSError as e:
            if str(p) not in self._warned:
                self._warned.add(str(p))
                log.warning("watch folder: cannot quarantine a file (%s); will retry", e.strerror or type(e).__name__)
            return
        self._drop(p)
        log.warning("watch folder: quarantined %s unread: %.1f MB, over watch.max_file_mb = %d MB",
                    dest.name.split("--", 1)[0], mb, limit)

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
