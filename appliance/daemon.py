"""The appliance daemon: spool → decode → analyse (small batches) → series tracker → store → outbox → MQTT.

This module is the composition root: it builds the parts in `appliance.service` (intake, verdicts, PACS hand-over,
health), wires them to the store, spool, tracker, transport and analyzer, and owns their threads and lifecycle.

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
import datetime as dt
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydicom.uid import JPEGLosslessSV1

from appliance import __version__
from appliance.config import Config, ConfigError
from appliance.ingest.jpeg_decoder import decoder_name
from appliance.ingest.spool import Spool
from appliance.pipeline.case_logic import CaseRule
from appliance.pipeline.tracker import SeriesTracker
from appliance.privacy import load_secret
from appliance.publish import messages as msg
from appliance.publish.mqtt import MQTTTransport
from appliance.publish.outbox import OutboxPump
from appliance.publish.transport import Transport
from appliance.service import compact_json
from appliance.service.health import BROKER_GRACE_S, STATUS_FILE, STATUS_INTERVAL_S, Health, read_status
from appliance.service.intake import Intake
from appliance.service.key_image import SourceImages
from appliance.service.pacs_handover import PACS_PENDING, PACS_SENT, PacsHandover, Unsendable, pacs_fingerprint
from appliance.service.stats import Stats
from appliance.service.verdicts import Verdicts, fingerprint
from appliance.store import Store

log = logging.getLogger("ctriage.daemon")

DB_FILE = "ctriage.db"
# BROKER_GRACE_S is read from this module at every health check (patch it here); the others are re-exported
__all__ = ["BROKER_GRACE_S", "DB_FILE", "PACS_PENDING", "PACS_SENT", "STATUS_FILE", "STATUS_INTERVAL_S", "Daemon",
           "JsonFormatter", "Unsendable", "fingerprint", "pacs_fingerprint", "read_status", "setup_logging"]


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
    for noisy in ("watchdog", "PIL", "pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pydicom both warns and logs each header oddity: keep the warning, as a log line (JSON too), said once
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.captureWarnings(True)



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
                                     max_open=cfg.series.max_open_series,
                                     partial_quiet_seconds=cfg.series.partial_quiet_seconds)
        self.topics = msg.Topics(cfg.mqtt.prefix, cfg.device_id)
        self.analyzer = analyzer
        self.transport = transport
        self.pump: OutboxPump | None = None
        self.watch = None
        self.dicom_node = None
        self._subs: list[tuple[str, Callable[[str, bytes], None]]] = []
        self._stop_hooks: list[Callable[[], None]] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running = False
        # the parts: each gets what it uses, none knows the daemon
        self.stats = Stats()
        images = SourceImages(cfg, self.store, self.spool)
        self.pacs_handover = PacsHandover(cfg, self.store, images)
        self.verdicts = Verdicts(cfg, self.store, self.topics, lambda: self.analyzer, images, self.pacs_handover,
                                 self.stats, kick=self._kick)
        self.intake = Intake(cfg, self.store, self.spool, self.tracker, self.secret, self.stats,
                             lambda: self.analyzer, self.verdicts.on_update, more_coming=self._files_on_the_way,
                             wake=self._wake, stopping=self._stop)
        self.health = Health(cfg, self.state_dir, self.secret, self.store, self.spool, self.tracker, self.topics,
                             self.stats, self.pacs_handover, analyzer=lambda: self.analyzer,
                             transport=lambda: self.transport, watch=lambda: self.watch,
                             dicom_node=lambda: self.dicom_node, deferred=lambda: len(self.intake.deferred),
                             grace=lambda: BROKER_GRACE_S)

    @property
    def pacs(self) -> Any:
        """appliance.publish.pacs.PacsSender when [pacs] destinations are configured (after start), else None."""
        return self.pacs_handover.sender

    @pacs.setter
    def pacs(self, sender: Any) -> None:
        self.pacs_handover.sender = sender

    @property
    def _problems(self) -> dict[str, str]:
        """What makes health degraded now (kind → why), as of the last housekeeping round."""
        return self.health.problems

    def _kick(self) -> None:
        if self.pump is not None:
            self.pump.kick()

    def _files_on_the_way(self) -> bool:
        return self.watch is not None and self.watch.waiting()

    # == lifecycle ==================================================================================================
    def start(self) -> None:
        """Load what is missing, recover from the store, start the threads; returns at once."""
        if self._running:
            return
        if self.analyzer is None:
            from appliance.service.analyzer_factory import make_analyzer

            self.analyzer = make_analyzer(self.cfg)
        self.health.started = time.time()
        with self._lock:
            if self.transport is None:  # subscriptions made before go to the new transport
                client_id = self.cfg.mqtt.client_id or f"ctriage-{self.cfg.device_id}"
                self.transport = MQTTTransport(self.cfg.mqtt, client_id, self.topics.status,
                                               self._json(msg.offline_payload(self.cfg.device_id)))
                for topic, handler in self._subs:
                    self.transport.subscribe(topic, handler)
        self.health.announce("online", None)
        self.transport.start()
        self.pump = OutboxPump(self.store, self.transport)
        self.pump.start()
        self.pacs_handover.start()
        self.intake.recover()
        self.pacs_handover.resume()
        if self.cfg.watch.dir:
            from appliance.ingest.watch_folder import WatchFolder

            self.watch = WatchFolder(Path(self.cfg.watch.dir).expanduser(), self.spool, self.cfg.watch,
                                     on_hint=lambda uid, why: self.series_complete_hint(uid, why, weak=False))
            self.watch.start()
        if self.cfg.dicom.enabled:
            self._start_dicom_node()
        self._running = True
        self.health.state = "running"
        for name, target in (("worker", self._work_loop), ("housekeeping", lambda: self.health.run(self._stop))):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("ctriage %s running as %s: backend %s on %s, bundles %s, watch %s, broker %s", __version__,
                 self.cfg.device_id, self.analyzer.backend, self.analyzer.device,
                 ", ".join(f"{b['name']} {b['version']}" for b in self.analyzer.bundles),
                 self.cfg.watch.dir or "(none)", getattr(self.transport, "url", None) and self.transport.url.redacted())
        log.info("JPEG Lossless pixels decoded by %s", decoder_name(JPEGLosslessSV1))

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the batch in hand, flush the store, publish status offline, disconnect cleanly."""
        if not self._running:
            return
        log.info("stopping: finishing the slices in hand")
        self.health.state = "stopping"
        if self.dicom_node is not None:
            self.dicom_node.stop()
        if self.watch is not None:
            self.watch.stop()
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
        self.intake.close()
        self.pacs_handover.stop()  # what it has not delivered waits in <state>/pacs-outbox for the next start
        for hook in self._stop_hooks:
            try:
                hook()
            except Exception:
                log.exception("stop hook failed")
        if self.pump is not None:
            self.pump.drain(3.0)
            self.pump.stop()
        if self.transport is not None:
            self.transport.stop(self.health.status_message("offline", "stopped"))
        self._running = False
        self.health.state = "stopped"
        self.health.write_status()
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
            if not self.intake.busy() and self.store.outbox_count() == 0:
                return True
            time.sleep(0.1)
        return False

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            busy = False
            try:
                busy = self.intake.step()
                if not self.intake.paused.is_set():  # paused for a model swap: nothing moves
                    self.pacs_handover.retry_if_due()
            except Exception as e:  # the daemon never dies on a file or a bug in one step
                log.exception("worker step failed: %s", e)
                time.sleep(0.5)
            if not busy:
                self._wake.wait(0.2)
                self._wake.clear()

    # == plug-in points ============================================================================================
    def series_complete_hint(self, series_uid: str, reason: str = "sender: association released",
                             weak: bool = True) -> None:
        """A sender says this series is complete (DICOM association released; an end marker, not `weak`). Applied
        once every file spooled before this call has been analysed; ignored for a series that is not in flight
        then. A weak signal completes a series only when its slices do not look like part of one
        (`SeriesTracker.hint`): some senders release an association after every image."""
        self.intake.hint(series_uid, reason, weak)

    def add_subscription(self, topic: str, handler: Callable[[str, bytes], None]) -> None:
        """Route MQTT messages matching `topic` (a filter, + and # allowed) to handler(topic, payload). Handlers run
        on the transport's handler thread: they may block, but should not for long."""
        with self._lock:
            self._subs.append((topic, handler))
            if self.transport is not None:
                self.transport.subscribe(topic, handler)

    def publish(self, topic: str, payload: dict[str, Any] | bytes, retain: bool = False,
                expiry: int | None = None) -> None:
        """Queue a message in the durable outbox (sent in order, at least once)."""
        data = payload if isinstance(payload, bytes) else self._json(payload)
        self.store.outbox_add(topic, data, self.cfg.mqtt.qos, retain, expiry)
        self._kick()

    def add_analysis_listener(self, cb: Callable[[bool, str], None]) -> None:
        """cb(ok, reason) after every analysed batch (ok False when the analysis failed)."""
        self.intake.listeners.append(cb)

    @contextlib.contextmanager
    def idle_gate(self, timeout: float | None = None) -> Iterator[None]:
        """Hold new series back, wait until no series is in flight, and keep the data path paused inside the
        block (swap models there). Raises TimeoutError when the series in flight do not finish in time."""
        self.intake.hold()
        try:
            if self._running and not self.intake.paused.wait(timeout):
                raise TimeoutError("series still in flight: the data path did not become idle in time")
            yield
        finally:
            self.intake.release()

    def swap_analyzer(self, new: Any, check: Callable[[Any], None] | None = None,
                      timeout: float | None = None) -> Any:
        """Switch to another Analyzer between studies: waits until no series is in flight (new series wait in the
        spool), runs check(new) (raise to refuse: nothing changes), swaps, re-announces status. Returns the old one.
        Call it from your own thread, not from an MQTT handler."""
        if self.intake.held and self.intake.paused.is_set() or not self._running:
            return self._swap_now(new, check)
        with self.idle_gate(timeout):
            return self._swap_now(new, check)

    def _swap_now(self, new: Any, check: Callable[[Any], None] | None) -> Any:
        if check is not None:
            check(new)
        old, self.analyzer = self.analyzer, new
        log.info("analyzer switched: %s on %s, bundles %s", new.backend, new.device,
                 ", ".join(f"{b['name']} {b['version']}" for b in new.bundles))
        self.health.reannounce()
        self.health.write_status()
        return old

    def add_periodic(self, fn: Callable[[], None], seconds: float) -> None:
        """Call fn() about every `seconds` on the housekeeping thread (exceptions are logged)."""
        self.health.periodic.append([fn, seconds, time.monotonic()])

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

    def instance_sink(self) -> Any:
        """An InstanceSink (appliance.ingest.dicom_scp.SpoolSink) feeding this daemon: for a DICOM node run
        elsewhere."""
        from appliance.ingest.dicom_scp import SpoolSink

        return SpoolSink(self.spool, self.series_complete_hint)

    def _start_dicom_node(self) -> None:
        from appliance.ingest.dicom_scp import DicomNode, NodeError

        try:
            self.dicom_node = DicomNode.from_config(self.cfg.dicom, self.instance_sink()).start()
        except (NodeError, ValueError, OSError) as e:  # the watch folder keeps working; health says why
            self.health.dicom_error = str(e)
            log.error("DICOM node not started: %s", e)

    # == status ====================================================================================================
    @staticmethod
    def _json(payload: dict[str, Any]) -> bytes:
        return compact_json(payload)

    def status(self) -> dict[str, Any]:
        """What `ctriage status` shows (also written to <state>/status.json every few seconds)."""
        return self.health.status()
