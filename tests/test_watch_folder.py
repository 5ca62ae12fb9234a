"""Watch folder and spool: complete files only (however slowly written), temp names left alone, end markers, disk
guard, size limit, original names kept for quarantine, atomic hand-over."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from appliance.config import WatchConfig
from appliance.ingest import watch_folder
from appliance.ingest.spool import Spool, SpoolFull
from appliance.ingest.watch_folder import WatchFolder, completeness, dicomdir_series
from appliance.jpeg_lossless import JPEG_LOSSLESS_SV1
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
    assert completeness(w.root / "trunc.dcm").why.startswith("pixel data truncated (file cut short: ")
    assert "not a DICOM file" in completeness(w.root / "garbage.dcm").why
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


# -- slow writers: a pause anywhere in the file never splits it ---------------------------------------------------
@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("slices")
    spec = PhantomSpec(slices=1, size=128, lesion=False)
    return {
        "CT_small": Path(get_testdata_file("CT_small.dcm")).read_bytes(),  # a real CT slice, elements after pixels
        "phantom": write_phantom(d / "plain", spec)[0].read_bytes(),
        "jpeg-lossless": write_phantom(d / "jll", spec, transfer_syntax=JPEG_LOSSLESS_SV1)[0].read_bytes(),
    }


def _write_slowly(w: WatchFolder, dst: Path, data: bytes, cuts: list[int], pause: float) -> int:
    """Write data in chunks ending at `cuts`, polling through a pause of `pause` s after each; returns files taken
    while chunks were still missing (must be 0), then the rest is written and polled until taken."""
    early, t = 0, 0.0
    for a, b in zip([0] + cuts, cuts + [len(data)]):
        with dst.open("ab") as f:
            f.write(data[a:b])
        end = t + (pause if b < len(data) else 0.0)
        while t <= end:
            early += w.poll(now=t) if b < len(data) else 0
            t += 0.25
    return early


@pytest.mark.parametrize("kind", ["CT_small", "phantom", "jpeg-lossless"])
@pytest.mark.parametrize("cut", [128, 300, 2048, 4096, "half", "all-but-16"])
def test_a_slowly_written_slice_is_taken_once_and_whole(tmp_path, slices, kind, cut):
    data = slices[kind]
    n = len(data) // 2 if cut == "half" else len(data) - 16 if cut == "all-but-16" else cut
    w, spool, _ = _watch(tmp_path)  # stable_seconds 1, incomplete_seconds 10: the pause (3 s) is in between
    dst = w.root / "IM1.dcm"
    assert _write_slowly(w, dst, data, [n], pause=3.0) == 0, "taken while the sender was pausing"
    taken = sum(w.poll(now=t) for t in (3.5, 4.0, 4.6, 5.2, 6.0))
    assert taken == 1 and not dst.exists()
    (got,) = spool.pending()
    assert got.read_bytes() == data
    assert list(spool.quarantine_dir.iterdir()) == []


def test_a_slice_written_in_many_slow_chunks(tmp_path, slices):
    data = slices["CT_small"]
    w, spool, _ = _watch(tmp_path)
    # (not at 39068: a file ending exactly after its pixel data is whole as far as anyone can tell, though CT_small
    # has 138 bytes of trailing padding after that; only stable_seconds covers such a pause)
    assert _write_slowly(w, w.root / "IM1.dcm", data, [100, 132, 300, 2048, 6288, 6300, 6312, 20000, 39100], 2.0) == 0
    assert sum(w.poll(now=t) for t in (30.0, 31.5)) == 1
    assert [p.read_bytes() for p in spool.pending()] == [data]


def test_a_slow_writer_that_closes_between_chunks(tmp_path, slices):
    """The watch thread with real file events: a close after the first chunk is a hint, not proof."""
    data = slices["phantom"]
    w, spool, _ = _watch(tmp_path, stable_seconds=0.2, rescan_seconds=0.5)
    w.start()
    try:
        dst = w.root / "IM1.dcm"
        dst.write_bytes(data[:2048])  # written and closed
        time.sleep(1.0)
        assert spool.pending() == [] and dst.exists()
        with dst.open("ab") as f:
            f.write(data[2048:])
        deadline = time.monotonic() + 10
        while not spool.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        w.stop()
    assert [p.read_bytes() for p in spool.pending()] == [data]


def test_close_write_hint_takes_a_whole_file_at_once_and_proves_nothing_alone(tmp_path, slices):
    w, spool, _ = _watch(tmp_path, stable_seconds=5.0)
    whole, part = w.root / "whole.dcm", w.root / "part.dcm"
    whole.write_bytes(slices["phantom"])
    part.write_bytes(slices["phantom"][:2048])
    w._event(whole, closed=True)
    w._event(part, closed=True)
    assert w.poll(now=1.0) == 1, "closed after writing and whole up to the end of its pixel data"
    assert not whole.exists() and part.exists()
    assert w.poll(now=7.0) == 0, "closed, stable, but cut short: waits for the sender"


def test_a_file_that_grows_during_the_check_is_not_moved(tmp_path, slices, monkeypatch):
    w, spool, _ = _watch(tmp_path)
    dst = w.root / "IM1.dcm"
    dst.write_bytes(slices["phantom"])
    real = watch_folder.completeness

    def check_then_write(p):
        out = real(p)
        with p.open("ab") as f:  # the sender appends right after the check
            f.write(b"\0" * 8)
        return out

    monkeypatch.setattr(watch_folder, "completeness", check_then_write)
    w.poll(now=0.0)
    assert w.poll(now=1.5) == 0 and dst.exists(), "re-checked right before the move"
    assert spool.pending() == []


def test_a_stable_incomplete_file_is_parsed_once(tmp_path, slices, monkeypatch):
    calls = []
    real = watch_folder.check_complete
    monkeypatch.setattr(watch_folder, "check_complete", lambda p: calls.append(p) or real(p))
    w, spool, _ = _watch(tmp_path, incomplete_seconds=10.0)
    (w.root / "IM1.dcm").write_bytes(slices["CT_small"][:20000])
    for i in range(40):
        w.poll(now=i * 0.25)
    assert len(calls) == 1, "checked again only when its size or mtime change"
    assert w.poll(now=10.5) == 1, "then taken after incomplete_seconds, for the pipeline to quarantine"


# -- size limit, original names ------------------------------------------------------------------------------------
def test_a_file_over_the_size_limit_goes_to_quarantine_unread(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(watch_folder, "completeness", lambda p: pytest.fail("a large file was parsed"))
    w, spool, _ = _watch(tmp_path, max_file_mb=1)
    big = w.root / "Doe^Jane" / "huge scan.dcm"
    big.parent.mkdir()
    big.write_bytes(os.urandom(3 * 2**19))  # 1.5 MB
    with caplog.at_level(logging.DEBUG, logger="ctriage.watch"):
        w.poll(now=0.0)
        assert w.poll(now=0.5) == 0 and big.exists(), "still within stable_seconds"
        assert w.poll(now=1.5) == 0, "not taken into the spool"
    assert not big.exists() and spool.pending() == []
    (q,) = [p for p in spool.quarantine_dir.iterdir() if not p.name.endswith(".reason")]
    assert q.name.endswith("--huge scan.dcm") and q.stat().st_size == 3 * 2**19
    reason = q.with_name(q.name + ".reason").read_text()
    assert reason.startswith("reason: file too large: 1.5 MB, over watch.max_file_mb = 1 MB (not read)\n")
    assert "original name: huge scan.dcm" in reason and "original folder: Doe^Jane" in reason
    assert caplog.records and not any("Doe" in r.getMessage() or "huge" in r.getMessage() for r in caplog.records)


def test_quarantine_keeps_the_original_name_and_logs_do_not(tmp_path, caplog):
    w, spool, _ = _watch(tmp_path, incomplete_seconds=2.0)
    png = w.root / "Doe^Jane" / "IM 7.png"
    png.parent.mkdir()
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 500)
    with caplog.at_level(logging.DEBUG, logger="ctriage"):
        w.poll(now=0.0)
        assert w.poll(now=2.5) == 1, "not DICOM: taken after incomplete_seconds for the pipeline to quarantine"
        (p,) = spool.pending()
        q = Spool(spool.state_dir).quarantine(p, "not a DICOM file", {"file": p.name})  # after a restart, too
    assert q.name == f"{p.stem}--IM 7.png" and q.read_bytes().startswith(b"\x89PNG")
    reason = q.with_name(q.name + ".reason").read_text().splitlines()
    assert "original name: IM 7.png" in reason and "original folder: Doe^Jane" in reason
    assert not any("Doe" in r.getMessage() or "IM 7" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("key,value,msg", [
    ("max_file_mb", 0, "[watch] max_file_mb: must be between 1 and 4096"),
    ("quarantine_keep_days", -1, "[watch] quarantine_keep_days: must be between 0 and 3650"),
    ("quarantine_max_mb", -5, "[watch] quarantine_max_mb: must be between 0 and 1e+07"),
])
def test_new_watch_options_are_validated(key, value, msg):
    from appliance.config import ConfigError, from_dict

    with pytest.raises(ConfigError) as e:
        from_dict({"watch": {key: value}})
    assert msg in str(e.value)
