"""`ctriage models …` (appliance/commands/models.py, models_repo.py): the operator's keys and repository, verify,
trust, list, install, rollback, publish — with clear one-line errors for operator mistakes."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli import main as cli
from appliance.fleet.bundle_store import BundleState, active_bundle_dir
from appliance.fleet.distribution import parse_topic
from appliance.fleet.keys import load_public
from appliance.inference.bundle import find_bundles, load_bundle

from .fleet_helpers import bump, flip_byte, make_variant, schema_validator, source_bundles  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def op(tmp_path, capsys):
    """An operator's keys and repository made through the command line."""
    keys, repo = tmp_path / "keys", tmp_path / "repo"
    assert cli(["models", "keygen", str(keys), "--roles"]) == 0
    assert stat.S_IMODE(os.stat(keys / "root.key").st_mode) == 0o600
    assert cli(["models", "init", str(repo), "--keys", str(keys), "--expires", "timestamp=2"]) == 0
    assert "created" in capsys.readouterr().out
    return keys, repo


@pytest.fixture
def lesion(tmp_path, source_bundles) -> Path:
    return make_variant(source_bundles["lesion"], tmp_path / "lesion", "5.0.0")


def test_sign_show_verify_round_trip(op, lesion, capsys):
    keys, repo = op
    assert cli(["models", "sign", str(lesion), "--repo", str(repo), "--keys", str(keys), "--groups", "pilot"]) == 0
    out = capsys.readouterr().out
    assert "signed lesion 5.0.0" in out and "for group pilot" in out and "targets v2" in out
    assert cli(["models", "show", "--repo", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "release lesion 5.0.0 for group pilot" in out and "timestamp v2" in out
    assert cli(["models", "verify", str(lesion), "--repo", str(repo)]) == 0
    assert capsys.readouterr().out.startswith("OK lesion 5.0.0")
    # as a separate process too: the exit status is what scripts see
    r = subprocess.run([sys.executable, "-m", "appliance.cli", "models", "verify", str(lesion), "--repo", str(repo),
                        "--root", str(repo / "1.root.json")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("OK lesion"), r.stderr


@pytest.mark.parametrize("damage, reason", [
    (lambda d: flip_byte(d / "model.onnx"), "file model.onnx sha256 mismatch"),
    (lambda d: (d / "README").write_text("x"), "unlisted file README"),
    (lambda d: make_variant(d, d.parent / "x", "5.0.1") and None, None),
])
def test_verify_fails_with_the_precise_reason(op, lesion, capsys, damage, reason):
    keys, repo = op
    assert cli(["models", "sign", str(lesion), "--repo", str(repo), "--keys", str(keys)]) == 0
    damage(lesion)
    target = lesion if reason else lesion.parent / "x"
    capsys.readouterr()
    assert cli(["models", "verify", str(target), "--repo", str(repo)]) == 2
    err = capsys.readouterr().err
    assert (reason or "is not in the targets metadata") in err and err.count("\n") == 1, err


def test_operator_mistakes_are_one_line_errors(op, lesion, tmp_path, capsys):
    keys, repo = op
    cases = [
        (["models", "sign", str(lesion), "--repo", str(tmp_path / "none"), "--keys", str(keys)],
         "is not a fleet repository"),
        (["models", "sign", str(lesion), "--repo", str(repo), "--keys", str(keys / "root.key")],
         "targets metadata needs 1 signature"),
        (["models", "init", str(repo), "--keys", str(keys)], "already holds a repository"),
        (["models", "init", str(tmp_path / "r2"), "--keys", str(keys), "--threshold", "targets=x"], "is not a number"),
        (["models", "init", str(tmp_path / "r3"), "--keys", str(keys), "--threshold", "targets=2"],
         "threshold 2 is more than its 1 key(s)"),
        (["models", "rotate", "--repo", str(repo), "--keys", str(keys), "--role", "targets"], "nothing to rotate"),
        (["models", "revoke", "ffff", "--repo", str(repo), "--keys", str(keys)], "no role of"),
        (["models", "keygen", str(keys), "--roles"], "already exists"),
        (["models", "timestamp", "--repo", str(repo), "--keys", str(tmp_path / "nokeys")], "private key not found"),
        (["models", "withdraw", "lesion", "9.9.9", "--repo", str(repo), "--keys", str(keys)], "no release"),
    ]
    for argv, reason in cases:
        capsys.readouterr()
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert reason in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)


def test_rotate_revoke_and_timestamp(op, lesion, tmp_path, capsys):
    keys, repo = op
    assert cli(["models", "keygen", str(tmp_path / "k2"), "--name", "targets"]) == 0
    new = load_public(tmp_path / "k2" / "targets.pub").keyid[:16]
    assert cli(["models", "revoke", str(keys / "targets.pub"), "--repo", str(repo), "--keys", str(keys),
                "--keys", str(tmp_path / "k2"), "--add", str(tmp_path / "k2" / "targets.pub")]) == 0
    assert "root v2: key" in capsys.readouterr().out
    assert cli(["models", "sign", str(lesion), "--repo", str(repo), "--keys", str(keys)]) == 2  # the revoked key
    assert cli(["models", "sign", str(lesion), "--repo", str(repo), "--keys", str(keys),
                "--keys", str(tmp_path / "k2")]) == 0
    assert cli(["models", "rotate", "--repo", str(repo), "--keys", str(keys), "--role", "timestamp",
                "--threshold", "1", "--add", str(tmp_path / "k2" / "targets.pub")]) == 0
    assert cli(["models", "timestamp", "--repo", str(repo), "--keys", str(keys / "timestamp.key"), "--snapshot"]) == 2
    assert cli(["models", "timestamp", "--repo", str(repo), "--keys", str(keys), "--snapshot"]) == 0
    capsys.readouterr()
    assert cli(["models", "show", "--repo", str(repo), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["root"]["version"] == 3 and d["roles"]["targets"]["keys"] == [new]
    assert cli(["models", "verify", str(lesion), "--repo", str(repo)]) == 0


def test_install_list_trust_rollback_on_a_stopped_appliance(op, tmp_path, source_bundles, capsys):
    keys, repo = op
    shipped = source_bundles["lesion"].parent
    base = load_bundle(source_bundles["lesion"], verify=False).version
    v1, v2 = bump(base, minor=1), bump(base, minor=2)
    state = tmp_path / "state"
    common = ["--state-dir", str(state), "--shipped", str(shipped)]
    trust = ["--repo", str(repo), "--trust-root", str(repo / "1.root.json")]
    b1 = make_variant(source_bundles["lesion"], tmp_path / "l1", v1)
    b2 = make_variant(source_bundles["lesion"], tmp_path / "l2", v2)
    for b in (b1, b2):
        assert cli(["models", "sign", str(b), "--repo", str(repo), "--keys", str(keys)]) == 0

    assert cli(["models", "list", *common]) == 0
    out = capsys.readouterr().out
    assert "* lesion" in out and "shipped" in out

    assert cli(["models", "install", str(b1), *trust, *common]) == 0
    assert f"installed lesion {v1}" in capsys.readouterr().out
    assert cli(["models", "install", str(b2), *trust, *common]) == 0
    assert find_bundles(active_bundle_dir(state))["lesion"].version == v2
    capsys.readouterr()
    assert cli(["models", "install", str(b1), *trust, *common]) == 1  # downgrade
    assert "downgrade refused" in capsys.readouterr().err
    assert cli(["models", "install", str(b2), *common]) == 0  # already active: nothing to do
    assert "already active" in capsys.readouterr().out
    foreign = make_variant(source_bundles["lesion"], tmp_path / "l3", bump(base, minor=3))
    assert cli(["models", "install", str(foreign), *common]) == 1
    assert "not in the trusted targets metadata" in capsys.readouterr().err

    assert cli(["models", "list", "--json", *common]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    active = [r for r in rows if r["where"] == "active" and r["name"] == "lesion"]
    assert active[0]["version"] == v2 and active[0]["in_use"] and active[0]["trust"].startswith("release lesion-")
    assert any(r["where"] == "previous" and r["version"] == v1 for r in rows)

    assert cli(["models", "trust", *common, "--json"]) == 0
    t = json.loads(capsys.readouterr().out)
    assert t["root"]["version"] == 1 and [r["version"] for r in t["releases"]] == [v1, v2]
    assert cli(["models", "trust", *common]) == 0
    assert "release lesion" in capsys.readouterr().out

    assert cli(["models", "rollback", "lesion", *common]) == 0
    assert f"from {v2} to {v1}" in capsys.readouterr().out
    assert cli(["models", "rollback", "lesion", *common]) == 0  # then the shipped one
    assert find_bundles(active_bundle_dir(state))["lesion"].version == base
    assert cli(["models", "rollback", "lesion", *common]) == 2
    assert "nothing to roll back" in capsys.readouterr().err
    history = BundleState(state).history()
    outcomes = [h["outcome"] for h in history if h["outcome"] != "progress"]
    assert outcomes[-3:] == ["refused", "rolled_back", "rolled_back"]


def test_publish_and_every_devices_trust_over_the_broker(op, lesion, tmp_path, mosquitto, capsys):
    """`publish --archive-out` writes the archive a site can host; the metadata is retained on the broker; `trust
    --mqtt-url` lists what each device reported."""
    keys, repo = op
    assert cli(["models", "publish", str(lesion), "--repo", str(repo), "--mqtt-url", mosquitto.url]) == 2
    assert "is not a release of" in capsys.readouterr().err  # not signed yet
    assert cli(["models", "sign", str(lesion), "--repo", str(repo), "--keys", str(keys)]) == 0
    assert cli(["models", "publish", str(lesion), "--repo", str(repo), "--mqtt-url", mosquitto.url,
                "--archive-out", str(tmp_path / "www")]) == 0
    out = capsys.readouterr().out
    assert "4 metadata files" in out and (tmp_path / "www" / "lesion-5.0.0.tar").is_file()
    flip_byte(lesion / "selftest.npz")
    assert cli(["models", "publish", str(lesion), "--repo", str(repo), "--mqtt-url", mosquitto.url]) == 2
    from appliance.fleet.distribution import mqtt_client
    from appliance.fleet.reports import trust_payload
    from appliance.fleet.trust import DirFetcher, TrustStore

    ts = TrustStore(tmp_path / "dev", repo / "1.root.json")
    ts.refresh(DirFetcher(repo))
    p = trust_payload("ct-room-4", ts.describe(), None)
    schema_validator("trust").validate(p)
    c = mqtt_client(mosquitto.url)
    c.publish("ctriage/ct-room-4/trust", json.dumps(p), qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    capsys.readouterr()
    assert cli(["models", "trust", "--mqtt-url", mosquitto.url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ct-room-4") and "targets   v2" in out


def test_topics():
    assert parse_topic("ctriage", "ctriage/fleet/metadata/3.root.json") == ("metadata", "3.root.json", None, None)
    assert parse_topic("ctriage", "ctriage/fleet/metadata/timestamp.json")[1] == "timestamp.json"
    assert parse_topic("ctriage", "ctriage/fleet/metadata/../x.json") is None
    assert parse_topic("ctriage", "ctriage/fleet/bundle/lesion/1.2.3/chunk/7") == ("chunk", "lesion", "1.2.3", 7)
    assert parse_topic("ctriage", "ctriage/fleet/bundle/lesion/x/chunk/7") is None
    assert parse_topic("ctriage", "ctriage/dev/update") is None
