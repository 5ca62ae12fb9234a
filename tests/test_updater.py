"""Fleet updates end to end (appliance/fleet/updater.py, install.py, confirm.py, bundle_store.py, transfer.py): a
real mosquitto, real bundles, releases named by TUF metadata the test's own fleet signed, the appliance side wired
the way the daemon wires it (subscription → handle_message, publish → MQTT). Attacks on the metadata itself
(rotation, revocation, expiry, thresholds, rollback, mix-and-match) are in test_fleet_trust.py."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from tuf.api.metadata import Metadata

from appliance.cli import main as cli
from appliance.config import AnalysisConfig
from appliance.fleet import transfer
from appliance.fleet.bundle_store import CRASH_ENV, BundleState, active_bundle_dir
from appliance.fleet.distribution import chunk_base
from appliance.fleet.repository import to_bytes
from appliance.fleet.updater import Updater
from appliance.inference.bundle import find_bundles, load_bundle
from appliance.pipeline.analyzer import Analyzer

from .fleet_helpers import Fleet, bump, flip_byte, make_variant, schema_validator, source_bundles  # noqa: F401
from .fleet_mqtt import DEVICE, Watcher, env, send_raw  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def test_good_update_over_mqtt_is_installed_confirmed_and_recorded(env):
    app = env.start()
    v1 = bump(env.base, major=1)
    env.release(env.variant(v1), groups=["pilot"])
    msg = env.watcher.outcome(v1)
    assert msg["outcome"] == "installed", msg
    env.validator.validate(msg)
    assert msg["previous"]["version"] == env.base and msg["detail"]["selftest"]["mask_agreement"] >= 0.99
    assert env.lesion_version() == v1
    st = BundleState(env.state)
    assert st.target("active", "lesion").name == f"lesion-{v1}"
    assert st.target("previous", "lesion") is not None  # the shipped copy, kept for rollback
    assert os.readlink(st.active / "lesion") == f"../store/lesion-{v1}"
    app.updater.drain()
    [analyzer] = app.activated
    assert {b["name"]: b["version"] for b in analyzer.bundles}["lesion"] == v1
    Analyzer.load(AnalysisConfig(), active_bundle_dir(env.state))  # what a restart loads works too
    steps = [(h["step"], h["outcome"]) for h in st.history()]
    assert steps[:2] == [("transfer", "progress"), ("selftest", "progress")] and steps[-1] == ("activate", "installed")
    assert st.history()[0]["detail"]["targets_version"] == 2 and st.history()[0]["detail"]["root_version"] == 1
    for h in st.history():
        env.validator.validate(h)
    for _ in range(3):
        app.updater.report_first_analysis(True)
    env.validator.validate(env.watcher.wait(lambda p: p["outcome"] == "confirmed"))
    assert st.pending() is None
    assert not any(st.staging.iterdir())
    # what the appliance trusts, as the fleet sees it
    trust = env.watcher.wait(lambda p: p.get("targets", {}).get("version") == 2, trust=True)
    schema_validator("trust").validate(trust)
    assert trust["root"]["version"] == 1 and trust["stale"] is None


def _tampered_chunk(env, v):
    """Someone with publish rights swaps a chunk of a signed release for other bytes."""
    b = env.variant(v)
    rel, archive = env.fleet.sign(b)
    chunks = transfer.split(archive, rel.chunk_size)
    bad = bytearray(chunks[1])
    bad[100] ^= 0xFF
    chunks[1] = bytes(bad)
    send_raw(env.url, env.fleet.repo.files(), {chunk_base("ctriage", rel.name, rel.version): chunks})


def _truncated_chunk(env, v):
    rel, archive = env.fleet.sign(env.variant(v))
    chunks = transfer.split(archive, rel.chunk_size)
    chunks[1] = chunks[1][: len(chunks[1]) // 2]
    send_raw(env.url, env.fleet.repo.files(), {chunk_base("ctriage", rel.name, rel.version): chunks})


def _failing_selftest(env, v):
    def mutate(d: Path) -> None:
        st = dict(np.load(d / "selftest.npz"))
        for k in st:
            if k.startswith("expected"):
                st[k] = 1.0 - st[k]
        np.savez_compressed(d / "selftest.npz", **st)

    env.release(env.variant(v, mutate=mutate))


@pytest.mark.parametrize("make, step, outcome, reason", [
    (_tampered_chunk, "transfer", "failed", "chunk 1 sha256 differs from the signed"),
    (_truncated_chunk, "transfer", "failed", "chunk 1 has"),
    (_failing_selftest, "selftest", "failed", "self-test failed"),
], ids=["tampered-chunk", "truncated-chunk", "failing-selftest"])
def test_bad_bundles_are_refused_and_the_old_model_stays(env, make, step, outcome, reason):
    app = env.start()
    v = bump(env.base, major=1)
    make(env, v)
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
    if step == "selftest":  # never retried automatically, even when the metadata comes again
        assert msg["bundle"]["sha256"] in st.blocked()
        app.updater._handled.clear()
        app.updater._refresh()
        assert "was blocked" in st.history()[-1]["reason"]


def test_tampered_targets_unsigned_and_foreign_metadata_are_refused(env, tmp_path):
    """Targets metadata changed after signing, metadata with no signature, another fleet's repository: each is
    refused with the reason; the shipped model keeps analysing."""
    env.start()
    v1 = bump(env.base, major=1)
    rel, archive = env.fleet.sign(env.variant(v1))
    files = env.fleet.repo.files()
    name = next(f for f in files if f.endswith(".targets.json"))
    md = Metadata.from_bytes(files[name])
    md.signed.targets[rel.path].unrecognized_fields["custom"]["ctriage"]["groups"] = ["everyone-else"]
    send_raw(env.url, {**files, name: to_bytes(md)},
             {chunk_base("ctriage", rel.name, rel.version): transfer.split(archive, rel.chunk_size)})
    msg = env.watcher.metadata("refused", contains="targets metadata")
    env.validator.validate(msg)
    assert "is signed by 0 of the 1 required key(s)" in msg["reason"] and msg["detail"]["kind"] == "signature"
    assert env.lesion_version() == env.base
    # unsigned: a timestamp with no signature at all
    ts = Metadata.from_bytes(files["timestamp.json"])
    ts.signed.version += 5
    ts.signatures.clear()
    send_raw(env.url, {"timestamp.json": to_bytes(ts)})
    msg = env.watcher.metadata("refused", contains="timestamp metadata (timestamp.json) is signed by 0")
    assert "signed by no key" in msg["reason"]
    # foreign: another fleet (its own keys) publishes its repository on the same broker
    other = Fleet(tmp_path / "other")
    other.sign(env.variant(bump(env.base, major=3)))
    env.publish_meta(other)
    msg = env.watcher.metadata("refused", contains="a revoked or unknown key")
    assert env.lesion_version() == env.base


def test_downgrade_and_replay_are_refused(env):
    app = env.start()
    v1, v2 = bump(env.base, major=1), bump(env.base, major=2)
    env.fleet.sign(env.variant(v2))
    app.updater.refresh_from(env.fleet.repo.dir)
    assert app.updater.install_path(env.tmp / "variants" / f"lesion-{v2}").outcome == "installed"
    env.fleet.repo.remove_release("lesion", v2, env.fleet.signers())
    env.release(env.variant(v1))
    msg = env.watcher.outcome(v1)
    env.validator.validate(msg)
    assert msg["outcome"] == "refused" and "downgrade refused" in msg["reason"] and msg["previous"]["version"] == v2
    # same version, other bytes (a re-made release): refused
    env.release(env.variant(v2, label="-again", notes="rebuilt"))
    msg = env.watcher.wait(lambda p: p["outcome"] == "refused" and "replay refused" in (p["reason"] or ""))
    env.validator.validate(msg)
    assert env.lesion_version() == v2
    # the metadata redelivered (every reconnect): nothing happens
    n = len(BundleState(env.state).history())
    app.updater._refresh()
    app.updater.drain()
    assert len(BundleState(env.state).history()) == n
    assert BundleState(env.state).target("active", "lesion").name == f"lesion-{v2}"


def test_signed_rollback_order(env):
    app = env.start()
    v1, v2 = bump(env.base, major=1), bump(env.base, major=2)
    env.fleet.sign(env.variant(v2))
    app.updater.refresh_from(env.fleet.repo.dir)
    assert app.updater.install_path(env.tmp / "variants" / f"lesion-{v2}").outcome == "installed"
    env.fleet.repo.remove_release("lesion", v2, env.fleet.signers())
    env.release(env.variant(v1, label="-wrong"), rollback_from=["0.0.0"])
    msg = env.watcher.outcome(v1)
    assert msg["outcome"] == "refused" and f"the active version is {v2}" in msg["reason"]
    env.release(env.variant(v1, notes="the rollback"), rollback_from=[v2])
    msg = env.watcher.wait(lambda p: p["outcome"] == "installed" and p["bundle"]["version"] == v1)
    env.validator.validate(msg)
    assert msg["detail"]["store"] and env.lesion_version() == v1


def test_first_analysis_failure_rolls_back(env):
    app = env.start()
    v1 = bump(env.base, major=1)
    env.release(env.variant(v1))
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
    assert BundleState(env.state).blocked()  # v1 is not taken again from the retained metadata


def test_transfer_over_http_url_and_a_tampered_mirror(env):
    app = env.start()
    v1, v2 = bump(env.base, major=1), bump(env.base, major=2)
    www = env.tmp / "www"
    www.mkdir()

    tampered = f"/lesion-{v2}.tar"

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a) -> None:
            pass

        def do_GET(self) -> None:
            if self.path != tampered:
                return super().do_GET()
            # the mirror serves other bytes from the first request on (rewriting the file after the release
            # raced the device's download: it could read a half-written file and fail as truncated instead)
            data = bytearray((www / tampered.lstrip("/")).read_bytes())
            data[len(data) // 2] ^= 0xFF
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(bytes(data))

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        b1 = env.variant(v1)
        env.release(b1, "--archive-out", str(www), url=f"{base}/lesion-{v1}.tar", inline=False)
        msg = env.watcher.outcome(v1)
        assert msg["outcome"] == "installed", msg
        assert app.updater.state.history()[0]["detail"]["via"] == "url"
        b2 = env.variant(v2)
        env.release(b2, "--archive-out", str(www), url=f"{base}{tampered}", inline=False)
        msg = env.watcher.outcome(v2)
    finally:
        srv.shutdown()
    assert (msg["step"], msg["outcome"]) == ("transfer", "failed") and "sha256 mismatch" in msg["reason"]
    assert env.lesion_version() == v1


def test_missing_chunk_times_out_and_not_targeted_is_ignored(env):
    app = env.start(transfer_timeout_s=1.0)
    v1, v2 = bump(env.base, major=1), bump(env.base, major=2)
    env.release(env.variant(v2), devices=["ct-room-1"])  # for another device: ignored without a word
    app.updater.drain()
    assert app.updater.state.history() == []
    rel, archive = env.fleet.sign(env.variant(v1))
    send_raw(env.url, env.fleet.repo.files(),
             {chunk_base("ctriage", rel.name, rel.version): transfer.split(archive, rel.chunk_size)[:-1]})
    msg = env.watcher.outcome(v1, timeout=30)
    env.validator.validate(msg)
    assert msg["outcome"] == "failed" and "transfer incomplete: 1 of" in msg["reason"]
    assert env.lesion_version() == env.base


CRASH_STEPS = ["staged", "stored", "selftested", "seeded", "previous", "link_tmp", "switched", "activated"]


@pytest.mark.parametrize("step", CRASH_STEPS)
def test_power_cut_at_each_step_leaves_a_working_model(tmp_path, source_bundles, step):
    shipped = source_bundles["lesion"].parent
    base = load_bundle(source_bundles["lesion"], verify=False).version
    v1 = bump(base, major=1)
    fleet = Fleet(tmp_path / "fleet")
    bundle = make_variant(source_bundles["lesion"], tmp_path / "lesion", v1)
    fleet.sign(bundle)
    state = tmp_path / "state"
    cmd = [sys.executable, "-m", "appliance.cli", "models", "install", str(bundle), "--repo", str(fleet.repo.dir),
           "--trust-root", str(fleet.root_json), "--state-dir", str(state), "--shipped", str(shipped)]
    r = subprocess.run(cmd, env={**os.environ, CRASH_ENV: step}, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 75, r.stderr  # cut at that step
    up = Updater(state, fleet.root_json, shipped_dir=shipped)  # the next start
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
    env.fleet.sign(env.variant(v1))  # installed by hand: no retained metadata would bring it back
    app.updater.refresh_from(env.fleet.repo.dir)
    assert app.updater.install_path(env.tmp / "variants" / f"lesion-{v1}").outcome == "installed"
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
    shutil.rmtree(st.target("active", "lesion"))
    env.start()
    msg = env.watcher.wait(lambda p: p["outcome"] == "repaired" and "shipped" in p["reason"])
    assert env.lesion_version() == env.base
    Analyzer.load(AnalysisConfig(), active_bundle_dir(env.state))


def test_daemon_wiring_swaps_the_analyzer_between_studies(tmp_path, mosquitto, source_bundles, phantom_dir):
    """The real daemon: Updater.from_config(cfg, daemon.publish, daemon.idle_gate) + daemon.attach_updater(updater)."""
    from appliance.config import Config
    from appliance.daemon import Daemon

    shipped = source_bundles["lesion"].parent
    base = load_bundle(source_bundles["lesion"], verify=False).version
    v1 = bump(base, major=1)
    fleet = Fleet(tmp_path / "fleet")
    cfg = Config(device_id=DEVICE, state_dir=str(tmp_path / "state"))
    cfg.mqtt.url = mosquitto.url
    cfg.series.quiet_seconds = 0.5
    cfg.fleet.trust_root = str(fleet.root_json)
    watcher = Watcher(mosquitto.url)
    d = Daemon(cfg, analyzer=Analyzer.load(AnalysisConfig(), shipped))
    up = Updater.from_config(cfg, d.publish, d.idle_gate, shipped_dir=shipped)
    d.attach_updater(up)
    d.start()
    try:
        bundle = make_variant(source_bundles["lesion"], tmp_path / "lesion", v1)
        fleet.sign(bundle)
        assert cli(["models", "publish", str(bundle), "--repo", str(fleet.repo.dir), "--mqtt-url", mosquitto.url]) == 0
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
