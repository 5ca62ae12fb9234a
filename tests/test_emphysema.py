"""models.emphysema (lucencies in aerated lung, continuous through slices), and what the appliance does with the
committed models on an emphysematous phantom: the boxes the model puts on normal lung between lucencies are left
out as no opacity (appliance.pipeline.opacity), counted and said."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from appliance.cli import main
from appliance.phantom import PhantomSpec, write_phantom
from models.emphysema import add_lucencies, spheres, write_emphysema


def test_lucencies_fill_the_share_asked_and_only_aerated_lung():
    hu = np.full((100, 100), -860.0, np.float32)
    hu[40:60, :] = 40.0  # a band of soft tissue
    balls = spheres((100.0, 100.0, 50.0), 0.5, seed=1)
    out = add_lucencies(hu, (1.0, 1.0), 25.0, balls)
    assert np.array_equal(out[40:60], hu[40:60])  # soft tissue untouched
    lucent = float((out < -950).mean())
    assert 0.05 < lucent < 0.5
    assert np.array_equal(add_lucencies(hu, (1.0, 1.0), 25.0, balls), out)  # seeded
    more = add_lucencies(hu, (1.0, 1.0), 25.0, spheres((100.0, 100.0, 50.0), 1.0, seed=1))
    assert (more < -950).mean() > lucent
    with pytest.raises(ValueError, match="between 0 and 2"):
        spheres((1.0, 1.0, 1.0), 3.0)


def test_a_lucency_continues_through_neighbouring_slices(tmp_path):
    src = tmp_path / "src"
    write_phantom(src, PhantomSpec(slices=6, size=128, spacing_mm=2.0, thickness_mm=2.0, lesion=False, seed=2))
    assert write_emphysema(src, tmp_path / "out", 0.6, spacing_z_mm=2.0) == 6
    files = sorted((tmp_path / "out").glob("*.dcm"))
    lucent = [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) < -950
              for ds in map(pydicom.dcmread, files)]
    overlap = [(a & b).sum() / max(1, a.sum()) for a, b in zip(lucent[1:-2], lucent[2:-1])]
    assert min(overlap) > 0.3  # 2-6 mm spheres on 2 mm slices: a lucency shows on the next slice too


def test_boxes_between_lucencies_are_left_out_counted_and_said(tmp_path, capsys):
    src = tmp_path / "src"
    spec = PhantomSpec(slices=24, size=256, spacing_mm=1.4, lesion=False, seed=3)
    write_phantom(src, spec)
    write_emphysema(src, tmp_path / "emph", 0.7, spacing_z_mm=spec.thickness_mm)
    off = tmp_path / "off.toml"
    off.write_text("[analysis]\ndensity_check = false\n")

    def analyse(*extra):
        assert main(["analyze", str(tmp_path / "emph"), "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out.splitlines()[0])

    checked, unchecked = analyse(), analyse("--config", str(off))
    # without the check the model boxes the normal lung between lucencies on several slices ...
    assert unchecked["lesion_slices"] >= 5 and unchecked["acquisition"]["flat_boxes"] == 0
    # ... with it those boxes are left out and counted (measured: 8 slices boxed → 1, 11 boxes left out)
    assert checked["lesion_slices"] <= unchecked["lesion_slices"] - 4 and checked["acquisition"]["flat_boxes"] >= 6
    assert checked["result"] != "positive"
    assert main(["analyze", str(tmp_path / "emph")]) == 0
    assert "lesion box(es) left out: no denser than the aerated lung around them" in capsys.readouterr().out
