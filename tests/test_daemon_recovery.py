"""The daemon where a clinic meets it in the field, against a real mosquitto: killed or stopped mid-series and
restarted after longer than the quiet time while slices keep arriving (exactly one final, and the right one), a
late series that changes a final result (published once, as a correction), and a broker outage of 30 s (the final
verdict arrives within seconds of the broker's return, one log line when degraded and one when recovered).
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

import pytest

from appliance.daemon import Daemon

from .test_daemon import (_run_daemon, bundles, check_messages, drop, make_cfg, rule_analyzer,  # noqa: F401
                          study, validator, verdicts, wait)
from .test_mqtt import Collector

QUIET = 2.0  # _run_daemon's --quiet-seconds


def _status(state: Path) -> dict:
    from appliance.commands.status import collect

    return collect(state)


def _drip(files: list[Path], folder: Path, pause: float, stop: threading.Event) -> threading.Thread:
    """Export slices one by one in the background, the way a console does during a long export."""
    def run() -> None:
        for p in files:
            if stop.is_set():
                return
            drop([p], folder)
            time.sleep(pause)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_restart_longer_than_the_quiet_time_while_slices_keep_arriving(tmp_path, mosquitto, bundles, study, how):
    sub = Collector(mosquitto.url, ["ctriage/#"])
    state, watch = tmp_path / "state", tmp_path / "watch"
    logf = (tmp_path / "daemon.log").open("wb")
    stop = threading.Event()
    pos = study["pos"]
    proc = _run_daemon(tmp_path, mosquitto.url, bundles, logf)
    try:
        wait(lambda: _status(state)["running"], 60, "the daemon to start")
        drop(pos[:10], watch, pause=0.05)
        wait(lambda: _status(state).get("counts", {}).get("analysed", 0) >= 10, 60, "10 slices analysed")
        proc.send_signal(how)
        proc.wait(30)
        # down for longer than the quiet time, and the console goes on exporting meanwhile
        _drip(pos[10:16], watch, 0.4, stop).join()
        time.sleep(QUIET + 5 - 6 * 0.4)
        drip = _drip(pos[16:], watch, 0.3, stop)  # ... and still does while the appliance comes back
        proc = _run_daemon(tmp_path, mosquitto.url, bundles, logf)
        drip.join(30)
        sub.wait_for(lambda m: "/verdict/" in m[0] and b'"final"' in m[1], timeout=60)
        time.sleep(QUIET + 2)  # nothing more may come: no second final, no correction, no provisional after it
        info = _status(state)
        assert info["counts"]["analysed"] == 24 and info["counts"]["rejected"] == 0, "no slice lost"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
        logf.close()
    out = verdicts(sub)
    finals = [v for v in out if v["state"] in ("final", "corrected")]
    assert len(finals) == 1, [(v["state"], v["result"], v["counts"]["slices"]) for v in out]
    (final,) = finals
    assert final["state"] == "final" and final["result"] == "positive" and final["counts"]["slices"] == 24
    assert out[-1] is final, "nothing published after the final"
    assert all(v["result"] == "positive" for v in out), "never a wrong negative on the way"
    check_messages(sub.messages, study["phi"])
    sub.close()


def test_a_late_series_that_changes_the_final_result_is_one_correction(tmp_path, mosquitto, rule_analyzer, study):
    sub = Collector(mosquitto.url, ["ctriage/#"])
    cfg = make_cfg(tmp_path, mosquitto.url, Path(rule_analyzer.lesion.bundle.path).parent)
    d = Daemon(cfg, analyzer=rule_analyzer)
    d.start()
    watch = Path(cfg.watch.dir)
    try:
        drop(study["neg"], watch)
        neg = json.loads(sub.wait_for(lambda m: "/verdict/" in m[0] and b'"final"' in m[1])[1])
        assert neg["result"] == "negative"
        # the lung-kernel series of the same study comes later than the quiet time: it shows the lesions
        drop(study["pos"], watch, pause=0.02)
        fixed = json.loads(sub.wait_for(lambda m: "/verdict/" in m[0] and b'"corrected"' in m[1], timeout=60)[1])
        overlay = json.loads(sub.wait_for(lambda m: "/overlay/" in m[0] and b'"corrected"' in m[1])[1])
        # the same series again: duplicates, and a third series that agrees: nothing more is published
        drop(study["pos"][:5], watch)
        wait(lambda: d.store.counts()["duplicate"] == 5, what="5 duplicates")
        time.sleep(cfg.series.quiet_seconds + 1)
        assert d.wait_idle(30)
    finally:
        d.stop()
    assert fixed["result"] == "positive" and fixed["study_key"] == neg["study_key"]
    c = fixed["correction"]
    assert c["previous_result"] == "negative" and c["previous_state"] == "final"
    assert c["previous_created"] == neg["created"] and "negative to positive" in c["what"]
    assert fixed["complete_reason"] and sorted(s["result"] for s in fixed["series"]) == ["negative", "positive"]
    assert overlay["study_key"] == neg["study_key"]
    states = [(v["state"], v["result"]) for v in verdicts(sub)]
    assert states == [("final", "negative"), ("corrected", "positive")], states
    validator("verdict").validate(fixed)
    check_messages(sub.messages, study["phi"])
    sub.close()


@pytest.mark.slow
def test_final_verdict_within_seconds_of_the_broker_return_after_a_30s_outage(tmp_path, mosquitto, rule_analyzer,
                                                                             study, caplog, monkeypatch):
    monkeypatch.setattr("appliance.daemon.BROKER_GRACE_S", 5.0)  # degraded well within the outage
    cfg = make_cfg(tmp_path, mosquitto.url, Path(rule_analyzer.lesion.bundle.path).parent)
    from appliance.config import MQTTConfig

    defaults = MQTTConfig()
    cfg.mqtt.reconnect_min_seconds = defaults.reconnect_min_seconds  # the shipped backoff, not the tests' fast one
    cfg.mqtt.reconnect_max_seconds = defaults.reconnect_max_seconds
    caplog.set_level(logging.INFO, logger="ctriage")
    d = Daemon(cfg, analyzer=rule_analyzer)
    d.start()
    try:
        wait(lambda: d.transport.connected, 20, "the first connection")
        mosquitto.stop()
        down = time.monotonic()
        drop(study["pos"], Path(cfg.watch.dir))
        wait(lambda: any(v["state"] == "final" for v in d.store.verdicts()), 60, "the final verdict (stored)")
        time.sleep(max(0.0, 30 - (time.monotonic() - down)))
        mosquitto.start()
        back = time.monotonic()
        sub = Collector(mosquitto.url, ["ctriage/ct-test/verdict/#"])
        m = sub.wait_for(lambda m: b'"final"' in m[1], timeout=30)
        took = time.monotonic() - back
        sub.close()
        assert json.loads(m[1])["result"] == "positive"
        assert took <= 10, f"the verdict came {took:.1f} s after the broker's return"
        wait(lambda: not d._problems, 20, "health back to ok")
        time.sleep(2.5)  # a few more housekeeping rounds
    finally:
        d.stop()
    health = [r.getMessage() for r in caplog.records if r.getMessage().startswith("health:")]
    degraded = [h for h in health if "broker unreachable" in h]
    assert len(degraded) == 1, health
    assert health[-1] == "health: online", health
