"""The data path up to the series tracker: spool → decode (the next batch prefetched while the models run) →
analyzer → store → tracker, one batch per `step()` on the worker thread (the only writer of findings).

A file stays in the spool until its finding is stored; then it moves to processed/ (duplicates too, recorded as
such) or to quarantine/ with its reason. While a model swap waits (`hold()`), slices of series not yet in flight
are deferred in the spool, and once nothing is in flight the step pauses (`paused`) until `release()`. Completion
hints apply once every file spooled before them has been analysed. After a restart, `recover()` rebuilds the series
in flight from stored findings. Tracker updates go to `on_update(update, now)`.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from appliance.domain import SliceFinding, SliceImage
from appliance.inference.bundle import sha256_file
from appliance.ingest.dicom_reader import Rejected, read_slice
from appliance.ingest.series import sort_key
from appliance.pipeline.tracker import Arrival, TrackedSeries, Update
from appliance.privacy import pseudonym
from appliance.service.stats import Stats

log = logging.getLogger("ctriage.daemon")

HINT_MAX_AGE_S = 600.0
LABEL_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")


def _series_uid(path: Path) -> str:
    """SeriesInstanceUID from the header alone, to attribute a file whose pixels could not be used."""
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"], force=True)
        return str(ds.get("SeriesInstanceUID", "") or "")
    except Exception:  # noqa: BLE001
        return ""


@dataclasses.dataclass
class _Read:
    path: Path
    image: SliceImage | None = None
    reason: str | None = None
    series_uid: str = ""


@dataclasses.dataclass
class _Hint:
    series_uid: str
    reason: str
    watermark: str
    created: float
    weak: bool = False


class Intake:
    """analyzer: returns the analyzer in use now (swapped between studies); more_coming: True while files are on
    their way into the spool (a watch folder waiting for files to settle), so no series is quiet yet; wake: set to
    run the next step at once; stopping: set when the daemon stops (no more prefetching)."""

    def __init__(self, cfg: Any, store: Any, spool: Any, tracker: Any, secret: bytes, stats: Stats,
                 analyzer: Callable[[], Any], on_update: Callable[[Update, float], None], *,
                 more_coming: Callable[[], bool] = lambda: False, wake: threading.Event | None = None,
                 stopping: threading.Event | None = None) -> None:
        self.cfg, self.store, self.spool, self.tracker, self.secret = cfg, store, spool, tracker, secret
        self.stats, self.analyzer, self.on_update, self.more_coming = stats, analyzer, on_update, more_coming
        self.wake = wake or threading.Event()
        self.stopping = stopping or threading.Event()
        self.listeners: list[Callable[[bool, str], None]] = []  # cb(ok, reason) after every analysed batch
        self.deferred: set[str] = set()
        self.paused = threading.Event()
        self._lock = threading.RLock()
        self._hints: list[_Hint] = []
        self._hold = 0
        self._idle_since: float | None = None
        self._held: set[str] = set()  # series held open because they look incomplete (logged once)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self._prefetch: tuple[list[Path], Future] | None = None

    # == control (any thread) ======================================================================================
    def hint(self, series_uid: str, reason: str, weak: bool = False) -> None:
        """A completion signal for a series, applied once every file spooled before this call has been analysed.
        weak: it may come before the series is whole (`SeriesTracker.hint`)."""
        pend = self.spool.pending()
        with self._lock:
            self._hints.append(_Hint(series_uid, reason, pend[-1].name if pend else "", time.time(), weak))
        self.wake.set()

    def hold(self) -> None:
        """Hold new series back; the step pauses (`paused` set) once no series is in flight."""
        with self._lock:
            self._hold += 1
        self.wake.set()

    def release(self) -> None:
        with self._lock:
            self._hold -= 1
            if self._hold == 0:
                self.paused.clear()
        self.wake.set()

    @property
    def held(self) -> bool:
        return bool(self._hold)

    def busy(self) -> bool:
        """Files in the spool, a series in flight or a completion hint not applied yet."""
        with self._lock:
            return bool(self.spool.pending()) or self.tracker.in_flight or bool(self._hints)

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)

    # == recovery ==================================================================================================
    def recover(self) -> int:
        """Rebuild series in flight from stored findings; re-apply the rule (a verdict lost in a crash is made
        again); spool files are picked up by step() as usual. Returns the number of series restored."""
        n = 0
        now = time.time()
        for row in self.store.open_series():
            ts = self.tracked_from_store(row)
            # the quiet time counts from the restart: slices exported while the appliance was down wait in the
            # watch folder or the spool, and are taken in before the series can be declared complete
            ts.last_seen = max(ts.last_seen, now)
            self.tracker.restore(ts)
            n += 1
            u = self.tracker.evaluate(ts.uid)
            if u is not None:
                self.on_update(u, time.time())
        pend = len(self.spool.pending())
        out = self.store.outbox_count()
        if n or pend or out:
            log.info("resuming: %d series in flight, %d file(s) in the spool, %d message(s) in the outbox",
                     n, pend, out)
        return n

    def tracked_from_store(self, row: Any) -> TrackedSeries:
        ts = TrackedSeries(row["series_uid"], row["study_uid"], row["first_seen"], row["last_seen"],
                           row["description"], row["expected"], announced=row["announced"])
        for order, finding, ident in sorted(self.store.series_slices(row["series_uid"]), key=lambda t: t[0]):
            ts.add(order, finding, ident)
        return ts

    # == the data path (worker thread) =============================================================================
    def _pending(self) -> list[Path]:
        return [p for p in self.spool.pending() if p.name not in self.deferred]

    def step(self) -> bool:
        """One round: a batch from the spool, completion hints, finals for series that are complete now. Returns
        True when it took files (call again at once)."""
        now = time.time()
        with self._lock:
            hold = self._hold
        if hold and not self.tracker.in_flight:
            self.paused.set()  # idle_gate holders may swap now; nothing moves until they are done
            return False
        if not hold and self.deferred:
            self.deferred.clear()
        pending = self._pending()
        busy = False
        if pending:  # files already spooled are processed even when the disk is short (they free the spool)
            analyzer = self.analyzer()
            busy = self._process(pending[: max(1, analyzer.config.batch * analyzer.workers)], pending, hold > 0)
            pending = self._pending()
        if pending or self.more_coming():
            self._idle_since = None  # slices still to come in: no series is quiet yet
        elif self._idle_since is None:
            self._idle_since = now
        self._apply_hints(pending)
        for u in self.tracker.tick(time.time(), self._idle_since):
            self.on_update(u, time.time())
        self._log_held()
        return busy

    def _log_held(self) -> None:
        """Say once per series why its final verdict waits longer than the quiet time."""
        waiting = self.tracker.waiting()
        for uid, why in waiting.items():
            if uid not in self._held:
                log.info("series %s looks incomplete (%s): its final verdict waits for more slices, up to %g s "
                         "without one", pseudonym(self.secret, uid), why, self.tracker.partial_quiet_seconds)
        self._held = set(waiting)

    def _read(self, paths: list[Path]) -> list[_Read]:
        out = []
        for p in paths:
            try:
                out.append(_Read(p, read_slice(p, max_tilt_deg=self.cfg.analysis.max_tilt_deg)))
            except Rejected as e:
                out.append(_Read(p, None, e.reason, getattr(e, "series_uid", "") or _series_uid(p)))
            except Exception as e:  # noqa: BLE001 - any decoder failure is the file's problem
                out.append(_Read(p, None, f"unreadable: {type(e).__name__}: {e}"))
        return out

    def _take_reads(self, batch: list[Path], pending: list[Path]) -> list[_Read]:
        """Decoded batch (prefetched while the previous batch was in the models), and prefetch the next one."""
        reads = None
        if self._prefetch is not None:
            paths, fut = self._prefetch
            self._prefetch = None
            if paths == batch:
                reads = fut.result()
        if reads is None:
            reads = self._read(batch)
        nxt = [p for p in pending if p not in batch][: len(batch)]
        if nxt and not self.stopping.is_set():
            self._prefetch = (nxt, self._reader.submit(self._read, nxt))
        return reads

    def _process(self, batch: list[Path], pending: list[Path], hold: bool) -> bool:
        todo: list[tuple[_Read, str]] = []
        seen: set[str] = set()
        for r in self._take_reads(batch, pending):
            p = r.path
            if not p.exists():
                continue
            row = self.store.file_by_name(p.name)
            if row is not None:  # handled before a crash: finish the move
                self._finish_known(p, row)
                continue
            if r.image is None:
                self._quarantine(p, r.reason or "unreadable", r.series_uid)
                continue
            s = r.image
            ident = s.sop_uid or f"sha256:{sha256_file(p)}"
            if ident in seen or self.store.has_slice(ident):
                dest = self.spool.processed_path(p.name)
                self.store.add_file(p.name, "duplicate", ident=ident, series_uid=s.series_uid, path=str(dest),
                                    reason="duplicate SOPInstanceUID: analysed before")
                self.spool.move(p, dest)
                log.info("duplicate slice ignored (%s)", p.name)
                continue
            if hold and s.series_uid not in self.tracker.open:
                self.deferred.add(p.name)  # a model switch is waiting for the series in flight
                continue
            seen.add(ident)
            todo.append((r, ident))
        if not todo:
            return True
        images = [r.image for r, _ in todo]
        findings = self._analyse(images)  # type: ignore[arg-type]
        now = time.time()
        arrivals = []
        # series reopened by a late slice: put back what is stored before this batch is added
        for uid in {s.series_uid for s in images if s is not None}:
            if uid not in self.tracker.open:
                row = self.store.series(uid)
                if row is not None:
                    self.tracker.restore(self.tracked_from_store(row))
                    log.info("series %s reopened by a late slice", row["series_key"])
        moves = []
        with self.store.transaction():
            for (r, ident), f in zip(todo, findings):
                s = r.image
                assert s is not None
                if f is None:
                    err = self.stats.analysis_error
                    self._quarantine(r.path, err[1] if err else "analysis failed", s.series_uid)
                    continue
                order = sort_key(dataclasses.replace(s, key=ident, hu=None))
                f.key = ident
                arrived = self.spool.intake_time(r.path)
                self.store.series_seen(s.series_uid, s.study_uid, pseudonym(self.secret, s.series_uid),
                                       pseudonym(self.secret, s.study_uid), description=s.series_description,
                                       expected=s.expected_count, now=now, labels=self._labels(r.path, s),
                                       arrived=arrived)
                self.store.add_slice(ident, s.series_uid, order, f, now)
                dest = self.spool.processed_path(r.path.name, now)
                self.store.add_file(r.path.name, "analysed", ident=ident, series_uid=s.series_uid, path=str(dest),
                                    now=now)
                moves.append((r.path, dest))
                arrivals.append(Arrival(s.series_uid, s.study_uid, order, f, ident, s.expected_count,
                                        s.series_description, arrived=arrived))
                s.hu = None
        for src, dest in moves:
            self.spool.move(src, dest)
        self.stats.analysed(now, len(arrivals), findings)
        for u in self.tracker.add(arrivals, now):
            self.on_update(u, time.time())
        return True

    def _analyse(self, images: list[SliceImage]) -> list[SliceFinding | None]:
        """Findings in order; a batch that fails is retried slice by slice so one bad slice cannot block others."""
        analyzer = self.analyzer()
        try:
            out: list[SliceFinding | None] = list(analyzer.findings(images))
            self._notify_analysis(True, "")
            return out
        except Exception as e:  # noqa: BLE001
            log.error("analysis of a batch failed (%s: %s); retrying slice by slice", type(e).__name__, e)
        out = []
        for s in images:
            try:
                out.append(analyzer.findings([s])[0])
            except Exception as e:  # noqa: BLE001
                reason = f"analysis failed: {type(e).__name__}: {e}"
                self.stats.analysis_error = (time.time(), reason)
                self._notify_analysis(False, reason)
                out.append(None)
        return out

    def _notify_analysis(self, ok: bool, reason: str) -> None:
        for cb in list(self.listeners):
            try:
                cb(ok, reason)
            except Exception:
                log.exception("analysis listener failed")

    def _labels(self, path: Path, s: SliceImage) -> dict[str, str] | None:
        if not self.cfg.privacy.send_patient_labels:
            return None
        try:
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(LABEL_TAGS), force=True)
            return {k: str(ds.get(k, "") or "") for k in LABEL_TAGS}
        except Exception:
            return None

    def _finish_known(self, p: Path, row: Any) -> None:
        if row["status"] == "rejected":
            self.spool.quarantine(p, row["reason"] or "rejected", {"file": p.name})
        else:
            self.spool.move(p, Path(row["path"]) if row["path"] else self.spool.processed_path(p.name))

    def _quarantine(self, p: Path, reason: str, series_uid: str = "") -> None:
        dest = self.spool.quarantine_path(p.name)
        details = {"file": p.name}
        if series_uid:
            details["series_key"] = pseudonym(self.secret, series_uid)
        self.store.add_file(p.name, "rejected", series_uid=series_uid or None, path=str(dest), reason=reason)
        self.spool.quarantine(p, reason, details)
        log.warning("quarantined %s: %s", p.name, reason)

    def _apply_hints(self, pending: list[Path]) -> None:
        with self._lock:
            hints = list(self._hints)
        if not hints:
            return
        first = pending[0].name if pending else None
        keep = []
        for h in hints:
            if first is not None and h.watermark and first <= h.watermark:
                if time.time() - h.created < HINT_MAX_AGE_S:
                    keep.append(h)  # files spooled before the hint are still waiting
                continue
            if self.tracker.hint(h.series_uid, h.reason, weak=h.weak):
                log.info("completion signal for series %s: %s", pseudonym(self.secret, h.series_uid), h.reason)
        with self._lock:
            self._hints = keep + [h for h in self._hints if h not in hints]
