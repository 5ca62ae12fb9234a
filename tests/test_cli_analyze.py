"""`ctriage analyze` end to end with the committed models: JSON fields, exit codes, overlays, both backends."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from appliance.cli import main
from appliance.inference.factory import available_backends

from .conftest import shared_data

FIELDS = {"result", "state", "evidence", "slices", "lung_slices", "lesion_slices", "rejected", "bundles", "backend",
          "device", "timings"}


def run_json(capsys, *args) -> tuple[int, list[dict]]:
    code = main(["analyze", *map(str, args), "--json"])
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines() if line.strip()]


def test_phantom_series_json_fields(phantom_dir, capsys):
    code, objs = run_json(capsys, phantom_dir)
    assert code == 0 and len(objs) == 1
    o = objs[0]
    assert FIELDS <= set(o)
    assert o["state"] == "final" and o["result"] in ("positive", "negative", "indeterminate")
    assert o["slices"] == 24 and 0 < o["lung_slices"] <= 24
    assert {b["name"] for b in o["bundles"]} == {"valid-area", "lesion"}
    assert all(len(b["sha256"]) == 64 for b in o["bundles"])
    assert set(o["timings"]["ms_per_slice"]) >= {"decode", "valid_area", "lesion_infer", "boxes"}
    acq = o["acquisition"]  # the phantom is a clean scan: measured on its lung slices, not noisy, nothing smoothed
    assert acq["noisy"] is False and 0 < acq["noise"] < acq["limit"] and acq["smoothed_slices"] == 0
    assert 0 < acq["slices_measured"] <= o["lung_slices"]
    # no identifiers: the phantom's name, ID and UIDs never appear
    text = json.dumps(o)
    assert "PHANTOM^SYNTHETIC" not in text and "SYNTH-0001" not in text and "SYNTH-ACC" not in text
    assert "19700101" not in text and "1.2.826.0.1.3680043" not in text  # birth date, DICOM UIDs


def test_a_noisy_scan_gets_a_line_and_a_clean_one_none():
    from appliance.commands.analyze import finding_lines
    from appliance.domain import SeriesVerdict

    acq = {"noise": 0.0213, "noisy": True, "limit": 0.016, "smoothed_slices": 50, "slices_measured": 50}
    v = SeriesVerdict("negative", "final", None, 60, 50, 0, acquisition=acq)
    assert finding_lines("abc", v) == [
        "abc: noisy scan (noise 0.021, validated up to 0.016: sharp kernel or low dose) — lesion boxes are less "
        "reliable, read with care; 50 slices smoothed before analysis"]
    assert finding_lines("abc", SeriesVerdict("negative", "final", None, 60, 50, 0,
                                              acquisition={**acq, "noisy": False})) == []


def test_one_lesion_focus_is_negative_with_the_focus_named_and_two_are_positive(tmp_path, capsys):
    """The committed models on two phantoms that differ only in a second, smaller focus in the other lung: one focus
    on many slices in one quadrant (a tumour's pattern) is a negative that names it; two foci are positive."""
    from appliance.phantom import PhantomSpec, write_phantom

    base = dict(slices=24, size=256, spacing_mm=1.4, lesion=True, seed=7)
    write_phantom(tmp_path / "one", PhantomSpec(**base, second_focus=None))
    write_phantom(tmp_path / "two", PhantomSpec(**base))
    _, (one,) = run_json(capsys, tmp_path / "one")
    _, (two,) = run_json(capsys, tmp_path / "two")
    assert two["result"] == "positive" and two["foci"] == 2 and two["focal"] is None
    assert one["result"] == "negative" and one["foci"] == 1 and one["evidence"] is None
    assert one["focal"] == two["evidence"], "the same run, reported as a focal lesion instead of a positive"
    f = one["focal"]
    assert f["quadrant"] in one["reason"] and f"slices {f['first_slice'] + 1}–{f['last_slice'] + 1}" in one["reason"]
    assert one["lesion_slices"] == two["lesion_slices"]  # the second focus lies on slices the first already marks
    code = main(["analyze", str(tmp_path / "one")])
    out = capsys.readouterr().out
    assert code == 0 and "NEGATIVE" in out and "a single focal lesion" in out


def test_mixed_folder_rejects_with_reasons(phantom_dir, tmp_path, capsys):
    d = tmp_path / "mixed"
    shutil.copytree(phantom_dir, d / "series")
    (d / "notes.txt").write_text("hello")
    (d / "junk.dcm").write_bytes(b"\x00" * 300)
    code, objs = run_json(capsys, d)
    assert code == 0
    reasons = {Path(r["file"]).name: r["reason"] for o in objs for r in o["rejected"]}
    assert "not a DICOM" in reasons["notes.txt"] and "junk.dcm" in reasons
    # the table lists the broken slice and sums up the documents beside the series (JSON lists both)
    (d / "LICENSE").write_text("terms")
    assert main(["analyze", str(d)]) == 0
    out = capsys.readouterr().out
    assert "1 file(s) rejected:" in out and "junk.dcm: " in out and "notes.txt" not in out
    assert "2 other file(s) skipped, not DICOM: " in out and "txt 1" in out and "LICENSE 1" in out


def test_cut_short_copy_of_a_slice_is_rejected_and_the_intact_one_kept(phantom_dir, tmp_path, capsys):
    d = tmp_path / "series"
    shutil.copytree(phantom_dir, d)
    src = sorted(d.glob("*.dcm"))[10]
    (d / "a-cut.dcm").write_bytes(src.read_bytes()[:200_000])  # sorts first, same SOP instance as src
    code, objs = run_json(capsys, d)
    assert code == 0 and objs[0]["slices"] == 24 and objs[0]["gaps"] == 0
    (r,) = objs[0]["rejected"]
    assert Path(r["file"]).name == "a-cut.dcm" and "cut short" in r["reason"]


def test_nothing_usable_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x")
    assert main(["analyze", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable CT series" in err[0] and "not a DICOM" in err[0]
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_crop_image_folder_skips_valid_area(tmp_path, capsys):
    from appliance.imaging import to_uint8, window
    from appliance.phantom import PhantomSpec, phantom_series
    from appliance.pipeline.classic_lung import lung_mask, mask_box

    d = tmp_path / "patient1"
    d.mkdir()
    spec = PhantomSpec(slices=12)
    k = 0
    for hu in phantom_series(spec):
        box = mask_box(lung_mask(hu, spec.spacing_mm ** 2), 0.03)
        if box:
            y0, x0, y1, x1 = box
            k += 1
            Image.fromarray(to_uint8(window(hu[y0:y1, x0:x1]))).save(d / f"slice_{k}.png")
    code, objs = run_json(capsys, d)
    assert code == 0 and objs[0]["kind"] == "images" and objs[0]["slices"] == k
    assert objs[0]["timings"]["ms_per_slice"]["valid_area"] == 0
    # crops follow the daemon's rule: fewer than min_slices (20) is indeterminate, never negative
    assert k < 20 and objs[0]["result"] in ("indeterminate", "positive"), objs[0]["result"]
    for extra in list(d.glob("*.png"))[1:]:
        extra.unlink()
    code, objs = run_json(capsys, d)
    assert code == 0 and objs[0]["slices"] == 1 and objs[0]["result"] == "indeterminate"
    assert "fewer than the 20" in objs[0]["reason"]


def test_a_lone_slice_whose_pixel_data_is_short_exits_2(phantom_dir, tmp_path, capsys):
    import pydicom

    ds = pydicom.dcmread(sorted(phantom_dir.glob("*.dcm"))[3])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(tmp_path / "short.dcm")
    assert main(["analyze", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable CT series" in err[0] and "header and pixels disagree" in err[0], err


def test_overlays_written_for_lesion_slices(phantom_dir, tmp_path, capsys):
    code, objs = run_json(capsys, phantom_dir, "--overlays", tmp_path / "ov")
    assert code == 0
    pngs = sorted((tmp_path / "ov").rglob("*.png"))
    assert len(pngs) == objs[0]["lesion_slices"]
    for p in pngs[:2]:
        im = np.asarray(Image.open(p))
        assert im.ndim == 3 and (im[..., 0] > 200).any()  # red-ish boxes drawn


@pytest.mark.skipif(len(available_backends()) < 2, reason="needs both backends")
def test_backends_agree_on_results(phantom_dir, capsys):
    res = {}
    for be in available_backends():
        _, objs = run_json(capsys, phantom_dir, "--backend", be)
        res[be] = (objs[0]["result"], objs[0]["lung_slices"], objs[0]["backend"])
    (a, la, _), (b, lb, _) = res.values()
    assert a == b and abs(la - lb) <= 1


def test_console_script_runs_without_traceback(tmp_path):
    (tmp_path / "x.dcm").write_bytes(b"garbage")
    p = subprocess.run([sys.executable, "-m", "appliance.cli", "analyze", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_real_zoo_every_file_analysed_or_rejected(capsys):
    zoo = shared_data("dicom-ct-zoo")
    code, objs = run_json(capsys, zoo)
    assert code == 0
    files = {str(p) for p in zoo.rglob("*") if p.is_file()}
    analysed = sum(o["slices"] for o in objs if o["kind"] == "dicom")
    rejected = {r["file"] for o in objs for r in o["rejected"]}
    assert analysed + len(rejected) == len(files)
    assert all(len(r["reason"]) > 8 for o in objs for r in o["rejected"])


def test_real_series_a0001(capsys):
    d = shared_data("lung-pet-ct-dx-A0001")
    code, objs = run_json(capsys, d)
    assert code == 0 and len(objs) == 1
    o = objs[0]
    assert o["slices"] == 64 and o["lung_slices"] >= 40 and o["spacing_mm"] == pytest.approx(5.0)
    # the lung cancer is not called positive; its single focal lesion is named for people: the patient's side and
    # zone, posterior, and its size from the DICOM pixel size (the tumour and its rim: several centimetres)
    assert o["result"] == "negative" and o["focal"] is not None
    m = re.search(r"a solid mass, about (\d+) mm across and (\d+) mm long, patient's left upper zone, "
                  r"posterior \(image lower-right", o["reason"])
    assert m and 40 <= int(m.group(1)) <= 90 and 30 <= int(m.group(2)) <= 70, o["reason"]
    # named a mass: the halo wraps the tumour's soft-tissue core (appliance/pipeline/halo_core.py)
    assert "soft-tissue core" in o["reason"] and [x["kind"] for x in o["others"]] == ["mass"]
    assert o["others"][0]["text"].startswith("solid mass") and "solid mass" in o["grade"]["reasons"]


def _read_volume(src: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """(HU volume in z order, z positions, pixel size) of the one series under `src`."""
    import pydicom

    ds = sorted((pydicom.dcmread(f) for f in src.rglob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2]))
    vol = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in ds]).astype(np.float32)
    return vol, np.array([float(d.ImagePositionPatient[2]) for d in ds]), float(ds[0].PixelSpacing[0])


def _write_volume(vol: np.ndarray, z: np.ndarray, px: float, dst: Path, description: str) -> None:
    from appliance.phantom import ct_slice_dataset

    thickness = float(np.median(np.diff(z)))
    for k in range(len(vol)):
        ct_slice_dataset(vol[k], study_uid="2.25.1", series_uid="2.25.2", instance=k + 1, z_mm=float(z[k]),
                         spacing_mm=(px, px), thickness_mm=thickness,
                         description=description).save_as(dst / f"IM{k + 1:04d}.dcm", enforce_file_format=True)


def _paste_ground_glass(src: Path, dst: Path, first: int, count: int) -> None:
    """The series of `src` rewritten to `dst` with a ground-glass patch (−620 HU blended into aerated lung, 17–28 mm,
    textured) on `count` slices from z-sorted index `first`, in the lung on the image's left (the patient's right)."""
    from scipy import ndimage

    vol, z, px = _read_volume(src)
    mid = vol[first + count // 2]
    lab, n = ndimage.label(ndimage.binary_opening((mid > -1000) & (mid < -500), iterations=3))
    sizes = ndimage.sum(lab > 0, lab, range(1, n + 1))
    lungs = [lab == i + 1 for i in np.argsort(sizes)[::-1][:2]]
    lung = min(lungs, key=lambda m: np.nonzero(m)[1].mean())  # the image's left one
    ys, xs = np.nonzero(ndimage.distance_transform_edt(lung) > 8 / px)
    cy, cx = ys[np.argmax(ys)], xs[np.argmax(ys)]  # posterior, at least 8 mm inside the lung
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:mid.shape[0], :mid.shape[1]]
    for k in range(first, first + count):
        f = 1 - abs(k - (first + (count - 1) / 2)) / (count / 2 + 0.5)
        tex = ndimage.gaussian_filter(rng.normal(0, 1, mid.shape), 2.0)
        a = np.clip(1.2 - np.hypot(yy - cy, xx - cx) / (14.0 * (0.6 + 0.4 * f) / px) + 0.25 * tex / tex.std(), 0, 1)
        a = ndimage.gaussian_filter(a, 1.5)
        vol[k] = np.where(vol[k] < -500, vol[k] * (1 - a) - 620.0 * a, vol[k])
    _write_volume(vol, z, px, dst, "patch")


def test_real_series_a0001_beside_a_ground_glass_patch_is_a_mass_and_one_focal_lesion(capsys, tmp_path):
    """A lung cancer beside one stray ground-glass patch (pasted into the other lung of A0001 on 4 slices): two foci
    by the count, so the foci rule alone called it positive. The tumour's focus wraps a mass-sized soft-tissue core
    (appliance/pipeline/mass_foci.py): it is the mass, named, and the patch is one focal lesion — negative."""
    _paste_ground_glass(shared_data("lung-pet-ct-dx-A0001"), tmp_path, 40, 4)
    code, objs = run_json(capsys, tmp_path)
    assert code == 0 and len(objs) == 1
    o = objs[0]
    assert o["result"] == "negative" and o["foci"] == 1 and o["evidence"] is None, o["reason"]
    assert o["reason"].startswith("a solid mass, about") and "patient's left upper zone" in o["reason"]
    assert "; a single focal lesion, about" in o["reason"] and "patient's right" in o["reason"].split(";")[1]
    assert [x["kind"] for x in o["others"]] == ["mass"] and o["focal"]["quadrant"] == "lower-right"
    # the key image is the mass the verdict names first, not the (brighter) patch
    assert o["focal"]["first_slice"] <= o["key_slices"][0]["index"] <= o["focal"]["last_slice"]
    assert "lower-right" in o["key_slices"][0]["quadrants"]
    cfg = tmp_path.parent / "stage-off.toml"  # the other-findings stage off: every focus counts
    cfg.write_text("[analysis]\nother_findings = false\n")
    code, objs = run_json(capsys, tmp_path, "--config", cfg)
    assert code == 0 and objs[0]["result"] == "positive" and objs[0]["foci"] == 2 and objs[0]["others"] == []


def test_real_series_a0001_on_thin_slices_is_a_mass_and_faint_foci(capsys, tmp_path):
    """A0001 resampled to 1.25 mm (linear between its 5 mm slices): the tumour's focus is the mass (named, not
    counted), and what else the model boxes are faint foci — a single 5 mm slice's stray box spread over thin slices,
    peaking at 0.5-0.7. Without a confident focus there is no COVID-19 pattern: negative, both said."""
    vol, z, px = _read_volume(shared_data("lung-pet-ct-dx-A0001"))
    nz = np.arange(z[0], z[-1] + 1e-3, 1.25)
    at = np.interp(nz, z, np.arange(len(z)))
    lo = np.floor(at).astype(int)
    hi, w = np.minimum(lo + 1, len(z) - 1), (at - lo)[:, None, None]
    _write_volume((vol[lo] * (1 - w) + vol[hi] * w).astype(np.float32), nz, px, tmp_path, "1.25 mm")
    code, objs = run_json(capsys, tmp_path)
    assert code == 0 and len(objs) == 1
    o = objs[0]
    assert o["slices"] == len(nz) and o["result"] == "negative", o["reason"]
    assert o["reason"].startswith("a solid mass, about") and [x["kind"] for x in o["others"]] == ["mass"]
    m = re.search(r"; (\d+) lesion foci, all faint \(the most confident peaks at (0\.\d+), below 0\.8\)", o["reason"])
    assert m and int(m.group(1)) == o["foci"] >= 2 and float(m.group(2)) < 0.8, o["reason"]


def test_real_series_a0001_with_dependent_density_is_never_a_plain_covid_positive(capsys, tmp_path):
    """A0001 (lung cancer) with a band of dependent density along the posterior pleura of both lower lungs
    (models.dependent_density, 300 HU at the pleura): the lesion model reads the band as ground glass, so the
    series may come out positive (a measured risk: models/LESION2.md). What must hold: the tumour is still named a
    mass, and a positive is graded atypical with the prone-images advice — never a plain typical COVID-19 flag."""
    from models.dependent_density import write_dependent

    write_dependent(shared_data("lung-pet-ct-dx-A0001"), tmp_path, 300.0)
    code, objs = run_json(capsys, tmp_path)
    assert code == 0 and len(objs) == 1
    o = objs[0]
    assert [x["kind"] for x in o["others"]] == ["mass"], o["others"]
    if o["result"] == "positive":
        g = o["grade"]
        assert g["category"] == "atypical" and "solid mass" in g["reasons"], g
        assert g["posterior_pct"] >= 75 and any("prone images" in r for r in g["reasons"]), g
    else:
        assert o["result"] == "negative" and o["reason"].startswith("a solid mass, about"), o["reason"]


def test_two_series_of_one_study_get_the_studys_call(tmp_path, capsys):
    """A folder with a positive and a negative series of one study: each series keeps its own result, and the study's
    call — what the appliance publishes — is positive, led by the positive series; a lone series has no study line."""
    from appliance.phantom import PhantomSpec, write_phantom

    base = dict(slices=24, size=256, spacing_mm=1.4, seed=7)
    write_phantom(tmp_path / "study" / "a", PhantomSpec(**base, lesion=True), study_uid="1.2.3.4", series_number=1)
    write_phantom(tmp_path / "study" / "b", PhantomSpec(**base, lesion=False), study_uid="1.2.3.4", series_number=2)
    _, objs = run_json(capsys, tmp_path / "study")
    by = {o["result"]: o for o in objs}
    assert set(by) == {"positive", "negative"}, [o["result"] for o in objs]
    assert by["positive"]["study_key"] == by["negative"]["study_key"]
    for o in objs:
        assert o["study"] == {"result": "positive", "series": 2, "lead_series_key": by["positive"]["series_key"],
                              "notes": []}
    assert main(["analyze", str(tmp_path / "study")]) == 0
    out = capsys.readouterr().out
    assert f"study {by['positive']['study_key'][:10]} (2 series): POSITIVE, the study's call (lead series " \
           f"{by['positive']['series_key'][:10]})" in out
    _, (lone,) = run_json(capsys, tmp_path / "study" / "a")
    assert "study" not in lone
    assert main(["analyze", str(tmp_path / "study" / "a")]) == 0 and "the study's call" not in capsys.readouterr().out
