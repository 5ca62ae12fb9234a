"""models.probe_foci: the foci table behind models/LESION2.md, through the appliance's path with the committed
bundles (a generated phantom: no research data needed)."""
from __future__ import annotations

import json

import pytest

from models import probe_foci


def test_one_patch_phantom_is_one_focus_and_absent_data_is_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(probe_foci, "PSEUDO", tmp_path / "no-such-folder")
    probe_foci.main(["--only", "phantom,pseudo", "--seeds", "2", "--json"])
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["series"] for r in rows] == ["phantom seed 2"]
    r = rows[0]
    # one ground-glass patch: one focus spanning a run, the single-lesion negative
    assert r["result"] == "negative" and r["foci"] == 1 and len(r["rows"]) == 1, r
    assert 0.0 < r["noise"] < 0.016  # the appliance's own noise figure: a clean phantom
    focus = r["rows"][0]
    assert 3 <= focus["boxed"] <= focus["last"] - focus["first"] + 1
    assert 0.5 <= focus["peak"] <= 1.0 and focus["side"] > 25
    assert "# valid-area " in err and " · lesion " in err
    assert f"SKIP pseudo-labelled patients: {tmp_path / 'no-such-folder'} is absent" in err


def test_mistyped_options_are_one_line_errors(capsys):
    for argv, said in ((["--only", "phantoms"], "give some of phantom, dicom, pseudo, dependent, noise, emphysema, expiration"),
                       (["--seeds", "10-1"], "give FIRST-LAST"), (["--seeds", "x"], "give FIRST-LAST"),
                       (["--noise-hu", "-50"], "give HU amplitudes ≥ 0"),
                       (["--emphysema", "3"], "give shares from 0 to 2"),
                       (["--expiration", "0.5"], "give factors from 1 to 2")):
        with pytest.raises(SystemExit) as e:
            probe_foci.main(argv)
        assert e.value.code == 2 and said in capsys.readouterr().err


def test_a_folder_without_a_readable_series_is_skipped_with_its_reason(tmp_path, monkeypatch, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "not-a-slice.dcm").write_bytes(b"not DICOM at all")
    monkeypatch.setattr(probe_foci, "DICOM", {"junk": str(junk)})
    monkeypatch.setattr(probe_foci, "TB", tmp_path / "no-tb")
    monkeypatch.setattr(probe_foci, "TS_CHEST", tmp_path / "no-ts.nii.gz")
    probe_foci.main(["--only", "dicom", "--json"])
    out, err = capsys.readouterr()
    assert out == ""
    assert f"SKIP junk: no readable series in {junk}" in err
