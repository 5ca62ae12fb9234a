"""The operator's TUF repository (appliance/fleet/repository.py): init, releases, freshness, rotation, thresholds,
and the clear errors an operator gets."""
from __future__ import annotations

import json

import pytest
from tuf.api.metadata import Metadata

from appliance.fleet.keys import load_public, load_signers
from appliance.fleet.release import Release
from appliance.fleet.repository import Change, Repository, RepositoryError
from appliance.fleet.trust import verify_at_rest

from .fleet_helpers import fleet, make_variant, source_bundles  # noqa: F401


def test_init_writes_a_consistent_repository(fleet):
    repo = fleet.repo
    assert sorted(p.name for p in repo.dir.iterdir()) == ["1.root.json", "1.snapshot.json", "1.targets.json",
                                                          "root.json", "timestamp.json"]
    root = repo.root().signed
    assert root.consistent_snapshot and root.version == 1
    assert {r: x.threshold for r, x in root.roles.items()} == {"root": 1, "targets": 1, "snapshot": 1,
                                                              "timestamp": 1}
    root2, targets, notes = verify_at_rest(repo.dir, fleet.root_json.read_bytes())
    assert root2.version == 1 and targets.targets == {} and notes == []
    with pytest.raises(RepositoryError, match="already holds a repository"):
        Repository.init(repo.dir, {}, [])


def test_a_signed_bundle_is_a_release_with_its_custom_fields(fleet, tmp_path, source_bundles):
    b = make_variant(source_bundles["lesion"], tmp_path / "l", "7.0.0")
    rel, archive = fleet.sign(b, groups=["pilot"], rollback_from=["8.0.0"])
    assert rel.path == "lesion-7.0.0.tar" and rel.length == len(archive) and rel.groups == ("pilot",)
    assert sum(rel.chunk_sizes()) == len(archive) and rel.rollback_from == ("8.0.0",)
    d = fleet.repo.describe()
    assert (d["targets"]["version"], d["snapshot"]["version"], d["timestamp"]["version"]) == (2, 2, 2)
    assert sorted(p.name for p in fleet.repo.dir.glob("*.targets.json")) == ["2.targets.json"]  # older dropped
    assert [r.version for r in fleet.repo.releases()] == ["7.0.0"]
    assert not rel.for_device("ct-1", []) and rel.for_device("ct-1", ["pilot"])
    fleet.repo.remove_release("lesion", "7.0.0", fleet.signers())
    assert fleet.repo.releases() == []
    with pytest.raises(RepositoryError, match="no release lesion 7.0.0"):
        fleet.repo.remove_release("lesion", "7.0.0", fleet.signers())


def test_signing_needs_the_role_keys(fleet, tmp_path, source_bundles):
    b = make_variant(source_bundles["lesion"], tmp_path / "l", "7.0.0")
    with pytest.raises(RepositoryError, match="targets metadata needs 1 signature"):
        fleet.repo.add_bundle(b, load_signers([fleet.keys / "snapshot.key", fleet.keys / "timestamp.key"]))
    snap, ts = fleet.repo.refresh(load_signers([fleet.keys / "timestamp.key"]))  # the online key alone
    assert (snap, ts) == (1, 2)
    with pytest.raises(RepositoryError, match="snapshot metadata needs"):
        fleet.repo.refresh(load_signers([fleet.keys / "timestamp.key"]), snapshot=True)


def test_rotation_is_signed_by_the_old_and_the_new_root(fleet):
    new_root = fleet.new_key("root-2")
    old_id = load_public(fleet.keys / "root.pub").keyid
    # the new root key alone cannot rotate: the old root must sign
    with pytest.raises(RepositoryError, match="the old root must sign the new one"):
        fleet.repo.rotate([Change("root", (load_public(new_root / "key.pub"),), (old_id,))],
                          load_signers([new_root, fleet.keys / "targets.key", fleet.keys / "snapshot.key",
                                        fleet.keys / "timestamp.key"]))
    v = fleet.repo.rotate([Change("root", (load_public(new_root / "key.pub"),), (old_id,))], fleet.signers(new_root))
    assert v == 2
    md = Metadata.from_file(str(fleet.repo.dir / "2.root.json"))
    assert old_id in md.signatures and load_public(new_root / "key.pub").keyid in md.signatures
    root, _, _ = verify_at_rest(fleet.repo.dir, fleet.root_json.read_bytes())
    assert root.version == 2 and root.roles["root"].keyids == [load_public(new_root / "key.pub").keyid]
    with pytest.raises(RepositoryError, match="nothing changes"):
        fleet.repo.rotate([Change("root", (load_public(new_root / "key.pub"),))], fleet.signers(new_root))


@pytest.mark.parametrize("change, reason", [
    (Change("targets", remove=("",)), "ambiguous|not a key"),
    (Change("targets", threshold=2), "threshold 2 must be between 1 and its 1 keys"),
    (Change("nobody"), "unknown role"),
])
def test_rotation_errors_say_why(fleet, change, reason):
    if change.remove == ("",):
        change.remove = (load_public(fleet.keys / "targets.pub").keyid,)
        reason = "would have no key left"
    with pytest.raises(RepositoryError, match=reason):
        fleet.repo.rotate([change], fleet.signers())


def test_release_fields_are_checked(fleet, tmp_path, source_bundles):
    rel, _ = fleet.sign(make_variant(source_bundles["lesion"], tmp_path / "l", "7.0.0"))
    t = rel.target
    custom = json.loads(json.dumps(t.custom))
    for edit, reason in [(lambda c: c.update(chunks=["x"]), "chunks do not add up"),
                         (lambda c: c.update(version="7.0.1"), "does not match"),
                         (lambda c: c.update(groups=["a/b"]), "not valid"),
                         (lambda c: c.update(chunks=[], url=None), "neither inline chunks nor url")]:
        c = json.loads(json.dumps(custom))
        edit(c["ctriage"])
        t.unrecognized_fields["custom"] = c
        with pytest.raises(Exception, match=reason):
            Release.from_target(t)
