"""Fleet updates end to end (appliance/fleet/updater.py, state.py, transfer.py): a real mosquitto, real bundles,
the appliance side wired the way the daemon wires it (subscription → handle_message, publish → MQTT)."""
from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from appliance.cli import main as cli
from appliance.config import AnalysisConfig
from appliance.fleet import announce, transfer
from appliance.fleet.bundle_store import CRASH_ENV, BundleState, active_bundle_dir
from appliance.fleet.updater import Updater
from appliance.inference.bundle import find_bundles, load_bundle
from appliance.pipeline.analyzer import Analyzer

from .test_signing import bump, flip_byte, keys, make_variant, schema_validator, source_bundles  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "ct-room-7"
FINAL = {"installed", "refused", "failed", "rolled_back", "confirmed"}


class Watcher:
    """An MQTT client collecting every `ctriage/+/update` payload (what a fleet dashboard sees)."""

    def __init__(self, url: str) -> None:
        self.items: list[dict] = []
        self.cond = threading.Condition()
        self.client = announce.mqtt_client(url, client_id="watcher")
        self.client.on_message = self._on_message
        ok = threading.Event()
        self.client.on_subscribe = lambda *a: ok.set()
        self.client.subscribe("ctriage/+/update", qos=1)
        ok.wait(5)

    def _on_message(self, client, userdata, msg) -> None:
        with self.cond:
            self.items.append(json.loads(msg.payload))
            self.cond.notify_all()

    def wait(self, pred, timeout: float = 60.0) -> dict:
        deadline = time.time() + timeout
        with self.cond:
            while True:
                for p in self.items:
                    if pred(p):
                        return p
                left = deadline - time.time()
                if left <= 0:
                    got = [(p["step"], p["outcome"], p["reason"]) for p in self.items]
                    raise AssertionError(f"no matching update message; got {got}")
                self.cond.wait(left)

    def outcome(self, version: str, timeout: float = 60.0) -> dict:
        return self.wait(lambda p: p["outcome"] in FINAL and (p["bundle"] or {}).get("version") == version, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Appliance:
    """The daemon's part, exactly as it wires the updater: route the fleet topics in, publish its reports out."""

    def __init__(self, url: str, state: Path, shipped: Path, trust: list[Path], **kw) -> None:
        self.activated: list[Analyzer] = []
        self.client = announce.mqtt_client(url, client_id=f"ctriage-{DEVICE}")
        self.updater = Updater(state, trust, AnalysisConfig(), self.publish, lambda: None, device=DEVICE,
                               shipped_dir=shipped, **kw)
        self.updater.on_activated(self.activated.append)
        self.client.on_message = lambda c, u, m: self.updater.handle_message(m.topic, m.payload)
        ok = threading.Event()
        self.client.on_subscribe = lambda *a: ok.set()
        self.client.subscribe(self.updater.subscription, qos=1)
        ok.wait(5)

    def publish(self, topic: str, payload: dict, retain: bool) -> None:
        self.client.publish(topic, json.dumps(payload), qos=1, retain=retain)

    def close(self) -> None:
        self.updater.drain(30)
        self.updater.close()
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def env(tmp_path, mosquitto, source_bundles, keys):
    """A broker, an appliance with the shipped bundles, a watcher; helpers to make and publish bundles."""
    shipped = source_bundles["lesion"].parent
    state = tmp_path / "state"
    watcher = Watcher(mosquitto.url)
    apps: list[Appliance] = []

    class Env:
        pass

    e = Env()
    e.url, e.state, e.shipped, e.keys, e.watcher, e.tmp = mosquitto.url, state, shipped, keys, watcher, tmp_path
    e.base = load_bundle(source_bundles["lesion"], verify=False).version
    e.validator = schema_validator("update")

    def start(**kw) -> Appliance:
        a = Appliance(mosquitto.url, state, shipped, [keys["fleet_pub"]], groups=("pilot",), **kw)
        apps.append(a)
        return a

    def variant(version: str, key: str = "fleet", mutate=None, name: str = "lesion", label: str = "", **fields) -> Path:
        return make_variant(source_bundles[name], tmp_path / "variants" / f"{name}-{version}{label}", version,
                            keys[key], mutate, **fields)

    def publish(bundle: Path, *extra: str, key: str = "fleet") -> None:
        assert cli(["models", "publish", str(bundle), "--mqtt-url", mosquitto.url, "--key", str(keys[key]),
                    "--chunk-kb", "16", *extra]) == 0

    def lesion_version() -> str:
        d = active_bundle_dir(state) or shipped
        return find_bundles(d)["lesion"].version

    e.start, e.variant, e.publish, e.lesion_version = start, variant, publish, lesion_version
    yield e
    for a in apps:
        a.close()
    watcher.close()


def test_good_update_over_mqtt_is_installed_confirmed_and_recorded(env, capsys):
    app = env.start()
    new = env.variant(bump(env.base, major=1))
    env.publish(new, "--groups", "pilot")
    msg = env.watcher.outcome(bump(env.base, major=1))
    assert msg["outcome"] == "installed", msg
    env.validator.validate(msg)
    assert msg["previous"]["version"] == env.base and msg["detail"]["selftest"]["mask_agreement"] >= 0.99
    assert env.lesion_version() == bump(env.base, major=1)
    st = BundleState(env.state)
    assert st.target("active", "lesion").name == f"lesion-{bump(env.base, major=1)}"
    assert st.target("previous", "lesion") is not None  # the shipped copy, kept for rollback
    assert os.readlink(st.active / "lesion") == f"../store/lesion-{bump(env.base, major=1)}"
    app.updater.drain()
    [analyzer] = app.activated
    assert {b["name"]: b["version"] for b in analyzer.bundles}["lesion"] == bump(env.base, major=1)
    # the analyzer the daemon gets, and the one a restart loads, both work
    Analyzer.load(AnalysisConfig(), active_bundle_dir(env.state))
    steps = [(h["step"], h["outcome"]) for h in st.history()]
    assert steps[:2] == [("transfer", "progress"), ("selftest", "progress")] and steps[-1] == ("activate", "installed")
    for h in st.history():
        env.validator.validate(h)
    for _ in range(3):
        app.updater.report_first_analysis(True)
    msg = env.watcher.wait(lambda p: p["outcome"] == "confirmed")
    env.validator.validate(msg)
    assert st.pending() is None
    assert not any(st.staging.iterdir())


def _reencode(ann: dict, archive: bytes, chunk: int = 16 * 1024) -> list[bytes]:
    """What a man in the middle can do: ship other bytes with matching (unsigned) transfer hashes."""
    chunks = transfer.split(archive, chunk)
    ann["archive"] = {"format": "tar", "size": len(archive), "sha256": hashlib.sha256(archive).hexdigest()}
    ann["inline"]["chunks"] = [{"size": len(c), "sha256": hashlib.sha256(c).hexdigest()} for c in chunks]
    return chunks


def _send(env, ann: dict, chunks: list[bytes]) -> None:
    c = announce.mqtt_client(env.url)
    try:
        announce.publish_announcement(c, ann, chunks)
    finally:
        c.disconnect()
        c.loop_stop()


def _tampered(env, v):
    good = env.variant(v)
    ann, _, _ = announce.build(good, _key(env), chunk_size=16 * 1024)
    flip_byte(good / "model.int8.onnx")
    return ann, _reencode(ann, transfer.pack(good))


def _bad_signature(env, v):
    good = env.variant(v)
    ann, _, _ = announce.build(good, _key(env), chunk_size=16 * 1024)
    m = json.loads((good / "manifest.json").read_text())
    m["output"]["threshold"] = 0.01  # a different model behaviour under the old signature
    (good / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")
    ann["manifest"] = base64.b64encode((good / "manifest.json").read_bytes()).decode()
    ann["sha256"] = hashlib.sha256((good / "manifest.json").read_bytes()).hexdigest()
    return ann, _reencode(ann, transfer.pack(good))


def _unknown_key(env, v):
    other = env.variant(v, key="other")
    ann, _, chunks = announce.build(other, _key(env, "other"), chunk_size=16 * 1024)
    return ann, chunks


def _failing_selftest(env, v):
    def mutate(d: Path) -> None:
        st = dict(np.load(d / "selftest.npz"))
        for k in st:
            if k.startswith("expected"):
                st[k] = 1.0 - st[k]
        np.savez_compressed(d / "selftest.npz", **st)

    ann, _, chunks = announce.build(env.variant(v, mutate=mutate), _key(env), chunk_size=16 * 1024)
    return ann, chunks


def _truncated(env, v):
    ann, _, chunks = announce.build(env.variant(v), _key(env), chunk_size=16 * 1024)
    assert len(chunks) >= 2
    chunks[1] = chunks[1][: len(chunks[1]) // 2]
    return ann, chunks


def _key(env, which: str = "fleet"):
    from appliance.fleet.signing import load_private_key

    return load_private_key(env.keys[which])


@pytest.mark.parametrize("make, step, outcome, reason", [
    (_tampered, "verify", "refused", "file model.int8.onnx sha256 mismatch"),
    (_bad_signature, "verify", "refused", "signature does not verify with any trusted key"),
    (_unknown_key, "verify", "refused", "signature does not verify with any trusted key"),
    (_failing_selftest, "selftest", "failed", "self-test failed"),
    (_truncated, "transfer", "failed", "chunk 1 has"),
], ids=["tampered-file", "bad-signature", "unknown-key", "failing-selftest", "truncated-chunk"])
def test_bad_bundles_are_refused_and_the_old_model_stays(env, make, step, outcome, reason):
    app = env.start()
    v = bump(env.base, major=1)
    ann, chunks = make(env, v)
    _send(env, ann, chunks)
    msg = env.watcher.outcome(v)
    env.validator.validate(msg)
    assert (msg["step"], msg["outcome"]) == (step, outcome), msg
    assert reason in msg["reason"]
    assert msg["previous"]["version"] == env.base
    assert env.lesion_version() == env.base
    app.updater.drain()
    assert app.activated == []
    st = BundleState(env.state)
    assert st.history()[-1]["reason"] == msg["reason"]
    assert not any(p.name.startswith("lesion-" + v) for p in st.store.iterdir())
    assert not any(st.staging.iterdir())
    if step == "selftest":  # never retried automatically, even when announced again
        assert ann["sha256"] in st.blocked()
        ann["created"] = "2030-01-01T00:00:00Z"
        app.updater.handle_message(f"ctriage/fleet/bundle/{ann['name']}", json.dumps(ann).encode())
        assert "was blocked" in st.history()[-1]["reason"]


def test_downgrade_and_replay_are_refused(env):
    app = env.start()
    v1, v2 = bump(env.base, major=1), bump(env.base, major=2)
    assert app.updater.install_path(env.variant(v2)).outcome == "installed"
    env.publish(env.variant(v1))
    msg = env.watcher.outcome(v1)
    env.validator.validate(msg)
    assert msg["outcome"] == "refused" and "downgrade refused" in msg["reason"] and msg["previous"]["version"] == v2
    # same version, other bytes (a replayed or re-made release): refused
    env.publish(env.variant(v2, label="-again", notes="rebuilt"))
    msg = env.watcher.wait(lambda p: p["outcome"] == "refused" and "replay refused" in (p["reason"] or ""))
    env.validator.validate(msg)
    assert env.lesion_version() == v2
    # the exact announcement of the active bundle (retained, redelivered at every reconnect): nothing happens
    ann, _, _ = announce.build(env.tmp / "variants" / f"lesion-{v2}", _key(env))
    n = len(BundleState(env.state).history())
    app.updater.handle_message("ctriage/fleet/bundle/lesion", json.dumps(ann).encode())
    app.updater.drain()
    assert len(BundleState(env.state).history()) == n
    assert BundleState(env.state).target("active", "lesion").name == f"lesion-{v2}"


def test_signed_rollback_order(env):
    app = env.start()
    v1, v2 = bump(env.base, major=1), bump(env.base, major=2)
    assert app.updater.install_path(env.variant(v2)).outcome == "installed"
    env.publish(env.variant(v1, rollback={"from": ["0.0.0"]}, label="-wrong"))
    msg = env.watcher.outcome(v1)
    assert msg["outcome"] == "refused" and f"the active version is {v2}" in msg["reason"]
    env.publish(env.variant(v1, rollback={"from": [v2]}))
    msg = env.watcher.wait(lambda p: p["outcome"] == "installed" and p["bundle"]["version"] == v1)
    env.validator.validate(msg)
    assert env.lesion_version() == v1


def test_first_analysis_failure_rolls_back(env):
    app = env.start()
    v1 = bump(env.base, major=1)
    env.publish(env.variant(v1))
    assert env.watcher.outcome(v1)["outcome"] == "installed"
    app.updater.report_first_analysis(True)
    app.updater.report_first_analysis(False, "model output has NaN")
    msg = env.watcher.wait(lambda p: p["outcome"] == "rolled_back")
    env.validator.validate(msg)
    assert msg["bundle"]["version"] == env.base and msg["previous"]["version"] == v1
    assert "NaN" in msg["reason"]
    assert env.lesion_version() == env.base
    app.updater.drain()
    assert [{b["name"]: b["version"] for b in a.bundles}["lesion"] for a in app.activated] == [v1, env.base]
    assert BundleState(env.state).blocked()  # v1 is not taken again from its retained announcement


def test_transfer_over_http_url(env):
    app = env.start()
    v1 = bump(env.base, major=1)
    www = env.tmp / "www"
    www.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(www))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/lesion.tar"
        env.publish(env.variant(v1), "--no-inline", "--url", url, "--archive-out", str(www / "lesion.tar"))
        msg = env.watcher.outcome(v1)
        assert msg["outcome"] == "installed", msg
    finally:
        srv.shutdown()
    assert env.lesion_version() == v1
    assert app.updater.state.history()[0]["detail"]["via"] == "url"


def test_missing_chunk_times_out_and_not_targeted_is_ignored(env):
    app = env.start(transfer_timeout_s=1.0)
    v1 = bump(env.base, major=1)
    bundle = env.variant(v1)
    # for another device: ignored without a word
    ann, _, chunks = announce.build(bundle, _key(env), devices=["ct-room-1"], chunk_size=16 * 1024)
    app.updater.handle_message("ctriage/fleet/bundle/lesion", json.dumps(ann).encode())
    assert app.updater.state.history() == []
    ann, _, chunks = announce.build(bundle, _key(env), chunk_size=16 * 1024)
    _send(env, ann, chunks[:-1])
    msg = env.watcher.outcome(v1, timeout=30)
    env.validator.validate(msg)
    assert msg["outcome"] == "failed" and "transfer incomplete: 1 of" in msg["reason"]
    assert env.lesion_version() == env.base


CRASH_STEPS = ["staged", "stored", "selftested", "seeded", "previous", "link_tmp", "switched", "activated"]


@pytest.mark.parametrize("step", CRASH_STEPS)
def test_power_cut_at_each_step_leaves_a_working_model(tmp_path, source_bundles, keys, step):
    shipped = source_bundles["lesion"].parent
    base = load_bundle(source_bundles["lesion"], verify=False).version
    v1 = bump(base, major=1)
    bundle = make_variant(source_bundles["lesion"], tmp_path / "lesion", v1, keys["fleet"])
    state = tmp_path / "state"
    cmd = [sys.executable, "-m", "appliance.cli", "models", "install", str(bundle), "--trust", str(keys["fleet_pub"]),
           "--state-dir", str(state), "--shipped", str(shipped)]
    r = subprocess.run(cmd, env={**os.environ, CRASH_ENV: step}, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 75, r.stderr  # cut at that step
    up = Updater(state, [keys["fleet_pub"]], shipped_dir=shipped)  # the next start
    active = active_bundle_dir(state)
    analyzer = Analyzer.load(AnalysisConfig(), active or shipped)
    got = {b["name"]: b["version"] for b in analyzer.bundles}["lesion"]
    assert got in (base, v1)
    if step in ("switched", "activated"):
        assert got == v1
    if active is not None:
        for name, t in up.state.links("active").items():
            assert t is not None and load_bundle(t, verify=True).name == name
    assert not any(up.state.staging.iterdir())
    # and the update goes through on the next try
    res = up.install_path(bundle)
    assert res.outcome in ("installed", "unchanged"), res
    assert find_bundles(active_bundle_dir(state))["lesion"].version == v1


def test_startup_repairs_a_corrupted_active_bundle(env):
    app = env.start()
    v1 = bump(env.base, major=1)
    assert app.updater.install_path(env.variant(v1)).outcome == "installed"
    app.close()
    st = BundleState(env.state)
    flip_byte(st.target("active", "lesion") / "model.onnx")  # disk damage
    app2 = env.start()
    msg = env.watcher.wait(lambda p: p["outcome"] == "repaired")
    env.validator.validate(msg)
    assert "back to previous" in msg["reason"]
    assert env.lesion_version() == env.base
    Analyzer.load(AnalysisConfig(), active_bundle_dir(env.state))
    app2.close()
    # a dangling link (store dir gone) falls back to the shipped bundle
    import shutil

    shutil.rmtree(st.target("active", "lesion"))
    env.start()
    msg = env.watcher.wait(lambda p: p["outcome"] == "repaired" and "shipped" in p["reason"])
    assert env.lesion_version() == env.base
    Analyzer.load(AnalysisConfig(), active_bundle_dir(env.state))


def test_daemon_wiring_swaps_the_analyzer_between_studies(tmp_path, mosquitto, source_bundles, keys, phantom_dir):
    """The real daemon: Updater.from_config(cfg, daemon.publish, daemon.idle_gate) + daemon.attach_updater(updater)."""
    from appliance.config import Config
    from appliance.daemon import Daemon

    shipped = source_bundles["lesion"].parent
    base = load_bundle(source_bundles["lesion"], verify=False).version
    v1 = bump(base, major=1)
    cfg = Config(device_id=DEVICE, state_dir=str(tmp_path / "state"))
    cfg.mqtt.url = mosquitto.url
    cfg.series.quiet_seconds = 0.5
    watcher = Watcher(mosquitto.url)
    d = Daemon(cfg, analyzer=Analyzer.load(AnalysisConfig(), shipped))
    up = Updater.from_config(cfg, d.publish, d.idle_gate, extra_trust=[keys["fleet_pub"]], shipped_dir=shipped)
    d.attach_updater(up)
    d.start()
    try:
        bundle = make_variant(source_bundles["lesion"], tmp_path / "lesion", v1, keys["fleet"])
        assert cli(["models", "publish", str(bundle), "--mqtt-url", mosquitto.url, "--key", str(keys["fleet"])]) == 0
        msg = watcher.outcome(v1)
        assert msg["outcome"] == "installed", msg
        assert {b["name"]: b["version"] for b in d.analyzer.bundles}["lesion"] == v1
        for f in sorted(phantom_dir.iterdir()):  # a study: its analyses confirm the new model
            d.spool.accept(f, keep_source=True)
        msg = watcher.wait(lambda p: p["outcome"] == "confirmed", timeout=120)
        schema_validator("update").validate(msg)
    finally:
        d.stop()
        up.close()
        watcher.close()
