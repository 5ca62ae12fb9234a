"""The appliance daemon: spool → decode → analyse (small batches) → series tracker → store → outbox → MQTT.

Threads: `worker` (the data path, the only writer of findings and verdicts), `watch-folder` (optional),
`outbox` (drains verdicts to the broker in order), the MQTT network thread, `housekeeping` (stats, status
file, pruning) and, with [pacs] destinations, `pacs-sender` (DICOM SR and key image of each final verdict, into the
source study). Everything durable is in the store (<state>/ctriage.db) and the PACS outbox (<state>/pacs-outbox); a
restart after SIGKILL or power loss picks up spool files, re-sends the outbox, recomputes open series from stored
findings without analysing any slice twice, and hands the PACS sender the final verdicts it had not taken yet.

Embedding (demo, tests):

    d = Daemon(cfg)            # or Daemon(cfg, analyzer=...) to share a loaded Analyzer
    d.start()                  # returns at once; files dropped in cfg.watch.dir or handed to d.spool.accept(...)
    d.wait_idle(timeout=60)    # spool empty, no series in flight, outbox drained
    d.stop()

Plug-in points: `spool.accept(...)` and `series_complete_hint(uid)` for other ingest paths (`instance_sink()` is the
DICOM node's InstanceSink; with [dicom] enabled the daemon runs the node itself);
`add_subscription(topic, handler)`, `publish(topic, payload, retain)`, `idle_gate()`, `swap_analyzer(new, check)`
and `add_analysis_listener(cb)` for the fleet updater (`attach_updater(updater)` wires all of them).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.config import Config, ConfigError
from appliance.domain import SliceFinding, SliceImage
from appliance.ingest.dicom_reader import Rejected, read_slice
from appliance.ingest.series import sort_key
from appliance.ingest.spool import Spool
from appliance.pipeline.case_logic import CaseRule, SeriesSummary, study_verdict
from appliance.pipeline.tracker import Arrival, SeriesTracker, TrackedSeries, Update
from appliance.privacy import load_secret, pseudonym
from appliance.publish import messages as msg
from appliance.publish.mqtt import MQTTTransport, OutboxPump, Transport
from appliance.store import Store, verdict_from_dict

log = logging.getLogger("ctriage.daemon")

STATUS_FILE = "status.json"
DB_FILE = "ctriage.db"
STATUS_INTERVAL_S = 2.0
BROKER_GRACE_S = 30.0  # disconnected longer than this: health degraded
HINT_MAX_AGE_S = 600.0
LABEL_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")
PACS_PENDING = "pacs.pending"  # store kv: final verdicts committed but not yet handed to the PACS sender (JSON list)
PACS_SENT = "pacs.sent."  # store kv, + study key: what PACS last got for the study (no second identical SR)
PACS_KEY_IMAGE_SIZE = 512


# -- logging -----------------------------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
             "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d, ensure_ascii=False)


def setup_logging(cfg: Config, verbose: bool = False) -> None:
    """Root logging for the daemon: level from config (DEBUG with verbose), JSON lines when log_json."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter() if cfg.log_json else
                   logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else getattr(logging, cfg.log_level.upper(), logging.INFO))
    # pynetdicom says a line per instance; highdicom names the source instance (a UID) when it builds a result
    for noisy in ("watchdog", "PIL", "pydicom", "pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# -- helpers -----------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _series_uid(path: Path) -> str:
    """SeriesInstanceUID from the header alone, to attribute a file whose pixels could not be used."""
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"], force=True)
        return str(ds.get("SeriesInstanceUID", "") or "")
    except Exception:  # noqa: BLE001
        return ""


def fingerprint(payload: dict[str, Any]) -> str:
    """What makes a verdict different from the last one (times excluded): no duplicate verdicts."""
    core = {k: v for k, v in payload.items() if k not in ("created", "timings")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def pacs_fingerprint(payload: dict[str, Any]) -> str:
    """What PACS sees of a study verdict: the lead series and its result, evidence, counts and models. A new final
    verdict that differs only in what else the study holds (other series, times) sends no second SR."""
    core = {k: payload.get(k) for k in ("series_key", "state", "result", "reason", "evidence", "counts", "bundles")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


class Unsendable(Exception):
    """A PACS result that can never be built (its source files are gone, the source has no UIDs)."""


def _iso(t: float | None) -> str | None:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if t else None


def read_status(state_dir: str | Path) -> dict[str, Any] | None:
    """The status file the daemon keeps (None when there is none)."""
    p = Path(state_dir) / STATUS_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class SpoolSink:
    """The DICOM node's InstanceSink: each received instance into the spool (durably, before the sender gets its
    success status; SpoolFull is an ENOSPC OSError → 0xA700), each released association as a completion hint."""

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon

    def accept(self, data: bytes, sop_instance_uid: str, series_uid: str) -> None:
        self.daemon.spool.accept(data)

    def association_released(self, series_uids: set[str]) -> None:
        for uid in sorted(series_uids):
            self.daemon.series_complete_hint(uid, "sender: association released")


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


class Daemon:
    def __init__(self, cfg: Config, analyzer: Any = None, transport: Transport | None = None) -> None:
        self.cfg = cfg
        self.state_dir = cfg.state_path
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.secret = load_secret(cfg.privacy.study_key_secret_file, self.state_dir)
        except (OSError, ValueError) as e:
            raise ConfigError(f"[privacy] study key secret: {e}") from None
        self.store = Store(self.state_dir / DB_FILE)
        self._wake = threading.Event()
        self.spool = Spool(self.state_dir, cfg.watch.min_free_mb, notify=self._wake.set)
        # the daemon reads DICOM only: spacing is physical, the whole rule applies
        self.tracker = SeriesTracker(CaseRule.from_config(cfg.analysis), quiet_seconds=cfg.series.quiet_seconds,
                                     max_open=cfg.series.max_open_series)
        self.topics = msg.Topics(cfg.mqtt.prefix, cfg.device_id)
        self.analyzer = analyzer
        self.transport = transport
        self.pump: OutboxPump | None = None
        self.watch = None
        self.dicom_node = None
        self.pacs: Any = None  # appliance.publish.pacs.PacsSender when [pacs] destinations are configured
        self._pacs_retry_at = 0.0
        self._pacs_error: str | None = None
        self._pacs_dropped = 0
        self._subs: list[tuple[str, Callable[[str, bytes], None]]] = []
        self._analysis_listeners: list[Callable[[bool, str], None]] = []
        self._periodic: list[list[Any]] = []  # [fn, interval_s, last_run]
        self._stop_hooks: list[Callable[[], None]] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self._prefetch: tuple[list[Path], Future] | None = None
        self._hints: list[_Hint] = []
        self._hold = 0
        self._paused = threading.Event()
        self._deferred: set[str] = set()
        self._idle_since: float | None = None
        self._started: float | None = None
        self._running = False
        self._state = "starting"
        self._problems: dict[str, str] = {}
        self._disconnected_since: float | None = time.time()
        self._last_analysis_error: tuple[float, str] | None = None
        self._dicom_error: str | None = None
        self._published_status: tuple[str, str | None] | None = None
        self._published_problems: tuple[str, ...] = ()  # which problems the last status (and log line) named
        # statistics
        self.slices_total = 0
        self._rate: deque[tuple[float, int]] = deque(maxlen=600)
        self._stage_ms: deque[dict[str, float]] = deque(maxlen=200)
        self._last_latency: float | None = None

    # == lifecycle ==================================================================================================
    def start(self) -> None:
        """Load what is missing, recover from the store, start the threads; returns at once."""
        if self._running:
            return
        if self.analyzer is None:
            from appliance.commands.common import make_analyzer

            self.analyzer = make_analyzer(self.cfg)
        self._started = time.time()
        with self._lock:
            if self.transport is None:  # subscriptions made before go to the new transport
                client_id = self.cfg.mqtt.client_id or f"ctriage-{self.cfg.device_id}"
                self.transport = MQTTTransport(self.cfg.mqtt, client_id, self.topics.status,
                                               self._json(msg.offline_payload(self.cfg.device_id)))
                for topic, handler in self._subs:
                    self.transport.subscribe(topic, handler)
        self.transport.set_status(self._json(self._status_payload("online", None)))
        self._published_status = ("online", None)
        self.transport.start()
        self.pump = OutboxPump(self.store, self.transport)
        self.pump.start()
        if self.cfg.pacs.destinations:
            from appliance.publish.pacs import PacsSender

            self.pacs = PacsSender.from_config(self.cfg).start()
        self._recover()
        if self.cfg.watch.dir:
            from appliance.ingest.watch_folder import WatchFolder

            self.watch = WatchFolder(Path(self.cfg.watch.dir).expanduser(), self.spool, self.cfg.watch,
                                     on_hint=self.series_complete_hint)
            self.watch.start()
        if self.cfg.dicom.enabled:
            self._start_dicom_node()
        self._running = True
        self._state = "running"
        for name, target in (("worker", self._work_loop), ("housekeeping", self._housekeeping)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("ctriage %s running as %s: backend %s on %s, bundles %s, watch %s, broker %s", __version__,
                 self.cfg.device_id, self.analyzer.backend, self.analyzer.device,
                 ", ".join(f"{b['name']} {b['version']}" for b in self.analyzer.bundles),
                 self.cfg.watch.dir or "(none)", getattr(self.transport, "url", None) and self.transport.url.redacted())

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the batch in hand, flush the store, publish status offline, disconnect cleanly."""
        if not self._running:
            return
        log.info("stopping: finishing the slices in hand")
        self._state = "stopping"
        if self.dicom_node is not None:
            self.dicom_node.stop()
        if self.watch is not None:
            self.watch.stop()
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
        self._reader.shutdown(wait=True, cancel_futures=True)
        if self.pacs is not None:  # what it has not delivered waits in <state>/pacs-outbox for the next start
            self.pacs.stop()
        for hook in self._stop_hooks:
            try:
                hook()
            except Exception:
                log.exception("stop hook failed")
        if self.pump is not None:
            self.pump.drain(3.0)
            self.pump.stop()
        if self.transport is not None:
            self.transport.stop(self._json(self._status_payload("offline", "stopped")))
        self._running = False
        self._state = "stopped"
        self._write_status()
        self.store.close()
        log.info("stopped")

    def run_forever(self) -> int:
        """start(), then wait for SIGTERM/SIGINT and stop cleanly. Returns the exit status."""
        got: list[int] = []

        def on_signal(signum: int, frame: Any) -> None:
            got.append(signum)
            self._stop.set()
            self._wake.set()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not self._stop.wait(1.0):
                pass
            log.info("signal %s received", signal.Signals(got[0]).name if got else "?")
        finally:
            self.stop()
            for s, h in old.items():
                signal.signal(s, h)
        return 0

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """True once the spool is empty, no series is in flight and the outbox is drained (demo, tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = bool(self.spool.pending()) or self.tracker.in_flight or bool(self._hints)
            if not busy and self.store.outbox_count() == 0:
                return True
            time.sleep(0.1)
        return False

    # == plug-in points ============================================================================================
    def series_complete_hint(self, series_uid: str, reason: str = "sender: association released") -> None:
        """A sender says this series is complete (DICOM association released, end marker). Applied once every
        file spooled before this call has been analysed; ignored for a series that is not in flight then."""
        pend = self.spool.pending()
        with self._lock:
            self._hints.append(_Hint(series_uid, reason, pend[-1].name if pend else "", time.time()))
        self._wake.set()

    def add_subscription(self, topic: str, handler: Callable[[str, bytes], None]) -> None:
        """Route MQTT messages matching `topic` (a filter, + and # allowed) to handler(topic, payload). Handlers run
        on the transport's handler thread: they may block, but should not for long."""
        with self._lock:
            self._subs.append((topic, handler))
            if self.transport is not None:
                self.transport.subscribe(topic, handler)

    def on_fleet_bundle(self, handler: Callable[[str, bytes], None]) -> None:
        """Messages on `<prefix>/fleet/bundle/+` (signed bundle announcements) to handler(topic, payload)."""
        self.add_subscription(self.topics.fleet_bundle("+"), handler)

    def publish(self, topic: str, payload: dict[str, Any] | bytes, retain: bool = False,
                expiry: int | None = None) -> None:
        """Queue a message in the durable outbox (sent in order, at least once)."""
        data = payload if isinstance(payload, bytes) else self._json(payload)
        self.store.outbox_add(topic, data, self.cfg.mqtt.qos, retain, expiry)
        if self.pump is not None:
            self.pump.kick()

    def add_analysis_listener(self, cb: Callable[[bool, str], None]) -> None:
        """cb(ok, reason) after every analysed batch (ok False when the analysis failed)."""
        self._analysis_listeners.append(cb)

    @contextlib.contextmanager
    def idle_gate(self, timeout: float | None = None) -> Iterator[None]:
        """Hold new series back, wait until no series is in flight, and keep the data path paused inside the
        block (swap models there). Raises TimeoutError when the series in flight do not finish in time."""
        with self._lock:
            self._hold += 1
        self._wake.set()
        try:
            if self._running and not self._paused.wait(timeout):
                raise TimeoutError("series still in flight: the data path did not become idle in time")
            yield
        finally:
            with self._lock:
                self._hold -= 1
                if self._hold == 0:
                    self._paused.clear()
            self._wake.set()

    def swap_analyzer(self, new: Any, check: Callable[[Any], None] | None = None,
                      timeout: float | None = None) -> Any:
        """Switch to another Analyzer between studies: waits until no series is in flight (new series wait in the
        spool), runs check(new) (raise to refuse: nothing changes), swaps, re-announces status. Returns the old one.
        Call it from your own thread, not from an MQTT handler."""
        if self._hold and self._paused.is_set() or not self._running:
            return self._swap_now(new, check)
        with self.idle_gate(timeout):
            return self._swap_now(new, check)

    def _swap_now(self, new: Any, check: Callable[[Any], None] | None) -> Any:
        if check is not None:
            check(new)
        old, self.analyzer = self.analyzer, new
        log.info("analyzer switched: %s on %s, bundles %s", new.backend, new.device,
                 ", ".join(f"{b['name']} {b['version']}" for b in new.bundles))
        if self.transport is not None:
            state, detail = self._published_status or ("online", None)
            self.transport.set_status(self._json(self._status_payload(state, detail)))
        self._write_status()
        return old

    def add_periodic(self, fn: Callable[[], None], seconds: float) -> None:
        """Call fn() about every `seconds` on the housekeeping thread (exceptions are logged)."""
        self._periodic.append([fn, seconds, time.monotonic()])

    def add_stop_hook(self, fn: Callable[[], None]) -> None:
        """Call fn() on stop, after the data path stopped and before the broker connection closes."""
        self._stop_hooks.append(fn)

    def attach_updater(self, updater: Any) -> None:
        """Wire a fleet updater (appliance.fleet.updater.Updater built with publish=daemon.publish and
        wait_idle=daemon.idle_gate): its subscription, model switches, first-analysis reports, its timeouts and
        its shutdown."""
        self.add_subscription(updater.subscription, updater.handle_message)
        updater.on_activated(lambda analyzer: self.swap_analyzer(analyzer))
        self.add_analysis_listener(updater.report_first_analysis)
        if hasattr(updater, "check_timeouts"):
            self.add_periodic(updater.check_timeouts, 5.0)
        if hasattr(updater, "close"):
            self.add_stop_hook(updater.close)

    def instance_sink(self) -> SpoolSink:
        """An InstanceSink (appliance.ingest.dicom_scp) feeding this daemon: for a DICOM node run elsewhere."""
        return SpoolSink(self)

    def _start_dicom_node(self) -> None:
        from appliance.ingest.dicom_scp import DicomNode, NodeError

        try:
            self.dicom_node = DicomNode.from_config(self.cfg.dicom, self.instance_sink()).start()
        except (NodeError, ValueError, OSError) as e:  # the watch folder keeps working; health says why
            self._dicom_error = str(e)
            log.error("DICOM node not started: %s", e)

    # == recovery ==================================================================================================
    def _recover(self) -> None:
        """Rebuild series in flight from stored findings; re-apply the rule (a verdict lost in a crash is made
        again); spool files are picked up by the worker as usual."""
        n = 0
        now = time.time()
        for row in self.store.open_series():
            ts = self._tracked_from_store(row)
            # the quiet time counts from the restart: slices exported while the appliance was down wait in the
            # watch folder or the spool, and are taken in before the series can be declared complete
            ts.last_seen = max(ts.last_seen, now)
            self.tracker.restore(ts)
            n += 1
            u = self.tracker.evaluate(ts.uid)
            if u is not None:
                self._on_update(u, time.time())
        pend = len(self.spool.pending())
        out = self.store.outbox_count()
        if n or pend or out:
            log.info("resuming: %d series in flight, %d file(s) in the spool, %d message(s) in the outbox",
                     n, pend, out)
        waiting = self._pacs_pending()
        if waiting and self.pacs is None:
            log.warning("%d final verdict(s) wait for PACS, but no [pacs] destinations are configured", len(waiting))
        elif waiting:
            log.info("resuming: handing %d final verdict(s) to the PACS sender", len(waiting))
            self._pacs_flush()

    def _tracked_from_store(self, row: Any) -> TrackedSeries:
        ts = TrackedSeries(row["series_uid"], row["study_uid"], row["first_seen"], row["last_seen"],
                           row["description"], row["expected"], announced=row["announced"])
        for order, finding, ident in sorted(self.store.series_slices(row["series_uid"]), key=lambda t: t[0]):
            ts.add(order, finding, ident)
        return ts

    # == the data path =============================================================================================
    def _work_loop(self) -> None:
        while not self._stop.is_set():
            busy = False
            try:
                busy = self._step()
            except Exception as e:  # the daemon never dies on a file or a bug in one step
                log.exception("worker step failed: %s", e)
                time.sleep(0.5)
            if not busy:
                self._wake.wait(0.2)
                self._wake.clear()

    def _pending(self) -> list[Path]:
        return [p for p in self.spool.pending() if p.name not in self._deferred]

    def _step(self) -> bool:
        now = time.time()
        with self._lock:
            hold = self._hold
        if hold and not self.tracker.in_flight:
            self._paused.set()  # idle_gate holders may swap now; nothing moves until they are done
            return False
        if not hold and self._deferred:
            self._deferred.clear()
        pending = self._pending()
        busy = False
        if pending:  # files already spooled are processed even when the disk is short (they free the spool)
            busy = self._process(pending[: max(1, self.analyzer.config.batch * self.analyzer.workers)], pending, hold > 0)
            pending = self._pending()
        if pending or (self.watch is not None and self.watch.waiting()):
            self._idle_since = None  # slices still to come in: no series is quiet yet
        elif self._idle_since is None:
            self._idle_since = now
        self._apply_hints(pending)
        for u in self.tracker.tick(time.time(), self._idle_since):
            self._on_update(u, time.time())
        if self._pacs_retry_at and time.time() >= self._pacs_retry_at:
            self._pacs_flush()
        return busy

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
        if nxt and not self._stop.is_set():
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
            ident = s.sop_uid or f"sha256:{_sha256(p)}"
            if ident in seen or self.store.has_slice(ident):
                dest = self.spool.processed_path(p.name)
                self.store.add_file(p.name, "duplicate", ident=ident, series_uid=s.series_uid, path=str(dest),
                                    reason="duplicate SOPInstanceUID: analysed before")
                self.spool.move(p, dest)
                log.info("duplicate slice ignored (%s)", p.name)
                continue
            if hold and s.series_uid not in self.tracker.open:
                self._deferred.add(p.name)  # a model switch is waiting for the series in flight
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
                    self.tracker.restore(self._tracked_from_store(row))
                    log.info("series %s reopened by a late slice", row["series_key"])
        moves = []
        with self.store.transaction():
            for (r, ident), f in zip(todo, findings):
                s = r.image
                assert s is not None
                if f is None:
                    self._quarantine(r.path, self._last_analysis_error[1] if self._last_analysis_error else
                                     "analysis failed", s.series_uid)
                    continue
                order = sort_key(dataclasses.replace(s, key=ident, hu=None))
                f.key = ident
                self.store.series_seen(s.series_uid, s.study_uid, pseudonym(self.secret, s.series_uid),
                                       pseudonym(self.secret, s.study_uid), description=s.series_description,
                                       expected=s.expected_count, now=now, labels=self._labels(r.path, s))
                self.store.add_slice(ident, s.series_uid, order, f, now)
                dest = self.spool.processed_path(r.path.name, now)
                self.store.add_file(r.path.name, "analysed", ident=ident, series_uid=s.series_uid, path=str(dest),
                                    now=now)
                moves.append((r.path, dest))
                arrivals.append(Arrival(s.series_uid, s.study_uid, order, f, ident, s.expected_count,
                                        s.series_description, arrived=self.spool.intake_time(r.path)))
                s.hu = None
        for src, dest in moves:
            self.spool.move(src, dest)
        self.slices_total += len(arrivals)
        self._rate.append((now, len(arrivals)))
        for f in findings:
            if f is not None:
                self._stage_ms.append(f.timings_ms)
        for u in self.tracker.add(arrivals, now):
            self._on_update(u, time.time())
        return True

    def _analyse(self, images: list[SliceImage]) -> list[SliceFinding | None]:
        """Findings in order; a batch that fails is retried slice by slice so one bad slice cannot block others."""
        analyzer = self.analyzer
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
                self._last_analysis_error = (time.time(), reason)
                self._notify_analysis(False, reason)
                out.append(None)
        return out

    def _notify_analysis(self, ok: bool, reason: str) -> None:
        for cb in list(self._analysis_listeners):
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
            if self.tracker.hint(h.series_uid, h.reason):
                log.info("completion signal for series %s: %s", pseudonym(self.secret, h.series_uid), h.reason)
        with self._lock:
            self._hints = keep + [h for h in self._hints if h not in hints]

    # == verdicts ==================================================================================================
    def _on_update(self, u: Update, now: float) -> None:
        row = self.store.series(u.series_uid)
        if row is None:
            return
        study_uid = row["study_uid"]
        rows = self.store.study_series(study_uid)
        summaries = []
        for r in rows:
            if r["series_uid"] == u.series_uid:
                v = u.verdict
            elif r["verdict"]:
                v = verdict_from_dict(json.loads(r["verdict"]))
            else:
                continue
            summaries.append(SeriesSummary(r["series_key"], v, r["description"],
                                           now if r["series_uid"] == u.series_uid else r["updated"]))
        sv, lead = study_verdict(summaries)
        lead_row = next(r for r in rows if r["series_key"] == lead.series_key)
        findings = [f for _, f, _ in sorted(self.store.series_slices(lead_row["series_uid"]), key=lambda t: t[0])]
        analyzer = self.analyzer
        final_lead = lead.verdict.state == "final"
        ms = [sum(f.timings_ms.values()) for f in findings if f.timings_ms]
        timings = {"first_slice_to_verdict_s": round(now - lead_row["first_seen"], 3),
                   "last_slice_to_verdict_s": round(now - lead_row["last_seen"], 3) if final_lead else None,
                   "ms_per_slice": round(sum(ms) / len(ms), 3) if ms else 0.0}
        complete_reason = (u.complete_reason if lead_row["series_uid"] == u.series_uid
                           else lead_row["complete_reason"]) if sv.state == "final" else None
        labels = json.loads(lead_row["labels"]) if lead_row["labels"] and self.cfg.privacy.send_patient_labels else None
        prev = self.store.study(study_uid)
        publish, correction = self._after_final(prev, sv, lead_row["study_key"])
        payload = msg.verdict_payload(
            device=self.cfg.device_id, study_key=lead_row["study_key"], series_key=lead.series_key, verdict=sv,
            bundles=analyzer.bundles, backend=analyzer.backend, device_type=analyzer.device,
            complete_reason=complete_reason or ("series complete" if sv.state == "final" else None), timings=timings,
            series=[self._series_item(s) for s in summaries],
            rejected=self.store.rejected_count(lead_row["series_uid"]), labels=labels, correction=correction)
        fp = fingerprint(payload)
        changed = publish and (prev is None or prev["fingerprint"] != fp)
        overlay = self._overlay_payload(lead_row, payload["state"], sv.result, findings) if changed else None
        study_key = lead_row["study_key"]
        expiry = self.cfg.mqtt.verdict_expiry_seconds or None
        pacs_fp = pacs_fingerprint(payload) if changed and sv.state == "final" and self.pacs is not None else None
        if pacs_fp is not None and self.store.kv_get(PACS_SENT + study_key) == pacs_fp:
            pacs_fp = None  # PACS has this result already (the study changed elsewhere)
        with self.store.transaction():
            if u.kind == "provisional":
                self.store.set_series(u.series_uid, verdict=u.verdict, announced=u.verdict.result, now=now)
            else:
                self.store.set_series(u.series_uid, verdict=u.verdict, state="complete",
                                      complete_reason=u.complete_reason, now=now)
            if changed:
                self.store.outbox_add(self.topics.verdict(study_key), self._json(payload), self.cfg.mqtt.qos, True,
                                      expiry, now)
                if overlay is not None:
                    self.store.outbox_add(self.topics.overlay(study_key), self._json(overlay), self.cfg.mqtt.qos, True,
                                          expiry, now)
                self.store.add_verdict(payload, now)
                self.store.set_study(study_uid, study_key, fp, sv.result, payload["state"], now)
            if pacs_fp is not None:  # committed with the verdict: a crash before the hand-over loses nothing
                waiting = self._pacs_pending() + [{"series_uid": lead_row["series_uid"], "verdict": payload}]
                self.store.kv_set(PACS_PENDING, json.dumps(waiting))
                self.store.kv_set(PACS_SENT + study_key, pacs_fp)
        if changed:
            self._last_latency = timings["last_slice_to_verdict_s"] or timings["first_slice_to_verdict_s"]
            if self.pump is not None:
                self.pump.kick()
        if pacs_fp is not None:
            self._pacs_flush()
        ev, fo = sv.evidence, sv.focal
        held = ("" if changed else " unchanged, not re-published" if publish else
                f" not published: the study's final verdict ({prev['result']}) stands" if prev else "")
        log.info("verdict %s %s for study %s (series %s%s)%s%s", payload["state"], sv.result, study_key,
                 lead.series_key, f", {ev.quadrant} run {ev.run}" if ev else
                 f", one focal lesion {fo.quadrant} run {fo.run}" if fo else "",
                 f"; complete: {complete_reason}" if complete_reason else "", held)

    def _after_final(self, prev: Any, sv: Any, study_key: str) -> tuple[bool, dict[str, Any] | None]:
        """(publish?, correction) for a study verdict. A study's final verdict is published once. After it, the
        study's verdicts (late slices, another series) go out only when a final result differs from the one
        published: as a correction naming what it replaces. Provisional states after a final, and finals that
        agree with it, are stored and not published (no provisional after a final, no second final)."""
        if prev is None or prev["state"] not in ("final", "corrected"):
            return True, None
        if sv.state != "final" or sv.result == prev["result"]:
            return False, None
        published = self.store.verdicts(study_key)
        last = published[-1] if published else {"result": prev["result"], "state": prev["state"], "created": None}
        return True, msg.correction(last, sv.result)

    def _overlay_payload(self, row: Any, state: str, result: str, findings: list[SliceFinding]) -> dict[str, Any]:
        from appliance.analyze import key_slices

        ks = key_slices(findings)
        png = index = size = None
        if ks and self.cfg.mqtt.key_images:
            index = int(ks[0]["index"])
            try:
                png, size = self._key_image(findings, index, result, state, max_size=384, words=False)
            except Exception as e:  # noqa: BLE001 - the overlay goes out without an image
                log.warning("key image not rendered: %s: %s", type(e).__name__, e)
                png = None
        return msg.overlay_payload(device=self.cfg.device_id, study_key=row["study_key"], series_key=row["series_key"],
                                   state=state, slices=len(findings), key_slices=ks, image_png=png,
                                   image_index=index if png else None, image_size=size if png else None)

    def _key_image(self, findings: list[SliceFinding], index: int, result: str, state: str,
                   max_size: int, words: bool = True) -> tuple[bytes | None, tuple[int, int] | None]:
        """The slice with its boxes; words: the slice number and verdict burned in (PACS key image). The display's
        key image goes without (the display writes its caption itself, legible at tile size)."""
        from appliance.publish.overlays import png_bytes, render, slice_grey

        f = findings[index]
        path = self._source_path(f.key)
        if path is None:
            return None, None
        img = read_slice(path, max_tilt_deg=self.cfg.analysis.max_tilt_deg)
        text = f"slice {index + 1}/{len(findings)}  {result.upper()} ({state})"
        im = render(slice_grey(img.hu, None), f, title=text, max_size=max_size, text=words)
        return png_bytes(im), (im.width, im.height)

    def _source_path(self, ident: str) -> Path | None:
        """Where the analysed file of a slice is now: processed/, or still in the spool after a crash before the
        move; None once pruned (watch.keep_processed_days)."""
        stored = self.store.file_path(ident)
        if not stored:
            return None
        for p in (Path(stored), self.spool.dir / Path(stored).name):
            if p.is_file():
                return p
        return None

    def _series_item(self, s: SeriesSummary) -> dict[str, Any]:
        """A study verdict's entry for one series. SeriesDescription is free text typed at the console (it can hold
        a name or an ID): it goes out only where the site sends patient labels."""
        d = s.as_dict()
        if not self.cfg.privacy.send_patient_labels:
            d.pop("description", None)
        return d

    # == results to PACS ===========================================================================================
    def _pacs_pending(self) -> list[dict[str, Any]]:
        try:
            return list(json.loads(self.store.kv_get(PACS_PENDING) or "[]"))
        except (json.JSONDecodeError, TypeError):
            log.error("PACS: the list of verdicts waiting for the sender is damaged; starting a new one")
            return []

    def _pacs_flush(self) -> None:
        """Hand every committed final verdict the PACS sender has not taken yet to it (worker thread, start).
        Re-submitting one it took before is harmless: the sender derives the results' UIDs from the verdict."""
        waiting = self._pacs_pending()
        if self.pacs is None or not waiting:
            self._pacs_retry_at = 0.0
            return
        keep, error = [], None
        for entry in waiting:
            v = entry.get("verdict") or {}
            what = f"{v.get('state')} {v.get('result')} verdict of study {v.get('study_key')}"
            try:
                self._pacs_submit(entry)
                log.info("PACS: %s queued for %d destination(s)", what, len(self.pacs.destinations))
            except OSError as e:  # the outbox cannot be written (disk full, permissions): keep it, try again
                error = f"results cannot be queued for PACS: {e.strerror or e}"
                keep.append(entry)
            except Exception as e:  # noqa: BLE001 - it would fail again: say why and let it go
                self._pacs_dropped += 1
                msg_ = str(e) if isinstance(e, Unsendable) else f"{type(e).__name__}: {e}"
                log.error("PACS: %s cannot be sent: %s", what, msg_)
        self.store.kv_set(PACS_PENDING, json.dumps(keep))
        if keep:
            self._pacs_retry_at = time.time() + self.cfg.pacs.retry_seconds
            (log.warning if error != self._pacs_error else log.debug)(
                "%s; %d verdict(s) wait, trying again every %g s", error, len(keep), self.cfg.pacs.retry_seconds)
        else:
            self._pacs_retry_at = 0.0
            if self._pacs_error:
                log.info("PACS: results can be queued again")
        self._pacs_error = error

    def _pacs_submit(self, entry: dict[str, Any]) -> None:
        """The SR (and key image) of one final verdict, its source the lead series in the analyzer's order."""
        from appliance.analyze import key_slices
        from appliance.publish.pacs import KeyImage
        from appliance.publish.sr import SourceSeries

        verdict = entry["verdict"]
        rows = sorted(self.store.series_slices(entry["series_uid"]), key=lambda t: t[0])
        if not rows:
            raise Unsendable("no analysed slices stored for its series")
        findings = [f for _, f, _ in rows]
        paths = [self._source_path(ident) for _, _, ident in rows]
        gone = sum(p is None for p in paths)
        if gone:
            raise Unsendable(f"{gone} of {len(paths)} source file(s) are no longer on disk "
                             "(pruned after watch.keep_processed_days?)")
        source = SourceSeries.from_files(paths)  # headers only
        ks = key_slices(findings)
        key_image = None
        if ks and self.pacs.send_key_images:
            index = int(ks[0]["index"])
            try:
                png, _ = self._key_image(findings, index, str(verdict.get("result")), str(verdict.get("state")),
                                         max_size=PACS_KEY_IMAGE_SIZE)
                key_image = KeyImage(index, png) if png else None
            except Exception as e:  # noqa: BLE001 - the SR goes without a key image
                log.warning("PACS key image not rendered: %s: %s", type(e).__name__, e)
        self.pacs.submit(verdict, source, key_slices=ks, key_image=key_image)

    # == status, stats, health ====================================================================================
    @staticmethod
    def _json(payload: dict[str, Any]) -> bytes:
        return json.dumps(payload, separators=(",", ":")).encode()

    def _status_payload(self, state: str, detail: str | None) -> dict[str, Any]:
        a = self.analyzer
        return msg.status_payload(device=self.cfg.device_id, state=state, bundles=a.bundles if a else [],
                                  backend=a.backend if a else "", device_type=a.device if a else "",
                                  precision=a.precision if a else "", started=_iso(self._started) or "",
                                  detail=detail)

    def _health(self) -> dict[str, str]:
        now = time.time()
        problems: dict[str, str] = {}
        if not self.spool.has_room():
            problems["disk"] = (f"state disk has {self.spool.free_mb():.0f} MB free, below watch.min_free_mb = "
                                f"{self.cfg.watch.min_free_mb}: not taking files")
        if self.watch is not None and self.watch.blocked and "disk" not in problems:
            problems["watch"] = self.watch.blocked
        t = self.transport
        if t is not None:
            if t.connected:
                self._disconnected_since = None
            elif self._disconnected_since is None:
                self._disconnected_since = now
            if self._disconnected_since is not None and now - self._disconnected_since > BROKER_GRACE_S:
                problems["broker"] = f"broker unreachable since {_iso(self._disconnected_since)}"
        if self._dicom_error:
            problems["dicom"] = f"DICOM node not running: {self._dicom_error}"
        if self._last_analysis_error and now - self._last_analysis_error[0] < 300:
            problems["analysis"] = self._last_analysis_error[1]
        pacs = self._pacs_problem()
        if pacs:
            problems["pacs"] = pacs
        return problems

    def _pacs_problem(self) -> str | None:
        if self.pacs is None:
            return None
        if self._pacs_error:
            return self._pacs_error
        down = [f"{d['destination']}: {d['last_error']} ({d['pending']} waiting)" for d in self.pacs.status()
                if d["last_error"] and d["pending"]]
        return "results not delivered to PACS: " + "; ".join(down) if down else None

    def _pacs_status(self) -> dict[str, Any] | None:
        """Delivery per destination: counts and the last error only (no identifiers)."""
        if self.pacs is None:
            return None
        try:
            queued = len(self._pacs_pending())
        except Exception:  # noqa: BLE001 - store closed
            queued = 0
        return {"calling_ae_title": self.pacs.calling_aet, "queued": queued, "dropped": self._pacs_dropped,
                "error": self._pacs_error, "destinations": self.pacs.status()}

    def _rate_per_s(self, window: float) -> float:
        now = time.time()
        n = sum(k for t, k in self._rate if now - t <= window)
        return n / window if window > 0 else 0.0

    def _stage_summary(self) -> dict[str, float]:
        if not self._stage_ms:
            return {}
        keys = {k for d in self._stage_ms for k in d}
        return {k: round(sum(d.get(k, 0.0) for d in self._stage_ms) / len(self._stage_ms), 3) for k in sorted(keys)}

    def _stats_payload(self) -> dict[str, Any]:
        counts = self.store.counts()
        try:
            import psutil

            rss = psutil.Process().memory_info().rss / 2**20
        except Exception:
            rss = 0.0
        return msg.stats_payload(device=self.cfg.device_id, queue=len(self.spool.pending()),
                                 slices_per_s=self._rate_per_s(max(1.0, self.cfg.mqtt.stats_interval_seconds)),
                                 open_series=len(self.tracker.open), slices_total=self.slices_total,
                                 stage_ms=self._stage_summary(), last_verdict_latency_s=self._last_latency,
                                 outbox=counts["outbox"], quarantined=counts["rejected"], rss_mb=round(rss, 1),
                                 disk_free_mb=round(self.spool.free_mb(), 1))

    def _housekeeping(self) -> None:
        last_stats = last_prune = 0.0
        period = min(STATUS_INTERVAL_S, self.cfg.mqtt.stats_interval_seconds)
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                problems = self._health()
                self._problems = problems
                state = "degraded" if problems else "online"
                detail = "; ".join(problems.values()) if problems else None
                kinds = tuple(sorted(problems))
                if kinds != self._published_problems and self.transport is not None:  # one line per change
                    self._published_problems = kinds
                    self._published_status = (state, detail)
                    self.transport.set_status(self._json(self._status_payload(state, detail)))
                    (log.warning if problems else log.info)("health: %s%s", state, f" ({detail})" if detail else "")
                if now - last_stats >= self.cfg.mqtt.stats_interval_seconds:
                    last_stats = now
                    if self.transport is not None and self.transport.connected:
                        self.transport.send(self.topics.stats, self._json(self._stats_payload()), qos=self.cfg.mqtt.qos)
                for entry in self._periodic:
                    fn, every, last = entry
                    if now - last >= every:
                        entry[2] = now
                        try:
                            fn()
                        except Exception:
                            log.exception("periodic task failed")
                if now - last_prune >= 3600:
                    last_prune = now
                    self.spool.clean_incoming()
                    n = self.spool.prune_processed(self.cfg.watch.keep_processed_days)
                    if n:
                        log.info("pruned %d processed file(s) older than %g days", n,
                                 self.cfg.watch.keep_processed_days)
                    w = self.cfg.watch
                    n = self.spool.prune_quarantine(w.quarantine_keep_days, w.quarantine_max_mb)
                    if n:
                        log.info("pruned %d quarantined file(s) (older than %g days, or beyond %d MB)", n,
                                 w.quarantine_keep_days, w.quarantine_max_mb)
                self._write_status()
            except Exception:
                log.exception("housekeeping failed")
            self._stop.wait(period)

    def status(self) -> dict[str, Any]:
        """What `ctriage status` shows (also written to <state>/status.json every few seconds)."""
        a = self.analyzer
        open_series = [{"series_key": pseudonym(self.secret, s.uid), "study_key": pseudonym(self.secret, s.study_uid),
                        "slices": s.count, "provisional": s.announced, "expected": s.expected,
                        "first_seen": _iso(s.first_seen), "last_seen": _iso(s.last_seen)}
                       for s in list(self.tracker.open.values())]
        try:
            counts = self.store.counts()
        except Exception:  # noqa: BLE001 - store closed
            counts = {}
        return {
            "schema": "ctriage.daemon-status/1", "device": self.cfg.device_id, "version": __version__,
            "pid": os.getpid(), "state": self._state, "health": "degraded" if self._problems else "ok",
            "problems": self._problems, "started": _iso(self._started), "heartbeat": time.time(),
            "queue": len(self.spool.pending()), "deferred": len(self._deferred), "open_series": open_series,
            "counts": counts, "slices_total": self.slices_total, "slices_per_s": round(self._rate_per_s(60.0), 3),
            "stage_ms": self._stage_summary(), "last_verdict_latency_s": self._last_latency,
            "analyzer": {"bundles": a.bundles, "backend": a.backend, "device": a.device, "precision": a.precision}
            if a else None,
            "broker": self.transport.health() if self.transport else None,
            "watch": {"dir": self.cfg.watch.dir, "blocked": self.watch.blocked if self.watch else None,
                      "taken": self.watch.taken if self.watch else 0},
            "dicom": {"ae_title": self.dicom_node.ae_title, "port": self.dicom_node.port,
                      "stats": dataclasses.asdict(self.dicom_node.stats)} if self.dicom_node else None,
            "pacs": self._pacs_status(),
            "disk_free_mb": round(self.spool.free_mb(), 1), "state_dir": str(self.state_dir),
        }

    def _write_status(self) -> None:
        p = self.state_dir / STATUS_FILE
        tmp = p.with_name(p.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.status(), indent=1))
            os.replace(tmp, p)
        except Exception as e:  # noqa: BLE001 - status is informative only
            log.debug("status file not written: %s", e)
