"""Evaluation: metric definitions on hand-computed cases, the exact threshold sweep, and `ctriage evaluate` end to end
on a generated dataset (phantom lung-window crops with masks + a phantom DICOM patient) and on a few real slices."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from appliance.domain import Rect
from appliance.evaluate import DatasetError, find_patients
from appliance.metrics import (Confusion, auc, bootstrap_mean_ci, component_score, confusion, dice, iou,
                               predicted_mask, sweep)

from .conftest import shared_data

# ------------------------------------------------------------------------------------------ metric definitions


def test_table3_hand_computed():
    # 6 positives (4 found), 10 negatives (1 false alarm)
    truth = [True] * 6 + [False] * 10
    called = [True, True, True, True, False, False] + [True] + [False] * 9
    m = confusion(truth, called).metrics()
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (4, 2, 1, 9)
    assert m["sensitivity"] == round(4 / 6, 4)
    assert m["specificity"] == 0.9
    assert m["accuracy"] == round(13 / 16, 4)
    assert m["ppv"] == 0.8
    assert m["npv"] == round(9 / 11, 4)


def test_undefined_ratios_are_none():
    m = confusion([True, True], [False, False]).metrics()  # no negatives, nothing called positive
    assert m["sensitivity"] == 0.0 and m["npv"] == 0.0 and m["accuracy"] == 0.0
    assert m["specificity"] is None and m["ppv"] is None
    e = Confusion().metrics()
    assert all(e[k] is None for k in ("sensitivity", "specificity", "accuracy", "ppv", "npv"))
    assert json.loads(json.dumps(e))["ppv"] is None  # → null


def test_perfect_calls():
    m = confusion([True, False, True, False], [True, False, True, False]).metrics()
    assert all(m[k] == 1.0 for k in ("sensitivity", "specificity", "accuracy", "ppv", "npv"))
    with pytest.raises(ValueError):
        confusion([True], [True, False])


def test_dice_and_iou():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    assert dice(a, b) == 1.0 and iou(a, b) == 1.0  # both empty
    a[0:2, 0:5] = True  # 10 px
    assert dice(a, b) == 0.0 and iou(a, b) == 0.0
    b[0:2, 0:10] = True  # 20 px, 10 shared
    assert dice(a, b) == pytest.approx(2 * 10 / 30)
    assert iou(a, b) == pytest.approx(10 / 20)
    with pytest.raises(ValueError):
        dice(a, np.zeros((5, 5), bool))


def test_predicted_mask_pastes_into_the_lung_box():
    prob = np.zeros((8, 8), np.float32)
    prob[:, :4] = 0.9  # left half of the box
    m = predicted_mask(prob, Rect(10, 20, 26, 36), (40, 50), 0.5)
    assert m.shape == (40, 50)
    ys, xs = np.nonzero(m)
    assert ys.min() == 10 and ys.max() == 25 and xs.min() == 20 and xs.max() <= 28
    assert not m[:, 30:].any() and not m[:10].any()
    assert not predicted_mask(None, Rect(0, 0, 5, 5), (10, 10), 0.5).any()
    assert not predicted_mask(prob, None, (10, 10), 0.5).any()


def test_component_score_follows_the_area_rule():
    p = np.zeros((32, 32), np.float32)
    p[2:4, 2:4] = 0.95  # 4 px: too small alone
    p[10:16, 10:16] = 0.6  # 36 px
    p[12:14, 12:14] = 0.8  # its 4-px core
    # area rule "> 25 px" with 1 px = 1 unit: the 36-px component qualifies at 0.6, nothing above it does
    assert component_score(p, 1.0, 25) == pytest.approx(0.6)
    assert component_score(p, 10.0, 25) == pytest.approx(0.95)  # 1 px = 10 units: 4 px × 10 = 40 > 25
    # 1 px = 0.5 units: 51 px needed; only "everything ≥ 0" is that large
    assert component_score(p, 0.5, 25) == 0.0
    # the exactness property: for every threshold t, "score ≥ t" ⇔ some component of {p ≥ t} passes the rule
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    q = ndi.gaussian_filter(rng.random((48, 48)), 2.0).astype(np.float32)
    q = (q - q.min()) / (q.max() - q.min())
    s = component_score(q, 1.0, 25)
    for t in np.unique(q)[::7]:
        lab, n = ndi.label(q >= t)
        passes = n > 0 and np.bincount(lab.ravel())[1:].max() > 25
        assert passes == (s >= t)


def test_component_score_edge_cases():
    assert component_score(None, 1.0, 25) == 0.0
    assert component_score(np.full((4, 4), 0.9, np.float32), 1.0, 25) == 0.0  # 16 px can never pass
    assert component_score(np.full((8, 8), 0.9, np.float32), 1.0, 25) == pytest.approx(0.9)


def test_sweep_and_auc():
    pts = sweep([0.9, 0.8, 0.3, 0.1], [True, True, False, False])
    assert math.isinf(pts[0]["threshold"]) and pts[0]["tp"] == 0 and pts[0]["fp"] == 0
    assert [p["threshold"] for p in pts[1:]] == [0.9, 0.8, 0.3, 0.1]
    at8 = pts[2]
    assert (at8["tp"], at8["fp"], at8["tn"], at8["fn"]) == (2, 0, 2, 0)
    assert pts[-1]["fpr"] == 1.0 and pts[-1]["tpr"] == 1.0
    assert auc(pts) == pytest.approx(1.0)
    # one positive scored below one negative: AUC = 3/4
    assert auc(sweep([0.9, 0.2, 0.5, 0.1], [True, True, False, False])) == pytest.approx(0.75)
    # ties: one point for a shared score
    assert len(sweep([0.5, 0.5], [True, False])) == 2
    assert auc(sweep([0.5, 0.4], [True, True])) is None  # no negatives: no ROC


def test_evaluation_aggregates_hand_made_results():
    from appliance.domain import Box, SliceFinding
    from appliance.evaluate import Evaluation, ImageResult, PatientResult, PatientSource

    box = Box(Rect(1, 1, 5, 5), 30.0, 0.9, "upper-left")

    def img(group, truth, called, dice_=None, mask_empty=None, pred_empty=None):
        f = SliceFinding("k", 0.0, (8, 8), Rect(0, 0, 8, 8), [box] if called else [])
        return ImageResult("p", group, "k.png", "images", 0, f, 0.9 if called else 0.1, truth, None, mask_empty,
                           dice_, dice_, pred_empty)

    images = [img("covid", True, True, 0.5, False, False), img("covid", True, False, 0.0, False, True),
              img("covid", None, False, 1.0, True, True),  # empty mask: excluded, Dice 1 (both empty)
              img("covid", True, True),  # no mask: a positive, no Dice
              img("control", False, True, 0.0, True, False), img("control", False, False)]
    pats = [PatientResult(PatientSource("covid", "a", Path("a"), None), "positive", None,
                          {"quadrant": "upper-left", "first_slice": 0, "last_slice": 2, "run": 3}, 1, 4, 2),
            PatientResult(PatientSource("control", "b", Path("b"), None), "indeterminate", "why", None, 1, 2, 1)]
    ev = Evaluation(images, pats, "openvino", "int8", "CPU", [], 0.5, 25.0, 0.6)
    d = ev.as_dict()
    pi = d["per_image"]
    assert (pi["tp"], pi["fn"], pi["fp"], pi["tn"], pi["excluded"], pi["images"]) == (2, 1, 1, 1, 1, 6)
    assert pi["sensitivity"] == round(2 / 3, 4) and pi["specificity"] == 0.5
    pp = d["per_patient"]
    assert (pp["tp"], pp["fn"], pp["fp"], pp["tn"]) == (1, 0, 0, 1)  # indeterminate = a negative call
    ci = d["dice"].pop("ci95")
    assert [i["dice"] for i in d["dice"].pop("images")] == [0.5, 0.0, 1.0, 0.0]
    assert d["dice"] == {"mean": round((0.5 + 0 + 1 + 0) / 4, 4), "n": 4, "iou_mean": round(1.5 / 4, 4),
                         "both_empty": 1, "lesion_mean": 0.25, "lesion_n": 2}
    assert 0.0 <= ci[0] < 0.375 < ci[1] <= 1.0  # four images: a wide interval around the mean
    assert d["ms_per_slice"] == 100.0
    assert [p["patient"] for p in d["patients"]] == ["a", "b"] and d["patients"][1]["reason"] == "why"
    json.dumps(d)


def test_bootstrap_interval_of_a_mean():
    assert bootstrap_mean_ci([0.7]) is None and bootstrap_mean_ci([]) is None  # one image: no interval
    assert bootstrap_mean_ci([0.6] * 10) == pytest.approx((0.6, 0.6))
    coin = [0.0, 1.0] * 50  # mean 0.5, standard error 0.05: the 95 % interval is about ±0.1
    lo, hi = bootstrap_mean_ci(coin)
    assert 0.38 < lo < 0.42 and 0.58 < hi < 0.62
    few = bootstrap_mean_ci(coin[:10])
    assert few[0] < lo and few[1] > hi  # fewer images, a wider interval
    spread = list(np.random.default_rng(0).uniform(0.4, 0.9, 10))
    assert bootstrap_mean_ci(spread) == bootstrap_mean_ci(spread)  # seeded: a report is reproducible
    assert bootstrap_mean_ci(spread, seed=3) != bootstrap_mean_ci(spread, seed=4)
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean_ci(coin, level=95)


def test_report_without_masks_says_so_instead_of_an_empty_histogram():
    from appliance.domain import SliceFinding
    from appliance.evaluate import Evaluation, ImageResult, PatientResult, PatientSource
    from appliance.pipeline.case_logic import CaseRule
    from appliance.report import build_html

    f = SliceFinding("k", 0.0, (8, 8), Rect(0, 0, 8, 8), [])
    images = [ImageResult("b", "control", "k.png", "images", 0, f, 0.1, False)]
    pats = [PatientResult(PatientSource("control", "b", Path("b"), None), "negative", None, None, 1, 1, 0)]
    ev = Evaluation(images, pats, "openvino", "int8", "CPU", [], 0.3, 25.0, 0.1, 0.3,
                    CaseRule.chen2020().describe())
    page = build_html(ev, ev.as_dict())
    assert "Dice not computed" in page and 'alt="Dice histogram"' not in page
    assert "peaking at" not in page  # the peak gate equals the threshold: nothing more to say
    assert "3 consecutive slices with lesion in one quadrant" in page and "foci" not in page


# ------------------------------------------------------------------------------------------ dataset layout


def test_layout_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        find_patients(tmp_path / "nope")
    with pytest.raises(DatasetError, match="covid/<patient>/"):
        find_patients(tmp_path)
    (tmp_path / "covid").mkdir()
    (tmp_path / "covid" / "x.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="holds files directly"):
        find_patients(tmp_path)
    (tmp_path / "covid" / "x.png").unlink()
    with pytest.raises(DatasetError, match="no patient folders"):
        find_patients(tmp_path)
    (tmp_path / "covid" / "p1").mkdir()
    (tmp_path / "control" / "p1").mkdir(parents=True)
    with pytest.raises(DatasetError, match="both"):
        find_patients(tmp_path)
    (tmp_path / "control" / "p1").rmdir()
    (tmp_path / "control" / "p2").mkdir()
    (tmp_path / "masks" / "p1").mkdir(parents=True)
    ps = find_patients(tmp_path)
    assert [(p.group, p.name, p.masks is not None) for p in ps] == [("covid", "p1", True), ("control", "p2", False)]


# ------------------------------------------------------------------------------------------ generated dataset


def phantom_crops(spec) -> list[tuple[np.ndarray, np.ndarray]]:
    """Lung-window lung-box crops (uint8) of a phantom series and their lesion masks (the phantom's ground-glass)."""
    from appliance.imaging import to_uint8, window
    from appliance.phantom import phantom_series
    from appliance.pipeline.classic_lung import lung_mask, mask_box

    out = []
    for hu in phantom_series(spec):
        box = mask_box(lung_mask(hu, spec.spacing_mm ** 2), 0.04)
        if box is None:
            continue
        y0, x0, y1, x1 = box
        c = hu[y0:y1, x0:x1]
        out.append((to_uint8(window(c)), (c > -650) & (c < -150)))  # lung ≈ -860, vessels/tissue ≥ 0
    return out


def make_dataset(root: Path, phantom_dir: Path) -> dict:
    """covid/crops-a (crops with masks), control/crops-b (crops without lesion, masks all empty), covid/ct-1 (the
    phantom DICOM series, via symlinks, with masks drawn from the same phantom)."""
    from appliance.phantom import PhantomSpec, phantom_series

    info = {}
    spec = PhantomSpec(slices=14, size=256, spacing_mm=1.4, lesion_slices=(0.3, 0.8), seed=3)
    crops = phantom_crops(spec)
    (root / "covid" / "crops-a").mkdir(parents=True)
    (root / "masks" / "crops-a").mkdir(parents=True)
    for i, (img, m) in enumerate(crops):
        Image.fromarray(img).save(root / "covid" / "crops-a" / f"s{i + 1}.png")
        Image.fromarray(m.astype(np.uint8) * 255).save(root / "masks" / "crops-a" / f"s{i + 1}.png")
    info["crops-a"] = (len(crops), sum(bool(m.any()) for _, m in crops))
    neg = phantom_crops(PhantomSpec(slices=10, size=256, spacing_mm=1.4, lesion=False, seed=5))
    (root / "control" / "crops-b").mkdir(parents=True)
    (root / "masks" / "crops-b").mkdir(parents=True)
    for i, (img, m) in enumerate(neg):
        Image.fromarray(img).save(root / "control" / "crops-b" / f"n{i + 1}.jpg", quality=95)
        Image.fromarray(np.zeros(img.shape, np.uint8)).save(root / "masks" / "crops-b" / f"n{i + 1}.png")
    info["crops-b"] = (len(neg), 0)
    # the phantom DICOM patient (conftest's phantom_dir: PhantomSpec(slices=24)), masks from the same HU
    (root / "covid" / "ct-1").mkdir(parents=True)
    (root / "masks" / "ct-1").mkdir(parents=True)
    files = sorted(phantom_dir.glob("*.dcm"))
    hus = phantom_series(PhantomSpec(slices=24))
    lesion = 0
    for f, hu in zip(files, hus):
        (root / "covid" / "ct-1" / f.name).symlink_to(f)
        m = (hu > -650) & (hu < -150)
        lesion += bool(m.any())
        Image.fromarray(m.astype(np.uint8) * 255).save(root / "masks" / "ct-1" / f"{f.stem}.png")
    info["ct-1"] = (len(files), lesion)
    return info


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from appliance.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def generated(tmp_path_factory, phantom_dir):
    root = tmp_path_factory.mktemp("dataset")
    return root, make_dataset(root, phantom_dir)


def test_evaluate_generated_dataset_json_and_report(generated, tmp_path, capsys):
    root, info = generated
    report = tmp_path / "report"
    rc, out, err = run_cli(["evaluate", str(root), "--json", "--report", str(report)], capsys)
    assert rc == 0, err
    d = json.loads(out)
    for part in ("per_image", "per_patient"):
        assert set(d[part]) >= {"sensitivity", "specificity", "accuracy", "ppv", "npv", "tp", "fp", "tn", "fn"}
    assert set(d) >= {"per_image", "per_patient", "dice", "backend", "precision", "bundles", "ms_per_slice", "patients"}
    assert {b["name"] for b in d["bundles"]} == {"valid-area", "lesion"}
    n_images = sum(n for n, _ in info.values())
    with_lesion = sum(k for _, k in info.values())
    pi, pp = d["per_image"], d["per_patient"]
    # every slice is an image; COVID images with an empty mask are excluded, the rest are counted once
    assert pi["images"] == n_images
    excluded = (info["crops-a"][0] - info["crops-a"][1]) + (info["ct-1"][0] - info["ct-1"][1])
    assert pi["excluded"] == excluded
    assert pi["tp"] + pi["fn"] == with_lesion
    assert pi["tn"] + pi["fp"] == info["crops-b"][0]
    assert pp["tp"] + pp["fn"] == 2 and pp["tn"] + pp["fp"] == 1
    for part in (pi, pp):
        n = part["tp"] + part["fp"] + part["tn"] + part["fn"]
        assert part["accuracy"] == round((part["tp"] + part["tn"]) / n, 4)
    # Dice: every image has a mask here
    assert d["dice"]["n"] == n_images
    assert 0.0 <= d["dice"]["mean"] <= 1.0 and 0.0 <= d["dice"]["iou_mean"] <= d["dice"]["mean"] + 1e-9
    assert d["dice"]["both_empty"] <= n_images - with_lesion
    assert d["dice"]["lesion_n"] == with_lesion and 0.0 <= d["dice"]["lesion_mean"] <= 1.0
    pats = {p["patient"]: p for p in d["patients"]}
    assert set(pats) == {"crops-a", "crops-b", "ct-1"}
    assert pats["crops-b"]["group"] == "control" and pats["ct-1"]["group"] == "covid"
    for name, (n, _) in info.items():
        assert pats[name]["slices"] == n
        assert pats[name]["result"] in ("positive", "negative", "indeterminate")
        assert 0 <= pats[name]["lesion_slices"] <= n
        ev = pats[name]["evidence"]
        assert (ev is not None) == (pats[name]["result"] == "positive")
        if pats[name]["focal"] is not None:  # a single focus is only ever reported on a negative, with its note
            assert pats[name]["result"] == "negative" and "single focal lesion" in pats[name]["reason"]
        if ev:
            assert ev["run"] >= 3 and ev["last_slice"] - ev["first_slice"] + 1 == ev["run"]
        run = ev or pats[name]["focal"]  # the slice that decided it: inside the run (1-based), named
        if run:
            first = pats[name]["deciding"][0]
            assert run["first_slice"] + 1 <= first["slice"] <= run["last_slice"] + 1 and "slices" in first["what"]
        else:
            assert pats[name]["deciding"] == [] or pats[name]["others"]
    assert d["ms_per_slice"] > 0
    # the report: a self-contained page with the plots, the per-patient table and metrics.json = --json
    page = (report / "index.html").read_text()
    imgs = re.findall(r'<img alt="([^"]*)"[^>]*src="data:image/png;base64,', page)
    assert {"ROC curve", "Dice histogram", "sensitivity and specificity over the threshold"} <= set(imgs)
    assert "<h2>Patients</h2>" in page
    deciding = page.split("<h2>Deciding slices</h2>")[1].split("<h2>")[0]
    for name in ("crops-a", "crops-b", "ct-1"):  # one picture per patient whose call a run (or focus) decided
        shown = f"<figcaption>{name} · {pats[name]['result'].upper()} · slice " in deciding
        assert shown == bool(pats[name]["deciding"]), name
    assert any(pats[n]["deciding"] for n in pats)
    for name in ("crops-a", "crops-b", "ct-1"):
        assert f"<td>{name}</td>" in page
    assert 'src="http' not in page and "<script" not in page
    assert json.loads((report / "metrics.json").read_text())["per_image"] == pi
    # the rules the counts rest on, as configured: the box's peak gate and the whole case rule
    assert f"peaking at ≥ {d['min_score']:g}" in page and d["min_score"] > d["threshold"]
    assert "3 consecutive slices with lesion in one quadrant" in page and "at least 2 separate lesion foci" in page


def test_deciding_slices_pick_the_largest_box_and_name_the_focal_mass():
    from appliance.domain import Box, Evidence, Rect, SeriesVerdict, SliceFinding
    from appliance.evaluate import deciding_slices

    def f(i, *boxes):
        return SliceFinding(f"s{i}.dcm", -i, (512, 512), Rect(0, 0, 512, 512),
                            [Box(Rect(*r), 50.0, 0.9, q) for q, r in boxes])
    lr, ul = "lower-right", "upper-left"
    ordered = [f(i) for i in range(30)]
    ordered[10:14] = [f(10, (lr, (300, 300, 320, 320))), f(11, (lr, (300, 300, 350, 350)), (ul, (10, 10, 200, 200))),
                      f(12, (lr, (300, 300, 330, 330))), f(13)]
    focal = Evidence(lr, 10, 12, 3)
    mass = {"kind": "mass", "first_slice": 10, "last_slice": 12, "quadrant": lr, "zone": "upper",
            "diameter_mm": 35.0, "text": "solid mass 35 mm, patient's left upper zone — not a COVID-19 pattern"}
    nodule = dict(mass, kind="nodule", first_slice=20, last_slice=22, text="solid nodule 12 mm")
    ordered[21] = f(21, (ul, (100, 100, 120, 120)))
    v = SeriesVerdict("negative", "final", None, 30, 30, 4, focal=focal, others=[mass, nodule])
    d = deciding_slices(v, ordered)
    # the focal lesion's largest box in its own quadrant (slice 12, 1-based), named the mass it is; the nodule apart
    assert [(x["index"], x["key"]) for x in d] == [(11, "s11.dcm"), (21, "s21.dcm")]
    assert d[0]["what"] == "solid mass 35 mm, patient's left upper zone — not a COVID-19 pattern: slices 11–13"
    assert d[1]["what"] == "solid nodule 12 mm: slices 21–23"
    plain = deciding_slices(SeriesVerdict("negative", "final", None, 30, 30, 4, focal=focal), ordered)
    assert plain == [{"key": "s11.dcm", "index": 11,
                      "what": "the single focal lesion: slices 11–13, image lower-right"}]
    pos = deciding_slices(SeriesVerdict("positive", "final", Evidence(lr, 10, 13, 4), 30, 30, 4), ordered)
    assert pos[0]["index"] == 11 and pos[0]["what"].startswith("the run that fired: slices 11–14")
    assert deciding_slices(SeriesVerdict("negative", "final", None, 30, 30, 0), ordered) == []


def test_documents_beside_the_slices_are_summed_up_apart_from_rejections(phantom_dir, tmp_path, capsys):
    """A downloaded folder holds XML annotations and a licence beside the slices: they are skipped and summed up,
    not counted as rejected files; a broken .dcm still is one."""
    root = tmp_path / "ds"
    ct = root / "covid" / "ct-1"
    ct.mkdir(parents=True)
    for f in sorted(phantom_dir.glob("*.dcm")):
        (ct / f.name).symlink_to(f)
    (ct / "annotation.xml").write_text("<annotation><object>nodule</object></annotation>\n")
    (ct / "LICENSE").write_text("CC BY 4.0\n")
    (ct / "zz-broken.dcm").write_bytes(b"not a slice\n" * 40)
    rc, out, err = run_cli(["evaluate", str(root), "--json"], capsys)
    assert rc == 0, err
    d = json.loads(out)
    [p] = d["patients"]
    assert (p["rejected"], p["skipped"]) == (1, 2)
    assert [Path(r["file"]).name for r in d["rejected"]] == ["zz-broken.dcm"]
    assert sorted(Path(r["file"]).name for r in d["skipped"]) == ["LICENSE", "annotation.xml"]
    rc, out, err = run_cli(["evaluate", str(root)], capsys)
    assert rc == 0, err
    assert "1 file(s) rejected:" in out and "zz-broken.dcm" in out and "annotation.xml" not in out
    assert "2 other file(s) skipped, not DICOM: " in out and "xml 1" in out and "LICENSE 1" in out


def test_a_patient_with_several_series_is_called_by_the_study_verdict(generated, tmp_path, capsys):
    """covid/<patient>/<series>/: one run per sub-folder of crops (here linked folders), the patient's call the
    study verdict over them (positive when any series is), as the appliance publishes it."""
    root, info = generated
    rank = {"indeterminate": 0, "negative": 1, "positive": 2}
    ds = tmp_path / "ds"
    for patient, series in (("both", ("crops-a", "crops-b")), ("a", ("crops-a",)), ("b", ("crops-b",))):
        for name in series:
            (ds / "covid" / patient).mkdir(parents=True, exist_ok=True)
            group = "control" if name == "crops-b" else "covid"
            (ds / "covid" / patient / name).symlink_to(root / group / name, target_is_directory=True)
    rc, out, err = run_cli(["evaluate", str(ds), "--json"], capsys)
    assert rc == 0, err
    pats = {p["patient"]: p for p in json.loads(out)["patients"]}
    assert pats["both"]["series"] == 2 and pats["a"]["series"] == pats["b"]["series"] == 1
    assert pats["both"]["slices"] == info["crops-a"][0] + info["crops-b"][0]
    assert pats["both"]["result"] == max(pats["a"]["result"], pats["b"]["result"], key=rank.__getitem__)


def test_sweep_matches_the_pipeline_calls(generated, tmp_path):
    """At the bundle's own threshold, "score ≥ threshold" reproduces the boxes on crop images (the sweep is exact).

    The sweep is over one variable, so the shipped bundles are copied with the peak-score gate (`min_score`) set to
    the probability threshold: then the boxes depend on the threshold and the area rule only.
    """
    import shutil

    from appliance.config import AnalysisConfig
    from appliance.evaluate import evaluate
    from appliance.inference.bundle import default_bundle_dir, find_bundles
    from appliance.pipeline.analyzer import Analyzer

    root, _ = generated
    for b in find_bundles(default_bundle_dir()).values():
        shutil.copytree(b.path, tmp_path / b.path.name)
    mf = tmp_path / find_bundles(default_bundle_dir())["lesion"].path.name / "manifest.json"
    m = json.loads(mf.read_text())
    m["output"]["min_score"] = m["output"]["threshold"]
    mf.write_text(json.dumps(m))
    an = Analyzer.load(AnalysisConfig(), tmp_path)
    assert an.lesion.min_score == an.lesion.threshold
    ev = evaluate(root, an)
    crops = [r for r in ev.images if r.kind == "images"]
    assert crops
    # prob maps are kept as float16: allow disagreement only right at the threshold
    bad = [r for r in crops if (r.score >= ev.threshold) != r.called and abs(r.score - ev.threshold) > 2e-3]
    assert not bad, [(r.key, r.score, r.called) for r in bad]
    assert all(r.finding.prob is None for r in ev.images)  # maps dropped after scoring


def test_evaluate_table_and_layout_error(generated, tmp_path, capsys):
    root, _ = generated
    rc, out, err = run_cli(["evaluate", str(root)], capsys)
    assert rc == 0, err
    assert "per image" in out and "per patient" in out and "sensitivity" in out and "Dice" in out
    assert "crops-a" in out and "ct-1" in out
    rc, out, err = run_cli(["evaluate", str(tmp_path / "missing")], capsys)
    assert rc == 2 and "no such folder" in err


def test_dice_against_a_baseline_evaluation(generated, tmp_path, capsys):
    """--baseline: the paired Dice difference per image with its bootstrap interval, and what it means in words."""
    root, info = generated
    rc, out, err = run_cli(["evaluate", str(root), "--json"], capsys)
    assert rc == 0, err
    d = json.loads(out)
    ids = [i["image"] for i in d["dice"]["images"]]
    assert len(ids) == len(set(ids)) == d["dice"]["n"] and "crops-a/" in ids[0]
    lo, hi = d["dice"]["ci95"]
    assert lo <= d["dice"]["mean"] <= hi
    same = tmp_path / "same.json"
    same.write_text(out)
    rc, out, err = run_cli(["evaluate", str(root), "--json", "--baseline", str(same)], capsys)
    assert rc == 0, err
    vs = json.loads(out)["dice_vs_baseline"]
    assert vs["n"] == d["dice"]["n"] and vs["difference"] == 0.0 and vs["ci95"] == [0.0, 0.0]
    assert vs["better"] == vs["worse"] == 0 and {b["name"] for b in vs["bundles_baseline"]} == {"valid-area", "lesion"}
    # a weaker baseline on every image but one: this run is better beyond the images' spread
    worse = json.loads(same.read_text())
    for i in worse["dice"]["images"][1:]:
        i["dice"] = max(0.0, i["dice"] - 0.3)
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    report = tmp_path / "report"
    rc, out, err = run_cli(["evaluate", str(root), "--baseline", str(tmp_path / "worse.json"), "--report",
                            str(report)], capsys)
    assert rc == 0, err
    line = next(x for x in out.splitlines() if x.startswith("Dice vs "))
    assert "valid-area" in line and f"over {d['dice']['n']} paired image(s)" in line
    assert "better beyond the images' spread" in line, line
    # the report shows the pairs as a picture and says the same; its metrics.json carries the comparison
    page = (report / "index.html").read_text()
    assert re.search(r'<img alt="Dice per image against the baseline"[^>]*src="data:image/png;base64,', page)
    lowered = sum(i["dice"] > 0 for i in d["dice"]["images"][1:])  # those at 0 stay at 0
    assert "<b>better beyond the images' spread</b>" in page and f"Better on {lowered} image(s), worse on 0" in page
    vs = json.loads((report / "metrics.json").read_text())["dice_vs_baseline"]
    assert vs["better"] == lowered and vs["difference"] > 0 and vs["ci95"][0] > 0
    # the same baseline the other way round reads as worse; a single shared image gives no interval
    one = json.loads(same.read_text())
    one["dice"]["images"] = [dict(one["dice"]["images"][0], dice=1.0)] + [
        dict(i, image="elsewhere/" + i["image"]) for i in one["dice"]["images"][1:]]
    (tmp_path / "one.json").write_text(json.dumps(one))
    rc, out, err = run_cli(["evaluate", str(root), "--json", "--baseline", str(tmp_path / "one.json")], capsys)
    vs = json.loads(out)["dice_vs_baseline"]
    assert rc == 0 and vs["n"] == 1 and vs["ci95"] is None


def test_a_bad_baseline_is_a_clear_error_before_the_models_load(generated, tmp_path, capsys):
    root, _ = generated
    cases = {"missing.json": (None, "cannot read it"), "junk.json": ("{not json", "not JSON"),
             "old.json": ('{"schema": "ctriage.evaluation/1", "dice": {"mean": 0.7, "n": 10}}',
                          "not an evaluation with per-image Dice")}
    for name, (text, message) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        rc, out, err = run_cli(["evaluate", str(root), "--baseline", str(tmp_path / name)], capsys)
        assert rc == 2 and f"--baseline {tmp_path / name}: {message}" in err, err
        assert "Traceback" not in err
    other = {"schema": "ctriage.evaluation/1", "dice": {"images": [{"image": "nobody/x", "dice": 0.5}]}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    rc, out, err = run_cli(["evaluate", str(root), "--baseline", str(tmp_path / "other.json")], capsys)
    assert rc == 2 and "shares no image with a mask with this evaluation: not the same dataset" in err, err


def test_mask_size_mismatch_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "covid" / "p").mkdir(parents=True)
    (tmp_path / "masks" / "p").mkdir(parents=True)
    Image.fromarray(np.full((64, 80), 90, np.uint8)).save(tmp_path / "covid" / "p" / "a.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "masks" / "p" / "a.png")
    rc, out, err = run_cli(["evaluate", str(tmp_path)], capsys)
    assert rc == 2 and "masks/p/a.png: mask is 40×40 but its image a.png is 64×80" in err


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.shared_data
def test_evaluate_real_doctor_labels(tmp_path, capsys):
    """5 radiologist-labelled COVID crops with their masks and 3 non-COVID crops, arranged by symlinks."""
    doc = shared_data("covid-semiseg", "TrainingSet", "LungInfection-Train", "Doctor-label")
    neg = shared_data("sarscov2-ct-noncovid")
    (tmp_path / "covid" / "doc").mkdir(parents=True)
    (tmp_path / "masks" / "doc").mkdir(parents=True)
    (tmp_path / "control" / "neg").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "covid" / "doc" / f"{i}.jpg").symlink_to(doc / "Imgs" / f"{i}.jpg")
        (tmp_path / "masks" / "doc" / f"{i}.png").symlink_to(doc / "GT" / f"{i}.png")
    for i in (1, 2, 3):
        (tmp_path / "control" / "neg" / f"n{i}.png").symlink_to(neg / f"Non-Covid ({i}).png")
    rc, out, err = run_cli(["evaluate", str(tmp_path), "--json"], capsys)
    assert rc == 0, err
    d = json.loads(out)
    assert d["dice"]["n"] == 5 and 0.0 <= d["dice"]["mean"] <= 1.0
    assert d["dice"]["lesion_n"] == 5 - d["per_image"]["excluded"]
    pi = d["per_image"]
    assert pi["tp"] + pi["fn"] + pi["excluded"] == 5 and pi["tn"] + pi["fp"] == 3


def test_a_positive_from_crop_images_says_it_is_not_graded(generated, capsys):
    """Crop images carry no HU: a positive among them has no grade, and the table says why instead of a dash."""
    root, _ = generated
    rc, out, err = run_cli(["evaluate", str(root), "--json"], capsys)
    assert rc == 0, err
    crops = next(p for p in json.loads(out)["patients"] if p["patient"] == "crops-a")
    assert crops["result"] == "positive" and crops["grade"] is None  # the phantom's patches make a run on crops
    rc, out, err = run_cli(["evaluate", str(root)], capsys)
    row = next(line for line in out.splitlines() if line.startswith("crops-a"))
    assert "POSITIVE" in row and "not graded (no HU)" in row
    assert "not graded (no HU: crop images) 1" in out


@pytest.mark.shared_data
def test_prone_images_beside_a_mild_posterior_positive_are_reported_not_obeyed(tmp_path, capsys):
    """COVID-CT-MD P001 (supine, mild, 82 % posterior: its grade advises prone images) with a prone series of the
    same patient: a clear one (a generated lesion-free chest, PatientPosition HFP) adds "prone images: no lesion
    run" to the study's grade; P001's own slices written as prone add "prone images: lesion persists". The study
    stays positive either way: the prone series informs the reader, it does not overrule the flag."""
    import pydicom
    from pydicom.uid import generate_uid

    from appliance.phantom import PhantomSpec, write_phantom
    from appliance.pipeline.case_logic import PRONE_CLEAR, PRONE_PERSISTS

    p001 = shared_data("covid-ct-md", "P001")
    for patient in ("clear", "persists"):
        (tmp_path / "covid" / patient).mkdir(parents=True)
        (tmp_path / "covid" / patient / "supine").symlink_to(p001, target_is_directory=True)
    for path in write_phantom(tmp_path / "covid" / "clear" / "prone", PhantomSpec(slices=12, lesion=False, seed=4)):
        ds = pydicom.dcmread(path)
        ds.PatientPosition = "HFP"
        ds.save_as(path)
    out_dir, series_uid = tmp_path / "covid" / "persists" / "prone", generate_uid()
    out_dir.mkdir()
    for k, f in enumerate(sorted(p001.glob("*.dcm"))):
        ds = pydicom.dcmread(f)
        ds.PatientPosition, ds.SeriesInstanceUID, ds.SOPInstanceUID = "HFP", series_uid, generate_uid()
        ds.save_as(out_dir / f"{k:04d}.dcm")
    rc, out, err = run_cli(["evaluate", str(tmp_path), "--json"], capsys)
    assert rc == 0, err
    pats = {p["patient"]: p for p in json.loads(out)["patients"]}
    for patient, note in (("clear", PRONE_CLEAR), ("persists", PRONE_PERSISTS)):
        p = pats[patient]
        assert p["result"] == "positive" and p["series"] == 2, p
        reasons = p["grade"]["reasons"]
        assert any(r.startswith("posterior ") and "prone images" in r for r in reasons), reasons
        assert reasons[-1] == note, reasons
