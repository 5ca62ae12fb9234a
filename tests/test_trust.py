"""The appliance's TUF client (appliance/fleet/trust.py) on repository directories and in-memory broker files;
the same refusals over a real broker are in test_fleet_trust.py."""
from __future__ import annotations

import time

import pytest

from appliance.fleet.keys import load_public
from appliance.fleet.repository import Change
from appliance.fleet.trust import DirFetcher, RetainedFetcher, TrustError, TrustStore, trust_anchor, verify_at_rest

from .fleet_helpers import fleet  # noqa: F401


def test_bootstrap_refresh_and_what_is_trusted(fleet, tmp_path):
    ts = TrustStore(tmp_path / "state", fleet.root_json)
    assert not ts.ready and ts.describe() == {"trust_dir": str(ts.dir), "ready": False}
    targets = ts.refresh(DirFetcher(fleet.repo.dir))
    assert targets.version == 1 and ts.ready and ts.root_version() == 1 and ts.stale() is None
    d = ts.describe()
    assert d["timestamp"]["version"] == 1 and d["roles"]["targets"]["threshold"] == 1
    # the broker holding nothing yet is not an error, only "not yet"
    with pytest.raises(TrustError) as e:
        TrustStore(tmp_path / "other", fleet.root_json).refresh(RetainedFetcher())
    assert e.value.kind == "incomplete"


def test_anchor_choice_and_a_missing_anchor(tmp_path):
    assert trust_anchor("", []).name == "root.json"  # the project's shipped root
    assert trust_anchor("", ["k.pub"]) is None  # legacy keys: wait for a first root they signed
    assert trust_anchor("/x/root.json", ["k.pub"]) == trust_anchor("/x/root.json", [])
    with pytest.raises(TrustError, match="not found"):
        TrustStore(tmp_path, tmp_path / "nope.json").bootstrap()
    with pytest.raises(TrustError, match="not a fleet repository"):
        DirFetcher(tmp_path)


def test_an_expired_root_and_timestamp(fleet, tmp_path):
    fleet.repo.rotate([Change("snapshot", threshold=1, add=(load_public(fleet.new_key("s2") / "key.pub"),))],
                      fleet.signers(), {"root": 2 / 86400, "timestamp": 2 / 86400})
    ts = TrustStore(tmp_path / "state", fleet.root_json)
    ts.refresh(DirFetcher(fleet.repo.dir))
    assert ts.root_version() == 2
    time.sleep(2.5)
    assert "root.json is expired" in ts.stale()
    with pytest.raises(TrustError) as e:
        ts.refresh(DirFetcher(fleet.repo.dir))
    assert e.value.kind == "expired" and "Final root.json is expired" in e.value.reason
    _, _, notes = verify_at_rest(fleet.repo.dir, fleet.root_json.read_bytes())  # at rest: notes, no failure
    assert any("root v2 expired" in n for n in notes) and any("timestamp" in n for n in notes)


def test_at_rest_verification_refuses_a_foreign_chain(fleet, tmp_path):
    from .fleet_helpers import Fleet

    other = Fleet(tmp_path / "other")
    with pytest.raises(TrustError) as e:
        verify_at_rest(fleet.repo.dir, other.root_json.read_bytes())
    assert e.value.kind == "signature"
