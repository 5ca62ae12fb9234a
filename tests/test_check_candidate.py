"""models.check_candidate: the candidate-check table, its bundle-set check and its one-line errors (the checks it
runs are each tested with their own module; a full run needs ../shared/data and the training cache)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from models import check_candidate as cc

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "bundles"


def _row(**kw):
    r = {"bundles": "valid-area 1.4.0 · lesion 2.0.0", "dice": 0.7395, "dice_ci95": [0.6654, 0.8078],
         "pseudo_slices_boxed": 0.8829, "negatives_specificity": 0.9811, "crops_false_alarms": 3,
         "P001": {"labelled_boxed": 78, "labelled": 80, "unlabelled_boxed": 6, "unlabelled": 68, "result": "positive"},
         "phantoms_positive": [0, 10], "slices_per_s": [45.1, 44.9]}
    return {**r, **kw}


def test_the_table_has_one_row_per_set_with_every_check():
    vs = {"difference": -0.0071, "ci95": [-0.0150, 0.0021], "better": 3, "worse": 7}
    text = cc.table({"baseline": _row(int8_agreement=0.9838),
                     "candidate": _row(bundles="valid-area 1.4.0 · lesion 2.4.0", dice=0.7329, dice_vs_baseline=vs,
                                       phantoms_positive=[1, 10], slices_per_s=[62.0, 68.4])})
    lines = text.splitlines()
    assert len(lines) == 4 and lines[1].count("---") == lines[0].count("|") - 1
    base, cand = lines[2], lines[3]
    assert "0.740 (0.665–0.808)" in base and "| — |" in base and "78/80 / 6/68" in base and "45.1 / 44.9" in base
    assert "lesion 2.4.0" in cand and "-0.007 (-0.015 … +0.002) (3 / 7)" in cand and "1 / 10" in cand
    assert "| 0.984 |" in base
    assert cand.count("| — |") == 2  # cap001 and the agreement absent from this row: dashes, not errors


def test_int8_agreement_is_read_from_the_lesion_bundles_manifest(tmp_path):
    import json

    got = cc.int8_agreement(SHIPPED)
    lesion = max((SHIPPED).glob("lesion-*"), key=lambda d: tuple(int(v) for v in d.name.split("-")[1].split(".")))
    want = json.loads((lesion / "manifest.json").read_text())["quantization"]["fp32_vs_int8_openvino_mask_dice"]
    assert got == round(want, 4) and 0.9 < got <= 1.0
    assert cc.int8_agreement(tmp_path) is None  # no lesion bundle: nothing to report


def test_a_folder_without_both_bundles_is_a_clear_error(tmp_path, capsys):
    shutil.copytree(SHIPPED / "valid-area-1.4.0", tmp_path / "valid-area-1.4.0")
    with pytest.raises(cc.CheckError, match="no lesion bundle"):
        cc.bundle_set(tmp_path)
    assert cc.bundle_set(SHIPPED).startswith("valid-area ")
    assert cc.main([str(tmp_path), "--rounds", "0"]) == 2
    assert "no lesion bundle (a bundles folder holds both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cc.main([str(SHIPPED), "--rounds", "-1"])


def test_a_failing_check_says_which_and_why():
    with pytest.raises(cc.CheckError, match=r"probe_foci failed \(exit 1\): .*No module named"):
        cc._run(["models.no_such_check"], "probe_foci")


def test_without_the_train_extra_it_says_so_before_any_check(monkeypatch, capsys):
    real = cc.importlib.util.find_spec
    gone = {"torch", "nibabel"}  # whichever of them this environment has
    monkeypatch.setattr(cc.importlib.util, "find_spec", lambda name: None if name in gone else real(name))
    assert cc.main([str(SHIPPED), "--rounds", "0"]) == 2
    assert "needs the `train` extra (torch, nibabel missing): pip install -e '.[train]'" in capsys.readouterr().err
