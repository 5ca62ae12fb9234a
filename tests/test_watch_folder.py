"""Watch folder and spool: complete files only, temp names left alone, end markers, disk guard, atomic hand-over."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from appliance.config import WatchConfig
from appliance.ingest.spool import Spool, SpoolFull
from appliance.ingest.watch_folder import WatchFolder, completeness, dicomdir_series
from appliance.phantom import PhantomSpec, write_phantom


@pytest.fixture(scope="module")
def series_files(tmp_path_factory) -> list[Path]:
    return write_phantom(tmp_path_factory.mktemp("src"), PhantomSpec(slices=3, size=128, lesion=False))


def _watch(tmp_path: Path, **kw) -> tuple[WatchFolder, Spool, list]:
    cfg = WatchConfig(**{"stable_seconds": 1.0, "rescan_seconds": 0.5, "incomplete_seconds": 10.0, **kw})
    spool = Spool(tmp_path / "state", cfg.min_free_mb)
    hints: list[tuple[str, str]] = []
    root = tmp_path / "export"
    root.mkdir(exist_ok=True)
    return WatchFolder(root, spool, cfg, on_hint=lambda u, r: hints.append((u, r))), spool, hints


def test_a_file_is_taken_once_stable_and_complete(tmp_path, series_files):
    w, spool, _ = _watch(tmp_path)
    dst = w.root / "study" / "IM1.dcm"
    dst.parent.mkdir()
    dst.write_bytes(series_files[0].read_bytes())
    assert w.poll(now=100.0) == 0, "just seen: not stable yet"
    assert w.poll(now=100.5) == 0
    assert w.poll(now=101.2) == 1
    assert not dst.exists()
    (got,) = spool.pending()
    assert got.read_bytes() == series_files[0].read_bytes()
    assert got.name.endswith(".dcm") and "IM1" not in got.name, "spool names carry nothing from the sender"


def test_a_growing_file_waits_until_it_stops_changing(tmp_path, series_files):
    w, spool, _ = _watch(tmp_path)
    data = series_files[1].read_bytes()
    dst = w.root / "IM2.dcm"
    a, b = len(data) // 3, 2 * len(data) // 3
    dst.write_bytes(data[:a])
    w.poll(now=10.0)
    with dst.open("ab") as f:
        f.write(data[a:b])
    assert w.poll(now=11.5) == 0, "it grew: the stability clock restarts"
    with dst.open("ab") as f:
        f.write(data[b:])
    assert w.poll(now=12.0) == 0
    assert w.poll(now=12.6) == 0
    assert w.poll(now=13.1) == 1
    assert spool.pending()[0].read_bytes() == data


def test_temporary_names_are_left_alone_until_renamed(tmp_path, series_files):
    w, spool, _ = _watch(tmp_path)
    data = series_files[0].read_bytes()
    for name in ("IM1.dcm.part", "IM1.tmp", ".IM1.dcm", "x.partial"):
        (w.root / name).write_bytes(data)
    (w.root / ".hidden").mkdir()
    (w.root / ".hidden" / "IM9.dcm").write_bytes(data)
    for t in (0.0, 5.0, 50.0):
        assert w.poll(now=t) == 0
    (w.root / "IM1.dcm.part").rename(w.root / "IM1.dcm")
    w.poll(now=60.0)
    assert w.poll(now=61.5) == 1
    assert len(spool.pending()) == 1 and (w.root / "IM1.tmp").exists()


def test_truncated_and_garbage_files_wait_then_go_to_the_pipeline(tmp_path, series_files):
    w, spool, _ = _watch(tmp_path, incomplete_seconds=10.0)
    data = series_files[2].read_bytes()
    (w.root / "trunc.dcm").write_bytes(data[: len(data) // 2])
    (w.root / "garbage.dcm").write_bytes(b"\x00\x01not dicom at all" * 100)
    assert completeness(w.root / "trunc.dcm")[0].startswith("pixel data incomplete")
    assert "not a DICOM file" in completeness(w.root / "garbage.dcm")[0]
    w.poll(now=0.0)
    assert w.poll(now=5.0) == 0, "stable but incomplete: the sender may still be writing"
    assert w.poll(now=10.5) == 2, "after incomplete_seconds they are taken (and quarantined downstream)"


def test_end_marker_hints_the_series_of_its_folder_once_files_are_taken(tmp_path, series_files):
    w, spool, hints = _watch(tmp_path)
    d = w.root / "exam1"
    d.mkdir()
    for p in series_files:
        (d / p.name).write_bytes(p.read_bytes())
    (d / "COMPLETE").write_text("")
    w.poll(now=0.0)
    assert hints == []
    w.poll(now=1.5)
    uid = str(__import__("pydicom").dcmread(series_files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert hints == [(uid, "end marker: end marker file received")]
    assert not (d / "COMPLETE").exists(), "the marker is consumed"
    assert len(spool.pending()) == 3


def test_dicomdir_names_its_series(tmp_path):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    recs = []
    records = (("PATIENT", None), ("STUDY", None), ("SERIES", "1.2.3.4"), ("IMAGE", None), ("SERIES", "1.2.3.5"))
    for kind, uid in records:
        r = Dataset()
        r.DirectoryRecordType = kind
        if uid:
            r.SeriesInstanceUID = uid
        recs.append(r)
    ds.DirectoryRecordSequence = recs
    p = tmp_path / "DICOMDIR"
    ds.save_as(p, enforce_file_format=True)
    assert dicomdir_series(p) == ["1.2.3.4", "1.2.3.5"]
    assert dicomdir_series(tmp_path / "absent") == []


def test_disk_guard_stops_taking_files(tmp_path, series_files):
    w, spool, _ = _watch(tmp_path, min_free_mb=10**7)
    (w.root / "IM1.dcm").write_bytes(series_files[0].read_bytes())
    w.poll(now=0.0)
    assert w.poll(now=2.0) == 0
    assert "below watch.min_free_mb" in w.blocked
    assert (w.root / "IM1.dcm").exists()
    with pytest.raises(SpoolFull):
        spool.accept(b"data")


def test_spool_accept_paths_bytes_datasets_and_quarantine(tmp_path, series_files):
    calls = []
    spool = Spool(tmp_path / "state", notify=lambda: calls.append(1))
    src = tmp_path / "a.dcm"
    src.write_bytes(series_files[0].read_bytes())
    p1 = spool.accept(src)
    assert not src.exists() and p1.parent == spool.dir
    src.write_bytes(b"abc")
    p2 = spool.accept(src, keep_source=True)  # the copy path (also used across file systems)
    assert src.exists() and p2.read_bytes() == b"abc"
    p3 = spool.accept(b"xyz")
    import pydicom

    p4 = spool.accept_dataset(pydicom.dcmread(series_files[1]))
    assert pydicom.dcmread(p4).SOPInstanceUID == pydicom.dcmread(series_files[1]).SOPInstanceUID
    assert spool.pending() == [p1, p2, p3, p4], "arrival order"
    assert len(calls) == 4
    assert list(spool.incoming.iterdir()) == [], "no staging leftovers"
    q = spool.quarantine(p3, "not a DICOM file", {"file": p3.name})
    assert q.exists() and not p3.exists()
    reason = q.with_name(q.name + ".reason").read_text()
    assert reason.startswith("reason: not a DICOM file\n") and f"file: {p3.name}" in reason


def test_prune_processed_keeps_recent_files(tmp_path):
    import os

    spool = Spool(tmp_path / "state")
    old = spool.processed_path("old.dcm", time.time() - 10 * 86400)
    new = spool.processed_path("new.dcm")
    for p in (old, new):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 10 * 86400,) * 2)
    assert spool.prune_processed(0) == 0
    assert spool.prune_processed(7) == 1
    assert new.exists() and not old.exists() and not old.parent.exists()
    stale, live = spool.incoming / "a.dcm.part", spool.incoming / "b.dcm.part"
    for p in (stale, live):
        p.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200,) * 2)
    assert spool.clean_incoming(3600) == 1 and live.exists() and not stale.exists()


def test_watch_thread_takes_files_from_events_and_rescans(tmp_path, series_files):
    before = tmp_path / "export"
    before.mkdir()
    (before / "early.dcm").write_bytes(series_files[0].read_bytes())  # there before the watcher starts
    w, spool, _ = _watch(tmp_path, stable_seconds=0.2, rescan_seconds=30.0)
    w.start()
    try:
        (w.root / "late.dcm").write_bytes(series_files[1].read_bytes())  # seen through a file event
        deadline = time.monotonic() + 15
        while len(spool.pending()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        w.stop()
    assert len(spool.pending()) == 2
    assert list(w.root.iterdir()) == []
