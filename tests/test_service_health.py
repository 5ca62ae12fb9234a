"""Health without a broker: the problems that make the appliance degraded, the status and stats payloads, the status
file, and a housekeeping round (status message once per change, periodic tasks)."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from appliance.config import Config
from appliance.domain import SliceFinding
from appliance.ingest.spool import Spool
from appliance.pipeline.case_logic import CaseRule
from appliance.pipeline.tracker import SeriesTracker
from appliance.publish import messages as msg
from appliance.service.health import STATUS_FILE, Health, read_status
from appliance.service.key_image import SourceImages
from appliance.service.pacs_handover import PacsHandover
from appliance.service.stats import Stats
from appliance.store import Store

ANALYZER = SimpleNamespace(bundles=[{"name": "lesion", "version": "0.0.1"}], backend="onnxruntime", device="CPU",
                           precision="int8")


class FakeTransport:
    def __init__(self, connected: bool = True) -> None:
        self.connected = connected
        self.statuses: list[bytes] = []
        self.sent: list[tuple[str, bytes]] = []

    def set_status(self, payload: bytes) -> None:
        self.statuses.append(payload)

    def send(self, topic: str, payload: bytes, **kw) -> None:
        self.sent.append((topic, payload))

    def health(self) -> dict:
        return {"transport": "fake", "connected": self.connected}


@pytest.fixture
def setup(tmp_path):
    cfg = Config(device_id="ct-test", state_dir=str(tmp_path / "state"))
    cfg.state_path.mkdir(parents=True)
    cfg.watch.min_free_mb = 0
    store = Store(cfg.state_path / "ctriage.db")
    spool = Spool(cfg.state_path, 0)
    tracker = SeriesTracker(CaseRule.from_config(cfg.analysis), quiet_seconds=5, max_open=4)
    stats = Stats()
    pacs = PacsHandover(cfg, store, SourceImages(cfg, store, spool))
    transport = FakeTransport()
    env = SimpleNamespace(grace=30.0, transport=transport, deferred=0)
    h = Health(cfg, cfg.state_path, b"k" * 32, store, spool, tracker, msg.Topics(cfg.mqtt.prefix, cfg.device_id),
               stats, pacs, analyzer=lambda: ANALYZER, transport=lambda: env.transport,
               deferred=lambda: env.deferred, grace=lambda: env.grace)
    yield SimpleNamespace(cfg=cfg, store=store, spool=spool, stats=stats, health=h, env=env, transport=transport)
    store.close()


def test_no_problems_when_all_is_well(setup):
    assert setup.health.check() == {}


def test_broker_grace_is_read_at_every_check(setup):
    h, env = setup.health, setup.env
    env.transport.connected = False
    assert h.check() == {}  # disconnected just now
    h.disconnected_since = time.time() - 10
    assert h.check() == {}  # within the grace
    env.grace = 5.0
    assert h.check()["broker"].startswith("broker unreachable since ")
    env.transport.connected = True
    assert h.check() == {} and h.disconnected_since is None


def test_disk_dicom_and_analysis_problems(setup):
    h, stats = setup.health, setup.stats
    setup.cfg.watch.min_free_mb = 10**9
    h.spool.min_free_mb = 10**9
    h.dicom_error = "port 104 taken"
    stats.analysis_error = (time.time(), "analysis failed: RuntimeError: boom")
    problems = h.check()
    assert set(problems) == {"disk", "dicom", "analysis"}
    assert problems["dicom"] == "DICOM node not running: port 104 taken"
    stats.analysis_error = (time.time() - 301, "analysis failed: old")
    assert "analysis" not in h.check()


def test_status_payload_status_file_and_stats(setup):
    h, stats = setup.health, setup.stats
    h.state, h.started = "running", time.time() - 5
    stats.analysed(time.time(), 3, [SliceFinding("a", 0.0, (8, 8), None, timings_ms={"lesion": 4.0}), None])
    setup.env.deferred = 2
    s = h.status()
    assert (s["state"], s["health"], s["queue"], s["deferred"], s["slices_total"]) == ("running", "ok", 0, 2, 3)
    assert s["analyzer"]["precision"] == "int8" and s["broker"] == {"transport": "fake", "connected": True}
    assert s["stage_ms"] == {"lesion": 4.0} and s["pacs"] is None and s["dicom"] is None
    h.write_status()
    assert read_status(setup.cfg.state_path)["state"] == "running"
    assert [p.name for p in setup.cfg.state_path.iterdir() if STATUS_FILE in p.name] == [STATUS_FILE]  # no temp
    p = h.stats_payload()
    assert p["slices_total"] == 3 and p["open_series"] == 0 and p["outbox"] == 0


def test_a_housekeeping_round_announces_changes_once_and_runs_periodic_tasks(setup):
    h, t = setup.health, setup.transport
    setup.cfg.mqtt.stats_interval_seconds = 0.1
    h.dicom_error = "port 104 taken"
    ran: list[float] = []
    h.periodic.append([lambda: ran.append(1), 0.0, 0.0])
    stop = threading.Event()
    th = threading.Thread(target=h.run, args=(stop,), daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 10
        while len(ran) < 3 or len(t.sent) < 2:
            assert time.monotonic() < deadline, "housekeeping rounds"
            time.sleep(0.05)
        h.dicom_error = None
        while b'"online"' not in (t.statuses[-1] if t.statuses else b""):
            assert time.monotonic() < deadline, "back to online"
            time.sleep(0.05)
    finally:
        stop.set()
        th.join(5)
    assert len(t.statuses) == 2 and b'"degraded"' in t.statuses[0]  # one per change, not one per round
    assert h.problems == {} and h.published_status == ("online", None)
    assert all(topic == "ctriage/ct-test/stats" for topic, _ in t.sent)
    assert read_status(setup.cfg.state_path)["health"] == "ok"


def test_reannounce_repeats_the_last_status(setup):
    h, t = setup.health, setup.transport
    h.announce("online", None)
    h.published_status = ("degraded", "disk full")
    h.reannounce()
    assert b'"degraded"' in t.statuses[-1] and b"disk full" in t.statuses[-1]


def test_status_says_which_series_wait_because_they_look_incomplete(setup):
    from appliance.commands.status import _render
    from appliance.domain import Rect
    from appliance.pipeline.tracker import Arrival

    h = setup.health
    h.tracker = SeriesTracker(CaseRule.from_config(setup.cfg.analysis), quiet_seconds=5, max_open=4,
                              partial_quiet_seconds=60)
    t0 = time.time() - 10  # quiet for 10 s: past the quiet time, within the longer one
    lung = Rect(10, 10, 90, 90)
    cut = [SliceFinding(f"c{k}", -2.0 * k, (100, 100), lung if k >= 3 else None) for k in range(12)]  # lung to the end
    whole = [SliceFinding(f"w{k}", -2.0 * k, (100, 100), lung if 3 <= k < 9 else None) for k in range(12)]
    h.tracker.add([Arrival("cut", "S1", (float(k), 0, f.key), f, f.key, arrived=t0) for k, f in enumerate(cut)]
                  + [Arrival("whole", "S2", (float(k), 0, f.key), f, "w" + f.key, arrived=t0 + 9)  # not quiet yet
                     for k, f in enumerate(whole)], now=t0)
    assert h.tracker.tick(time.time(), idle_since=t0) == []  # the worker's round: "cut" is judged and held
    assert [s["looks_incomplete"] for s in h.status()["open_series"]] == [
        "the lung goes on below the last slice received", None]
    text = _render({"running": False, "heartbeat_age_s": None, "daemon_state": "stopped", "state_dir": "/s",
                    "queue": 0, "open_series": h.status()["open_series"]})
    assert text.count("looks incomplete (the lung goes on below the last slice received): waiting") == 1
