"""`ctriage models …` (appliance/commands/models.py): keygen, sign, verify, list, install, rollback, publish."""
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
from appliance.inference.bundle import find_bundles, load_bundle

from .test_signing import bump, flip_byte, keys, make_variant, source_bundles  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def lesion(tmp_path, source_bundles) -> Path:
    """An unsigned copy of the shipped lesion bundle."""
    return make_variant(source_bundles["lesion"], tmp_path / "lesion")


def test_keygen_sign_verify_round_trip_through_the_command_line(tmp_path, lesion, capsys):
    assert cli(["models", "keygen", str(tmp_path / "k")]) == 0
    key, pub = tmp_path / "k" / "signing.key", tmp_path / "k" / "signing.pub"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert cli(["models", "sign", str(lesion), "--key", str(key)]) == 0
    assert (lesion / "manifest.sig").is_file()
    capsys.readouterr()
    assert cli(["models", "verify", str(lesion), "--trust", str(pub)]) == 0
    assert capsys.readouterr().out.startswith("OK lesion ")
    assert cli(["models", "keygen", str(tmp_path / "k")]) == 2  # never overwrites a key
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "manifest.sig").unlink(), "no manifest.sig"),
    (lambda d: flip_byte(d / "model.onnx"), "file model.onnx sha256 mismatch"),
    (lambda d: (d / "README").write_text("x"), "unlisted file README"),
    (lambda d: (d / "manifest.sig").write_bytes(b"A" * 86 + b"==\n"), "signature does not verify with any trusted key"),
])
def test_verify_fails_with_the_precise_reason(lesion, keys, capsys, damage, reason):
    assert cli(["models", "sign", str(lesion), "--key", str(keys["fleet"])]) == 0
    damage(lesion)
    capsys.readouterr()
    assert cli(["models", "verify", str(lesion), "--trust", str(keys["fleet_pub"])]) == 2
    err = capsys.readouterr().err
    assert reason in err and err.count("\n") == 1, err


def test_verify_with_an_unknown_key(lesion, keys, capsys):
    assert cli(["models", "sign", str(lesion), "--key", str(keys["other"])]) == 0
    assert cli(["models", "verify", str(lesion), "--trust", str(keys["fleet_pub"])]) == 2
    assert "signature does not verify with any trusted key" in capsys.readouterr().err
    # as a separate process too: the exit status is what scripts see
    r = subprocess.run([sys.executable, "-m", "appliance.cli", "models", "verify", str(lesion), "--trust",
                        str(keys["other_pub"])], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("OK lesion"), r.stderr


def test_install_list_rollback_on_a_stopped_appliance(tmp_path, source_bundles, keys, capsys):
    shipped = source_bundles["lesion"].parent
    base = load_bundle(source_bundles["lesion"], verify=False).version
    v1, v2 = bump(base, minor=1), bump(base, minor=2)
    state = tmp_path / "state"
    common = ["--state-dir", str(state), "--shipped", str(shipped)]
    trust = ["--trust", str(keys["fleet_pub"])]
    b1 = make_variant(source_bundles["lesion"], tmp_path / "l1", v1, keys["fleet"])
    b2 = make_variant(source_bundles["lesion"], tmp_path / "l2", v2, keys["fleet"])

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
    assert cli(["models", "install", str(b2), *trust, *common]) == 0  # already active: nothing to do
    assert "already active" in capsys.readouterr().out
    assert cli(["models", "install", str(b2), "--trust", str(keys["other_pub"]), *common]) == 1
    assert "signature does not verify" in capsys.readouterr().err

    assert cli(["models", "list", "--json", *common, *trust]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    active = [r for r in rows if r["where"] == "active" and r["name"] == "lesion"]
    assert active[0]["version"] == v2 and active[0]["in_use"] and active[0]["signature"].startswith("ok")
    assert any(r["where"] == "previous" and r["version"] == v1 for r in rows)

    assert cli(["models", "rollback", "lesion", *common]) == 0
    assert f"from {v2} to {v1}" in capsys.readouterr().out
    assert find_bundles(active_bundle_dir(state))["lesion"].version == v1
    assert cli(["models", "rollback", "lesion", *common]) == 0  # then the shipped one
    assert find_bundles(active_bundle_dir(state))["lesion"].version == base
    assert cli(["models", "rollback", "lesion", *common]) == 2
    assert "nothing to roll back" in capsys.readouterr().err
    history = BundleState(state).history()
    outcomes = [h["outcome"] for h in history if h["outcome"] != "progress"]
    assert outcomes[-3:] == ["refused", "rolled_back", "rolled_back"]


def test_install_from_a_published_archive(tmp_path, source_bundles, keys, mosquitto, capsys):
    """`publish --archive-out` writes the archive a site can host; `install` takes it as well."""
    base = load_bundle(source_bundles["lesion"], verify=False).version
    b = make_variant(source_bundles["lesion"], tmp_path / "l1", bump(base, patch=1), keys["fleet"])
    tar = tmp_path / "lesion.tar"
    assert cli(["models", "publish", str(b), "--mqtt-url", mosquitto.url, "--key", str(keys["fleet"]),
                "--devices", "ct-room-2,ct-room-3", "--archive-out", str(tar)]) == 0
    assert "for ct-room-2,ct-room-3" in capsys.readouterr().out
    state = tmp_path / "state"
    assert cli(["models", "install", str(tar), "--trust", str(keys["fleet_pub"]), "--state-dir", str(state),
                "--shipped", str(source_bundles["lesion"].parent)]) == 0
    assert find_bundles(active_bundle_dir(state))["lesion"].version == bump(base, patch=1)


def test_publish_refuses_unsigned_and_bad_targets(lesion, keys, mosquitto, capsys):
    assert cli(["models", "publish", str(lesion), "--mqtt-url", mosquitto.url, "--key", str(keys["fleet"])]) == 2
    assert "no manifest.sig" in capsys.readouterr().err
    assert cli(["models", "sign", str(lesion), "--key", str(keys["fleet"])]) == 0
    assert cli(["models", "publish", str(lesion), "--mqtt-url", mosquitto.url, "--key", str(keys["fleet"]),
                "--devices", "a/b"]) == 2
    assert "not a device or group name" in capsys.readouterr().err
