"""Trust in fleet updates over a real mosquitto (appliance/fleet/trust.py through the updater): root rotation,
revocation, migration from flat legacy keys (and dropping them), thresholds, expiry (freeze), rollback and
mix-and-match of metadata. Every refusal is an update report with its reason, and the bundle in use keeps
analysing."""
from __future__ import annotations

import hashlib
import time

from tuf.api.metadata import MetaFile, Metadata

from appliance.config import AnalysisConfig
from appliance.fleet.bundle_store import active_bundle_dir
from appliance.fleet.distribution import chunk_base
from appliance.fleet.keys import ROLES, generate_keypair, load_public, load_signers
from appliance.fleet.repository import Change, Repository, to_bytes
from appliance.fleet.transfer import split
from appliance.pipeline.analyzer import Analyzer

from .fleet_helpers import bump, schema_validator, source_bundles  # noqa: F401
from .fleet_mqtt import env, send_raw  # noqa: F401


def forged(repo: Repository, targets_signers, snapshot_signer, timestamp_signer, edit=None) -> dict[str, bytes]:
    """New targets (signed by whoever holds `targets_signers`) with a snapshot and timestamp that name it."""
    t = repo.load("targets")
    t.signed.version += 1
    if edit:
        edit(t.signed)
    t.signatures.clear()
    for s in targets_signers:
        t.sign(s, append=True)
    snap = repo.load("snapshot")
    snap.signed.version += 1
    snap.signed.meta["targets.json"] = MetaFile(version=t.signed.version)
    snap.signatures.clear()
    snap.sign(snapshot_signer)
    sb = to_bytes(snap)
    ts = repo.load("timestamp")
    ts.signed.version += 1
    ts.signed.snapshot_meta = MetaFile(version=snap.signed.version, length=len(sb),
                                       hashes={"sha256": hashlib.sha256(sb).hexdigest()})
    ts.signatures.clear()
    ts.sign(timestamp_signer)
    return {f"{t.signed.version}.targets.json": to_bytes(t), f"{snap.signed.version}.snapshot.json": sb,
            "timestamp.json": to_bytes(ts)}


def analysing(env, version: str) -> None:
    d = active_bundle_dir(env.state) or env.shipped
    assert {b["name"]: b["version"] for b in Analyzer.load(AnalysisConfig(), d).bundles}["lesion"] == version


def test_rotation_drops_the_legacy_keys_k1_to_k5_and_their_signatures_are_then_refused(env, tmp_path):
    """An appliance deployed with five flat keys (k1–k5) accepts once a first root that k5 also signed, whose
    targets role still is k1–k5; a rotation to a new targets key reaches it; targets signed by k3 are then refused."""
    legacy = tmp_path / "legacy"
    for i in range(1, 6):
        generate_keypair(legacy, f"k{i}")
    keys = tmp_path / "new-keys"
    for r in ("root", "snapshot", "timestamp", "targets"):
        generate_keypair(keys, r)
    pub = {r: [load_public(keys / f"{r}.pub")] for r in ROLES}
    pub["targets"] = [load_public(legacy / f"k{i}.pub") for i in range(1, 6)]
    online = load_signers([keys / "snapshot.key", keys / "timestamp.key"])
    root = load_signers([keys / "root.key"])
    repo = Repository.init(tmp_path / "repo", pub, root + online + load_signers([legacy / "k1.key"]),
                           legacy_signers=load_signers([legacy / "k5.key"]))
    app = env.start(anchor=None, legacy_keys=[legacy / f"k{i}.pub" for i in range(1, 6)])
    assert not app.updater.trust.ready
    v1, v3 = bump(env.base, major=1), bump(env.base, major=3)
    b1 = env.variant(v1)
    rel, archive = repo.add_bundle(b1, online + load_signers([legacy / "k3.key"]), chunk_size=64 * 1024)
    send_raw(env.url, repo.files(), {chunk_base("ctriage", rel.name, rel.version): split(archive, rel.chunk_size)})
    msg = env.watcher.metadata("rotated", contains="legacy key")
    env.validator.validate(msg)
    assert env.watcher.outcome(v1)["outcome"] == "installed"
    # the rotation: targets is a new key, k1–k5 are gone
    generate_keypair(keys / "t2", "targets")
    v = repo.rotate([Change("targets", (load_public(keys / "t2" / "targets.pub"),),
                            tuple(k.keyid for k in pub["targets"]))], root + online + load_signers([keys / "t2"]))
    assert v == 2
    send_raw(env.url, repo.files())
    msg = env.watcher.metadata("rotated", contains="root v1 → v2")
    assert msg["detail"]["root_version"] == 2
    trust = env.watcher.wait(lambda p: p.get("root", {}).get("version") == 2, trust=True)
    schema_validator("trust").validate(trust)
    assert trust["roles"]["targets"]["keys"] == [load_public(keys / "t2" / "targets.pub").keyid[:16]]
    # whoever still holds k3 signs a release: refused, the installed model keeps analysing
    files = forged(repo, load_signers([legacy / "k3.key"]), *online)
    send_raw(env.url, files)
    msg = env.watcher.metadata("refused", contains="a revoked or unknown key")
    env.validator.validate(msg)
    k3 = load_public(legacy / "k3.pub").keyid[:16]
    assert f"signed by {k3}, root v2 trusts" in msg["reason"] and msg["detail"]["kind"] == "signature"
    assert env.lesion_version() == v1
    analysing(env, v1)
    # the new targets key is what counts now
    rel, archive = repo.add_bundle(env.variant(v3), online + load_signers([keys / "t2"]), chunk_size=64 * 1024)
    send_raw(env.url, repo.files(), {chunk_base("ctriage", rel.name, rel.version): split(archive, rel.chunk_size)})
    assert env.watcher.outcome(v3)["outcome"] == "installed"


def test_a_first_root_without_a_legacy_signature_is_refused(env, tmp_path):
    generate_keypair(tmp_path / "legacy", "k5")
    app = env.start(anchor=None, legacy_keys=[tmp_path / "legacy" / "k5.pub"])
    env.fleet.sign(env.variant(bump(env.base, major=1)))
    env.publish_meta()
    msg = env.watcher.metadata("refused", contains="not signed by a legacy key")
    env.validator.validate(msg)
    assert not app.updater.trust.ready and env.lesion_version() == env.base


def test_threshold_of_two_targets_keys(env):
    """After a rotation to 2-of-2 targets keys, targets signed by one of them are refused; by both, installed."""
    app = env.start()
    second = env.fleet.new_key("targets-2")
    env.fleet.repo.rotate([Change("targets", (load_public(second / "key.pub"),), threshold=2)],
                          env.fleet.signers(second))
    env.publish_meta()
    env.watcher.metadata("rotated", contains="targets 2 of")
    v1 = bump(env.base, major=1)
    files = forged(env.fleet.repo, load_signers([env.fleet.keys / "targets.key"]),
                   *load_signers([env.fleet.keys / "snapshot.key", env.fleet.keys / "timestamp.key"]))
    send_raw(env.url, files)
    msg = env.watcher.metadata("refused", contains="is signed by 1 of the 2 required key(s)")
    env.validator.validate(msg)
    env.release(env.variant(v1), second)  # signed by both targets keys
    assert env.watcher.outcome(v1)["outcome"] == "installed"
    assert app.updater.trust.describe()["roles"]["targets"]["threshold"] == 2


def test_freeze_expired_timestamp_is_reported_and_updates_wait(env):
    """The timestamp expires and nothing newer comes (withheld, or the old one replayed): the appliance says so,
    installs nothing new, and keeps analysing; a fresh timestamp lets the waiting release in."""
    app = env.start()
    signers = env.fleet.signers()
    env.fleet.repo.refresh(signers, {"timestamp": 3 / 86400})
    env.publish_meta()
    env.watcher.wait(lambda p: p.get("timestamp", {}).get("version") == 2, trust=True)
    frozen = env.fleet.repo.files()["timestamp.json"]
    time.sleep(3.5)
    assert "timestamp.json is expired" in app.updater.check_freshness()
    msg = env.watcher.metadata("expired", contains="freeze")
    env.validator.validate(msg)
    trust = env.watcher.wait(lambda p: p["stale"] is not None, trust=True)
    assert trust["timestamp"]["expired"]
    # a new release is signed, but its timestamp is withheld: the old expired one is all the broker holds
    v1 = bump(env.base, major=1)
    rel, archive = env.fleet.sign(env.variant(v1))
    files = env.fleet.repo.files()
    files["timestamp.json"] = frozen
    send_raw(env.url, files, {chunk_base("ctriage", rel.name, rel.version): split(archive, rel.chunk_size)})
    msg = env.watcher.metadata("expired", contains="timestamp.json is expired: the timestamp expired")
    assert msg["detail"]["kind"] == "expired"
    app.updater.drain()
    assert env.lesion_version() == env.base
    analysing(env, env.base)
    env.fleet.repo.refresh(signers)  # the operator's routine step, published
    env.publish_meta()
    assert env.watcher.outcome(v1)["outcome"] == "installed"


def test_rollback_and_mix_and_match_of_metadata_are_refused(env):
    app = env.start()
    old = env.fleet.repo.files()
    v1 = bump(env.base, major=1)
    env.release(env.variant(v1))
    assert env.watcher.outcome(v1)["outcome"] == "installed"
    # rollback: yesterday's timestamp (and what it names) replayed
    send_raw(env.url, {"timestamp.json": old["timestamp.json"]})
    msg = env.watcher.metadata("refused", contains="rollback refused")
    env.validator.validate(msg)
    assert msg["detail"]["kind"] == "rollback" and "New timestamp version 1 must be >= 2" in msg["reason"]
    # mix and match: a fresh timestamp and snapshot, but the topic of the targets they name holds older targets
    s = env.fleet.signers()
    files = forged(env.fleet.repo, s, *load_signers([env.fleet.keys / "snapshot.key",
                                                     env.fleet.keys / "timestamp.key"]))
    tname = next(f for f in files if f.endswith(".targets.json"))
    older = next(f for f in old if f.endswith(".targets.json"))
    files[tname] = old[older]
    send_raw(env.url, files)
    msg = env.watcher.metadata("refused", contains="metadata of different moments refused")
    assert msg["detail"]["kind"] == "mismatch"
    # and a snapshot swapped for another one of the same version: its hash is not the one the timestamp signed
    ts_key, snap_key = load_signers([env.fleet.keys / "timestamp.key"])[0], load_signers([env.fleet.keys /
                                                                                            "snapshot.key"])[0]
    snap = env.fleet.repo.load("snapshot")
    snap.signed.version = 10
    snap.signatures.clear()
    snap.sign(snap_key)
    good = to_bytes(snap)
    ts = env.fleet.repo.load("timestamp")
    ts.signed.version = 10
    ts.signed.snapshot_meta = MetaFile(version=10, length=len(good), hashes={"sha256": hashlib.sha256(good).hexdigest()})
    ts.signatures.clear()
    ts.sign(ts_key)
    snap.signed.meta["targets.json"].version = 1
    snap.signatures.clear()
    snap.sign(snap_key)
    send_raw(env.url, {"10.snapshot.json": to_bytes(snap), "timestamp.json": to_bytes(ts)})
    msg = env.watcher.metadata("refused", contains="mixed or altered metadata refused")
    assert env.lesion_version() == v1
    analysing(env, v1)
    app.updater.drain()
