"""Store: WAL SQLite state that survives restarts and kills; findings round-trip; the outbox keeps order."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest

from appliance.domain import Box, Evidence, Rect, SeriesVerdict, SliceFinding
from appliance.store import Store, finding_from_dict, finding_to_dict, verdict_from_dict, verdict_to_dict


def _finding(k: int = 0) -> SliceFinding:
    return SliceFinding(f"sop-{k}", -2.5 * k, (512, 512), Rect(60, 40, 420, 470),
                        [Box(Rect(100, 300, 160, 380), 2350.5, 0.9731, "lower-right"),
                         Box(Rect(90, 80, 120, 110), 40.0, 0.61, "upper-left")],
                        max_prob=0.9731, lesion_fraction=0.02, timings_ms={"valid_area": 3.2, "lesion_infer": 9.1})


def test_finding_and_verdict_round_trip():
    f = _finding(3)
    g = finding_from_dict(finding_to_dict(f))
    assert g == f
    no_lung = SliceFinding("x", 1.0, (256, 256), None)
    assert finding_from_dict(finding_to_dict(no_lung)) == no_lung
    v = SeriesVerdict("positive", "final", Evidence("lower-right", 4, 9, 6), 60, 50, 12, None, 1)
    assert verdict_from_dict(verdict_to_dict(v)) == v
    focal = SeriesVerdict("negative", "final", None, 60, 50, 11, "a single focal lesion", 0,
                          focal=Evidence("lower-right", 11, 21, 11), foci=1)
    assert verdict_from_dict(verdict_to_dict(focal)) == focal
    old = verdict_to_dict(v)
    del old["focal"], old["foci"]  # a verdict stored before foci were counted
    assert verdict_from_dict(old) == v
    # the image noise survives a restart: a series finished after one reports the whole series' figure
    # ... and so does the pixel size (a focal lesion's size in mm, after a restart)
    # ... and so do the boxes left out as no opacity (counted on the verdict after a restart)
    noisy = SliceFinding("n", 2.5, (512, 512), Rect(60, 40, 420, 470), noise=0.0213, smoothed=0.9, pixel_mm=0.7031,
                         flat_boxes=3)
    assert finding_from_dict(finding_to_dict(noisy)) == noisy
    old_f = finding_to_dict(f)
    del old_f["noise"], old_f["smoothed"], old_f["pixel_mm"], old_f["flat_boxes"]  # stored before these were measured
    back = finding_from_dict(old_f)
    assert back.noise is None and back.smoothed == 0.0 and back.pixel_mm is None and back.flat_boxes == 0
    acq = SeriesVerdict("negative", "final", None, 60, 50, 0, acquisition={"noise": 0.0213, "noisy": True,
                        "limit": 0.016, "smoothed_slices": 50, "slices_measured": 50})
    assert verdict_from_dict(verdict_to_dict(acq)) == acq
    # the patient position (prone images) survives a restart; older rows read as unknown
    prone = SliceFinding("p", 2.5, (512, 512), Rect(60, 40, 420, 470), pixel_mm=0.7, patient_position="HFP")
    assert finding_from_dict(finding_to_dict(prone)) == prone
    pv = SeriesVerdict("negative", "final", None, 12, 12, 0, patient_position="HFP")
    assert verdict_from_dict(verdict_to_dict(pv)) == pv
    assert verdict_from_dict(verdict_to_dict(v)).patient_position == ""


def test_wal_mode_and_slices_survive_reopen(tmp_path):
    db = tmp_path / "s.db"
    s = Store(db)
    assert s._one("PRAGMA journal_mode")[0] == "wal"
    with s.transaction():
        s.series_seen("1.2.3", "9.9", "a" * 16, "b" * 16, description="CHEST", expected=40, now=100.0)
        for k in (2, 0, 1):
            s.add_slice(f"sop-{k}", "1.2.3", (2.5 * k, k, f"sop-{k}"), _finding(k), now=100.0)
            s.add_file(f"f{k}", "analysed", ident=f"sop-{k}", series_uid="1.2.3", path=f"/p/f{k}")
    s.close()
    s = Store(db)
    assert s.has_slice("sop-1") and not s.has_slice("sop-9")
    got = sorted(s.series_slices("1.2.3"))
    assert [o for o, _, _ in got] == [(0.0, 0, "sop-0"), (2.5, 1, "sop-1"), (5.0, 2, "sop-2")]
    assert got[1][1] == _finding(1)
    row = s.series("1.2.3")
    assert (row["state"], row["expected"], row["first_seen"]) == ("open", 40, 100.0)
    assert s.file_path("sop-2") == "/p/f2"
    assert s.counts()["analysed"] == 3


def test_transaction_is_all_or_nothing(tmp_path):
    s = Store(tmp_path / "s.db")
    with pytest.raises(RuntimeError):
        with s.transaction():
            s.add_slice("sop-1", "1.2.3", (0.0, 0, "sop-1"), _finding(1))
            s.outbox_add("t", b"x")
            raise RuntimeError("crash in the middle")
    assert not s.has_slice("sop-1") and s.outbox_count() == 0
    with pytest.raises(sqlite3.IntegrityError):
        with s.transaction():
            s.add_slice("sop-2", "1.2.3", (0.0, 0, "sop-2"), _finding(2))
            s.add_slice("sop-2", "1.2.3", (0.0, 0, "sop-2"), _finding(2))  # the same slice twice
    assert not s.has_slice("sop-2")


def test_series_lifecycle_reopen_and_rejected_count(tmp_path):
    s = Store(tmp_path / "s.db")
    s.series_seen("1.2.3", "9.9", "a" * 16, "b" * 16, now=1.0)
    v = SeriesVerdict("negative", "final", None, 30, 28, 0)
    s.set_series("1.2.3", verdict=v, state="complete", complete_reason="quiet", now=2.0)
    s.add_file("bad.dcm", "rejected", series_uid="1.2.3", reason="truncated")
    assert s.open_series() == []
    s.series_seen("1.2.3", "9.9", "a" * 16, "b" * 16, now=3.0)  # a late slice
    row = s.series("1.2.3")
    assert (row["state"], row["first_seen"], row["last_seen"]) == ("open", 1.0, 3.0)
    assert s.rejected_count("1.2.3") == 1 and s.rejected_count("4.5") == 0
    assert verdict_from_dict(__import__("json").loads(row["verdict"])) == v
    # analysed at 9 (a backlog), arrived at 4: the series was last seen when the slice arrived
    s.series_seen("1.2.3", "9.9", "a" * 16, "b" * 16, now=9.0, arrived=4.0)
    row = s.series("1.2.3")
    assert (row["first_seen"], row["last_seen"], row["updated"]) == (1.0, 4.0, 9.0)


def test_outbox_in_order_until_acknowledged(tmp_path):
    db = tmp_path / "s.db"
    s = Store(db)
    ids = [s.outbox_add(f"t/{i}", f"m{i}".encode(), 1, i % 2 == 0, 60 if i else None) for i in range(3)]
    m = s.outbox_next()
    assert (m.id, m.topic, m.payload, m.retain, m.expiry) == (ids[0], "t/0", b"m0", True, None)
    s.outbox_attempt(m.id)
    assert s.outbox_next().attempts == 1, "not acknowledged: it stays first"
    s.outbox_done(m.id)
    s.close()
    s = Store(db)
    assert [s.outbox_next().topic, s.outbox_count()] == ["t/1", 2]
    assert s.outbox_next(after=ids[1]).topic == "t/2"


def test_verdict_history_and_study_fingerprint(tmp_path):
    s = Store(tmp_path / "s.db")
    p = {"study_key": "a" * 16, "series_key": "b" * 16, "state": "provisional", "result": "positive"}
    s.add_verdict(p)
    s.add_verdict(p | {"state": "final"})
    assert [v["state"] for v in s.recent_verdicts(5)] == ["final", "provisional"]
    assert len(s.verdicts("a" * 16)) == 2 and s.verdicts("c" * 16) == []
    s.set_study("9.9", "a" * 16, "fp1", "positive", "provisional")
    s.set_study("9.9", "a" * 16, "fp2", "positive", "final")
    assert (s.study("9.9")["fingerprint"], s.study("9.9")["state"]) == ("fp2", "final")


def test_readonly_reader_sees_commits_of_a_running_writer(tmp_path):
    db = tmp_path / "s.db"
    w = Store(db)
    w.outbox_add("t", b"x")
    r = Store(db, readonly=True)
    assert r.outbox_count() == 1
    w.outbox_add("t", b"y")
    assert r.counts()["outbox"] == 2
    with pytest.raises(sqlite3.OperationalError):
        r.outbox_add("t", b"z")
    r.close()
    w.close()
    with pytest.raises(FileNotFoundError):
        Store(tmp_path / "absent.db", readonly=True)


def test_a_killed_writer_loses_only_its_open_transaction(tmp_path):
    """SIGKILL in the middle of a transaction: the committed one is there, the open one is not, the file is fine."""
    db = tmp_path / "s.db"
    code = textwrap.dedent(f"""
        import os, signal
        from appliance.store import Store
        s = Store({str(db)!r})
        with s.transaction():
            s.outbox_add("committed", b"1")
        s._db.execute("BEGIN IMMEDIATE")
        s._db.execute("INSERT INTO outbox(topic, payload, qos, retain, created) VALUES ('open', x'00', 1, 0, 0)")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    s = Store(db)
    assert s._one("PRAGMA integrity_check")[0] == "ok"
    assert s.outbox_count() == 1 and s.outbox_next().topic == "committed"
