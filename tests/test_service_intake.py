"""The intake without a broker: a real spool and store, real inference on the rule bundles (tests/test_daemon.py),
updates collected from the tracker. Duplicates, quarantine, a failing analysis, deferral while a model swap waits,
completion hints, and the series in flight rebuilt from the store after a restart."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest

from appliance.config import Config
from appliance.ingest.spool import Spool
from appliance.pipeline.case_logic import CaseRule
from appliance.pipeline.tracker import SeriesTracker
from appliance.service.intake import Intake
from appliance.service.stats import Stats
from appliance.store import Store

from .test_daemon import bundles, rule_analyzer, study  # noqa: F401 - fixtures


def make(state: Path, analyzer, quiet: float = 60.0, store: Store | None = None) -> SimpleNamespace:
    cfg = Config(device_id="ct-test", state_dir=str(state))
    cfg.state_path.mkdir(parents=True, exist_ok=True)
    store = store or Store(cfg.state_path / "ctriage.db")
    spool = Spool(cfg.state_path, 0)
    tracker = SeriesTracker(CaseRule.from_config(cfg.analysis), quiet_seconds=quiet,
                            max_open=cfg.series.max_open_series)
    updates: list = []
    stats = Stats()
    intake = Intake(cfg, store, spool, tracker, b"k" * 32, stats, lambda: analyzer,
                    lambda u, now: updates.append(u))
    heard: list[tuple[bool, str]] = []
    intake.listeners.append(lambda ok, reason: heard.append((ok, reason)))
    return SimpleNamespace(cfg=cfg, store=store, spool=spool, tracker=tracker, intake=intake, updates=updates,
                           stats=stats, heard=heard)


def run_until(x: SimpleNamespace, pred, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        if not x.intake.step():
            time.sleep(0.05)


def uid(path: Path, tag: str = "SeriesInstanceUID") -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True)[tag].value)


@pytest.fixture
def parts(tmp_path, rule_analyzer):  # noqa: F811
    x = make(tmp_path / "state", rule_analyzer, quiet=0.3)
    yield x
    x.intake.close()
    x.store.close()


def test_spooled_slices_are_analysed_stored_and_the_series_completes(parts, study):  # noqa: F811
    x, pos = parts, study["pos"]
    for p in pos:
        x.spool.accept(p.read_bytes())
    x.spool.accept(pos[5].read_bytes())  # the same instance again
    x.spool.accept(b"not a DICOM file\n" * 100)
    run_until(x, lambda: any(u.kind == "final" for u in x.updates), what="the final update")
    assert x.spool.pending() == []
    counts = x.store.counts()
    assert (counts["analysed"], counts["duplicate"], counts["rejected"]) == (24, 1, 1)
    final = x.updates[-1]
    assert final.series_uid == study["series"]["pos"] and final.verdict.result == "positive"
    assert any(u.kind == "provisional" and u.verdict.result == "positive" for u in x.updates[:-1])
    assert x.stats.slices_total == 24 and x.heard and all(ok for ok, _ in x.heard)
    assert len(x.store.series_slices(study["series"]["pos"])) == 24
    quarantined = [p for p in x.spool.quarantine_dir.iterdir() if not p.name.endswith((".reason", ".tmp"))]
    assert len(quarantined) == 1
    assert not x.tracker.in_flight and not x.intake.busy()


def test_a_failing_analysis_quarantines_that_slice_only(tmp_path, rule_analyzer, study):  # noqa: F811
    bad = uid(study["pos"][1], "SOPInstanceUID")

    class Flaky:
        config, workers = rule_analyzer.config, rule_analyzer.workers

        def findings(self, images):
            if any(s.sop_uid == bad for s in images):
                raise RuntimeError("boom")
            return rule_analyzer.findings(images)

    x = make(tmp_path / "state", Flaky())
    try:
        for p in study["pos"][:4]:
            x.spool.accept(p.read_bytes())
        run_until(x, lambda: not x.spool.pending(), what="the spool to empty")
        counts = x.store.counts()
        assert (counts["analysed"], counts["rejected"]) == (3, 1)
        assert x.stats.analysis_error[1] == "analysis failed: RuntimeError: boom"
        assert x.heard == [(False, "analysis failed: RuntimeError: boom")]
        (reason,) = [p for p in x.spool.quarantine_dir.iterdir() if p.name.endswith(".reason")]
        assert "analysis failed: RuntimeError: boom" in reason.read_text()
    finally:
        x.intake.close()
        x.store.close()


def test_new_series_wait_while_held_and_a_hint_completes_the_open_one(tmp_path, rule_analyzer, study):  # noqa: F811
    x = make(tmp_path / "state", rule_analyzer, quiet=60.0)
    pos, neg, pos_uid = study["pos"], study["neg"], study["series"]["pos"]
    try:
        for p in pos[:6]:
            x.spool.accept(p.read_bytes())
        run_until(x, lambda: not x.spool.pending(), what="the first slices")
        assert x.tracker.open[pos_uid].count == 6
        x.intake.hold()  # a model swap waits for the series in flight
        for p in neg[:4] + pos[6:10]:
            x.spool.accept(p.read_bytes())
        run_until(x, lambda: x.tracker.open[pos_uid].count == 10, what="the series in flight to go on")
        assert len(x.intake.deferred) == 4 and len(x.spool.pending()) == 4 and not x.intake.paused.is_set()
        x.intake.hint(pos_uid, "sender: end marker")
        run_until(x, lambda: not x.tracker.in_flight, what="the hint to complete the series")
        assert (x.updates[-1].kind, x.updates[-1].complete_reason) == ("final", "sender: end marker")
        assert x.intake.step() is False and x.intake.paused.is_set()  # idle: the swap may happen now
        assert len(x.spool.pending()) == 4 and x.intake.busy()
        x.intake.release()
        assert not x.intake.paused.is_set()
        run_until(x, lambda: not x.spool.pending(), what="the deferred slices")
        assert not x.intake.deferred and x.tracker.open[study["series"]["neg"]].count == 4
    finally:
        x.intake.close()
        x.store.close()


def test_open_series_are_rebuilt_from_the_store_after_a_restart(tmp_path, rule_analyzer, study):  # noqa: F811
    pos, pos_uid = study["pos"], study["series"]["pos"]
    a = make(tmp_path / "state", rule_analyzer)
    for p in pos[:8]:
        a.spool.accept(p.read_bytes())
    run_until(a, lambda: not a.spool.pending(), what="8 slices")
    a.intake.close()
    # a file analysed and recorded just before the crash, but not moved out of the spool yet
    left = a.spool.accept(pos[8].read_bytes())
    dest = a.spool.processed_path(left.name)
    a.store.add_file(left.name, "analysed", ident="sop-before-crash", series_uid=pos_uid, path=str(dest))
    before = time.time()

    b = make(tmp_path / "state", rule_analyzer, store=a.store)
    try:
        assert b.intake.recover() == 1
        ts = b.tracker.open[pos_uid]
        assert ts.count == 8 and ts.last_seen >= before  # the quiet time counts from the restart
        for p in pos[9:]:
            b.spool.accept(p.read_bytes())
        run_until(b, lambda: not b.spool.pending(), what="the rest of the series")
        assert dest.is_file() and b.tracker.open[pos_uid].count == 23  # the recorded file moved, not re-analysed
        assert b.store.counts()["analysed"] == 24 and b.store.counts()["duplicate"] == 0
    finally:
        b.intake.close()
        a.store.close()


def test_the_dicom_nodes_spool_sink_feeds_the_intake(tmp_path, rule_analyzer, study):  # noqa: F811
    from appliance.ingest.dicom_scp import SpoolSink

    x, pos = make(tmp_path / "state", rule_analyzer, quiet=60.0), study["pos"]
    try:
        sink = SpoolSink(x.spool, x.intake.hint)
        for p in pos[:3]:
            sink.accept(p.read_bytes(), uid(p, "SOPInstanceUID"), study["series"]["pos"])
        sink.association_released({study["series"]["pos"]})
        run_until(x, lambda: any(u.kind == "final" for u in x.updates), what="the final after the release")
        assert x.updates[-1].complete_reason == "sender: association released"
        assert x.store.counts()["analysed"] == 3
    finally:
        x.intake.close()
        x.store.close()
