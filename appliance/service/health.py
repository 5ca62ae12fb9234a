"""Health and status: the problems that make the appliance "degraded" (disk, watch folder, broker, DICOM node,
analysis, PACS), the status message (retained; re-published when the problems change), the stats message, the
status file (<state>/status.json, what `ctriage status` reads) and the housekeeping round that keeps them current,
runs the plug-ins' periodic tasks and prunes processed and quarantined files.

The daemon's own objects that come and go (analyzer, transport, watch folder, DICOM node) are read through the
getters it passes; its lifecycle state (`state`, `started`, `dicom_error`) it sets here.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.durable import atomic_write
from appliance.privacy import pseudonym
from appliance.publish import messages as msg
from appliance.service import compact_json
from appliance.service.pacs_handover import PacsHandover
from appliance.service.stats import Stats

log = logging.getLogger("ctriage.daemon")

STATUS_FILE = "status.json"
STATUS_INTERVAL_S = 2.0
BROKER_GRACE_S = 30.0  # disconnected longer than this: health degraded
ANALYSIS_PROBLEM_S = 300.0  # an analysis failure is a problem for this long
PRUNE_INTERVAL_S = 3600.0


def iso(t: float | None) -> str | None:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if t else None


def read_status(state_dir: str | Path) -> dict[str, Any] | None:
    """The status file the daemon keeps (None when there is none)."""
    p = Path(state_dir) / STATUS_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _none() -> Any:
    return None


class Health:
    """grace: seconds the broker may be unreachable before that is a problem (read at every check)."""

    def __init__(self, cfg: Any, state_dir: Path, secret: bytes, store: Any, spool: Any, tracker: Any,
                 topics: msg.Topics, stats: Stats, pacs: PacsHandover, *,
                 analyzer: Callable[[], Any] = _none, transport: Callable[[], Any] = _none,
                 watch: Callable[[], Any] = _none, dicom_node: Callable[[], Any] = _none,
                 deferred: Callable[[], int] = lambda: 0, grace: Callable[[], float] = lambda: BROKER_GRACE_S) -> None:
        self.cfg, self.state_dir, self.secret = cfg, Path(state_dir), secret
        self.store, self.spool, self.tracker, self.topics, self.stats, self.pacs = (store, spool, tracker, topics,
                                                                                     stats, pacs)
        self.analyzer, self.transport, self.watch, self.dicom_node = analyzer, transport, watch, dicom_node
        self.deferred, self.grace = deferred, grace
        self.periodic: list[list[Any]] = []  # [fn, interval_s, last_run]
        self.state = "starting"
        self.started: float | None = None
        self.dicom_error: str | None = None
        self.problems: dict[str, str] = {}
        self.published_status: tuple[str, str | None] | None = None
        self.published_problems: tuple[str, ...] = ()  # which problems the last status (and log line) named
        self.disconnected_since: float | None = time.time()

    # == the status message ========================================================================================
    def status_payload(self, state: str, detail: str | None) -> dict[str, Any]:
        a = self.analyzer()
        return msg.status_payload(device=self.cfg.device_id, state=state, bundles=a.bundles if a else [],
                                  backend=a.backend if a else "", device_type=a.device if a else "",
                                  precision=a.precision if a else "", started=iso(self.started) or "",
                                  detail=detail)

    def status_message(self, state: str, detail: str | None) -> bytes:
        return compact_json(self.status_payload(state, detail))

    def announce(self, state: str = "online", detail: str | None = None) -> None:
        """Set the retained status message (the transport publishes it on every connection)."""
        self.published_status = (state, detail)
        self.transport().set_status(self.status_message(state, detail))

    def reannounce(self) -> None:
        """The status message again with what it said last (the analyzer changed)."""
        t = self.transport()
        if t is not None:
            state, detail = self.published_status or ("online", None)
            t.set_status(self.status_message(state, detail))

    # == problems ==================================================================================================
    def check(self) -> dict[str, str]:
        now = time.time()
        problems: dict[str, str] = {}
        if not self.spool.has_room():
            problems["disk"] = (f"state disk has {self.spool.free_mb():.0f} MB free, below watch.min_free_mb = "
                                f"{self.cfg.watch.min_free_mb}: not taking files")
        watch = self.watch()
        if watch is not None and watch.blocked and "disk" not in problems:
            problems["watch"] = watch.blocked
        t = self.transport()
        if t is not None:
            if t.connected:
                self.disconnected_since = None
            elif self.disconnected_since is None:
                self.disconnected_since = now
            if self.disconnected_since is not None and now - self.disconnected_since > self.grace():
                problems["broker"] = f"broker unreachable since {iso(self.disconnected_since)}"
        if self.dicom_error:
            problems["dicom"] = f"DICOM node not running: {self.dicom_error}"
        err = self.stats.analysis_error
        if err and now - err[0] < ANALYSIS_PROBLEM_S:
            problems["analysis"] = err[1]
        pacs = self.pacs.problem()
        if pacs:
            problems["pacs"] = pacs
        return problems

    # == stats and status ==========================================================================================
    def stats_payload(self) -> dict[str, Any]:
        counts = self.store.counts()
        try:
            import psutil

            rss = psutil.Process().memory_info().rss / 2**20
        except Exception:
            rss = 0.0
        s = self.stats
        return msg.stats_payload(device=self.cfg.device_id, queue=len(self.spool.pending()),
                                 slices_per_s=s.rate_per_s(max(1.0, self.cfg.mqtt.stats_interval_seconds)),
                                 open_series=len(self.tracker.open), slices_total=s.slices_total,
                                 stage_ms=s.stage_summary(), last_verdict_latency_s=s.last_latency,
                                 outbox=counts["outbox"], quarantined=counts["rejected"], rss_mb=round(rss, 1),
                                 disk_free_mb=round(self.spool.free_mb(), 1))

    def status(self) -> dict[str, Any]:
        """What `ctriage status` shows (also written to <state>/status.json every few seconds)."""
        a, transport, watch, node, s = self.analyzer(), self.transport(), self.watch(), self.dicom_node(), self.stats
        waiting = self.tracker.waiting()  # quiet, but held open: the slices look incomplete
        open_series = [{"series_key": pseudonym(self.secret, t.uid), "study_key": pseudonym(self.secret, t.study_uid),
                        "slices": t.count, "provisional": t.announced, "expected": t.expected,
                        "first_seen": iso(t.first_seen), "last_seen": iso(t.last_seen),
                        "looks_incomplete": waiting.get(t.uid)}
                       for t in list(self.tracker.open.values())]
        try:
            counts = self.store.counts()
        except Exception:  # noqa: BLE001 - store closed
            counts = {}
        return {
            "schema": "ctriage.daemon-status/1", "device": self.cfg.device_id, "version": __version__,
            "pid": os.getpid(), "state": self.state, "health": "degraded" if self.problems else "ok",
            "problems": self.problems, "started": iso(self.started), "heartbeat": time.time(),
            "queue": len(self.spool.pending()), "deferred": self.deferred(), "open_series": open_series,
            "counts": counts, "slices_total": s.slices_total, "slices_per_s": round(s.rate_per_s(60.0), 3),
            "stage_ms": s.stage_summary(), "last_verdict_latency_s": s.last_latency,
            "analyzer": {"bundles": a.bundles, "backend": a.backend, "device": a.device, "precision": a.precision}
            if a else None,
            "broker": transport.health() if transport else None,
            "watch": {"dir": self.cfg.watch.dir, "blocked": watch.blocked if watch else None,
                      "taken": watch.taken if watch else 0},
            "dicom": {"ae_title": node.ae_title, "port": node.port,
                      "stats": dataclasses.asdict(node.stats)} if node else None,
            "pacs": self.pacs.status(),
            "disk_free_mb": round(self.spool.free_mb(), 1), "state_dir": str(self.state_dir),
        }

    def write_status(self) -> None:
        try:
            atomic_write(self.state_dir / STATUS_FILE, json.dumps(self.status(), indent=1), sync_dir=False)
        except Exception as e:  # noqa: BLE001 - status is informative only
            log.debug("status file not written: %s", e)

    # == housekeeping ==============================================================================================
    def run(self, stop: threading.Event) -> None:
        """The housekeeping thread: a round every STATUS_INTERVAL_S (or stats interval) until stop is set."""
        last_stats = last_prune = 0.0
        period = min(STATUS_INTERVAL_S, self.cfg.mqtt.stats_interval_seconds)
        while not stop.is_set():
            try:
                now = time.monotonic()
                self._publish_health()
                if now - last_stats >= self.cfg.mqtt.stats_interval_seconds:
                    last_stats = now
                    t = self.transport()
                    if t is not None and t.connected:
                        t.send(self.topics.stats, compact_json(self.stats_payload()), qos=self.cfg.mqtt.qos)
                for entry in self.periodic:
                    fn, every, last = entry
                    if now - last >= every:
                        entry[2] = now
                        try:
                            fn()
                        except Exception:
                            log.exception("periodic task failed")
                if now - last_prune >= PRUNE_INTERVAL_S:
                    last_prune = now
                    self.prune()
                self.write_status()
            except Exception:
                log.exception("housekeeping failed")
            stop.wait(period)

    def _publish_health(self) -> None:
        problems = self.check()
        self.problems = problems
        state = "degraded" if problems else "online"
        detail = "; ".join(problems.values()) if problems else None
        kinds = tuple(sorted(problems))
        t = self.transport()
        if kinds != self.published_problems and t is not None:  # one line per change
            self.published_problems = kinds
            self.published_status = (state, detail)
            t.set_status(self.status_message(state, detail))
            (log.warning if problems else log.info)("health: %s%s", state, f" ({detail})" if detail else "")

    def prune(self) -> None:
        """Leftovers in incoming/, processed files past watch.keep_processed_days, quarantine beyond its limits."""
        self.spool.clean_incoming()
        n = self.spool.prune_processed(self.cfg.watch.keep_processed_days)
        if n:
            log.info("pruned %d processed file(s) older than %g days", n, self.cfg.watch.keep_processed_days)
        w = self.cfg.watch
        n = self.spool.prune_quarantine(w.quarantine_keep_days, w.quarantine_max_mb)
        if n:
            log.info("pruned %d quarantined file(s) (older than %g days, or beyond %d MB)", n,
                     w.quarantine_keep_days, w.quarantine_max_mb)
