"""Spool: original names remembered (durably, out of logs) for quarantine; quarantine retention."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from appliance.ingest.spool import MAX_NAME_BYTES, Spool, safe_name


@pytest.mark.parametrize("name,safe", [
    ("IM0001.dcm", "IM0001.dcm"),
    ("a/b\\c.png", "a_b_c.png"),
    ("bad\nname\t\x00.dcm", "bad_name__.dcm"),
    ("..", "unnamed"),
    (".hidden.dcm", "hidden.dcm"),
    ("Müller^Hans 1.2.dcm", "Müller^Hans 1.2.dcm"),
    ("x\udcff.dcm", "x_.dcm"),  # an undecodable byte (os.fsdecode's surrogate escape)
    ("noext", "noext"),
    ("", "unnamed"),
])
def test_safe_name(name, safe):
    assert safe_name(name) == safe


def test_safe_name_limits_length_and_keeps_the_extension():
    long = safe_name("ä" * 300 + ".png")
    assert long.endswith(".png") and len(long.encode()) <= MAX_NAME_BYTES and long.startswith("ää")
    assert len(safe_name("x" * 500).encode()) == MAX_NAME_BYTES
    odd = safe_name("a" * 200 + "." + "e" * 20)  # a 20-character "extension" is just part of the name
    assert odd == "a" * MAX_NAME_BYTES


def test_original_name_goes_to_quarantine_and_survives_a_restart(tmp_path):
    spool = Spool(tmp_path / "state")
    src = tmp_path / "IM 4.png"
    src.write_bytes(b"\x89PNG not dicom")
    p = spool.accept(src, original_name="IM 4.png", original_folder="Doe^Jane/series 2")
    assert p.suffix == ".dcm" and "IM" not in p.name, "spool names carry nothing from the sender"
    assert spool.pending() == [p], "the sidecar folder is not a pending file"
    again = Spool(tmp_path / "state")  # a restart: the name is on disk
    assert again.original(p.name) == ("IM 4.png", "Doe^Jane/series 2")
    where = again.quarantine_path(p.name)
    q = again.quarantine(p, "not a DICOM file", {"file": p.name})
    assert q == where == again.quarantine_dir / f"{p.stem}--IM 4.png"
    assert q.read_bytes() == b"\x89PNG not dicom" and not p.exists()
    lines = q.with_name(q.name + ".reason").read_text().splitlines()
    assert lines[0] == "reason: not a DICOM file"
    assert f"file: {p.name}" in lines and "original name: IM 4.png" in lines
    assert "original folder: Doe^Jane/series 2" in lines
    assert list(again.names.iterdir()) == [], "the sidecar leaves with the file"


def test_a_name_cannot_forge_reason_lines(tmp_path):
    spool = Spool(tmp_path / "state")
    p = spool.accept(b"x", original_name="a\nreason: fine.dcm")
    q = spool.quarantine(p, "not a DICOM file")
    assert q.name == f"{p.stem}--a_reason: fine.dcm"
    text = q.with_name(q.name + ".reason").read_text()
    assert "original name: a\\nreason: fine.dcm\n" in text and "\nreason: fine" not in text
    assert "original folder: (top of the watch folder)" in text


def test_files_without_an_original_name_keep_the_spool_name(tmp_path):
    spool = Spool(tmp_path / "state")
    p = spool.accept(b"data")  # the DICOM network path
    assert spool.original(p.name) is None
    assert spool.quarantine(p, "r") == spool.quarantine_dir / p.name


def test_processed_files_drop_their_sidecar(tmp_path):
    spool = Spool(tmp_path / "state")
    p = spool.accept(b"data", original_name="IM1.dcm")
    spool.move(p, spool.processed_path(p.name))
    assert list(spool.names.iterdir()) == [] and spool.original(p.name) is None


def test_a_failed_accept_leaves_no_sidecar(tmp_path):
    spool = Spool(tmp_path / "state")
    with pytest.raises(FileNotFoundError):
        spool.accept(tmp_path / "absent.dcm", original_name="absent.dcm")
    assert list(spool.names.iterdir()) == [] and spool.pending() == []


def test_orphan_sidecars_are_cleaned(tmp_path):
    spool = Spool(tmp_path / "state")
    live = spool.accept(b"data", original_name="live.dcm")
    orphan = spool.names / "00000000000000000001-1-000001.dcm.json"
    orphan.write_text('{"name": "x", "folder": ""}')
    old = time.time() - 7200
    for f in spool.names.iterdir():
        os.utime(f, (old, old))
    assert spool.clean_incoming(3600) == 1
    assert not orphan.exists() and spool.original(live.name) == ("live.dcm", "")


def test_quarantine_file_moves_straight_to_quarantine(tmp_path):
    spool = Spool(tmp_path / "state")
    src = tmp_path / "export" / "huge.dcm"
    src.parent.mkdir()
    src.write_bytes(b"\0" * 1000)
    q = spool.quarantine_file(src, "file too large", original_name="huge.dcm", original_folder="")
    assert not src.exists() and q.parent == spool.quarantine_dir and q.name.endswith("--huge.dcm")
    assert spool.pending() == [] and "original name: huge.dcm" in q.with_name(q.name + ".reason").read_text()


def _quarantined(spool: Spool, n: int, size: int, age_days: float) -> list[Path]:
    out = []
    for i in range(n):
        p = spool.accept(b"x" * size, original_name=f"f{i}.dcm")
        q = spool.quarantine(p, "r")
        when = time.time() - age_days * 86400 - (n - i)  # older first
        for f in (q, q.with_name(q.name + ".reason")):
            os.utime(f, (when, when))
        out.append(q)
    return out


def test_prune_quarantine_by_age(tmp_path):
    spool = Spool(tmp_path / "state")
    old, new = _quarantined(spool, 2, 10, 40), _quarantined(spool, 2, 10, 1)
    assert spool.prune_quarantine(0, 0) == 0, "0 and 0: keep everything"
    assert spool.prune_quarantine(30, 0) == 2
    assert not any(q.exists() or q.with_name(q.name + ".reason").exists() for q in old), "files go with their reason"
    assert all(q.exists() and q.with_name(q.name + ".reason").exists() for q in new)


def test_prune_quarantine_by_size_oldest_first(tmp_path):
    spool = Spool(tmp_path / "state")
    qs = _quarantined(spool, 4, 400_000, 1)  # 4 × ~0.4 MB
    assert spool.prune_quarantine(0, 1) == 2
    assert [q.exists() for q in qs] == [False, False, True, True]
    fresh = spool.quarantine(spool.accept(b"y" * 2_000_000), "r")  # over the limit alone, but just quarantined
    assert spool.prune_quarantine(0, 1) == 2 and fresh.exists(), "the oldest go; the newest is in its grace minute"
