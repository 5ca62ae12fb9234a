"""Probe: a bundle set's lesion foci per series — what a second, stray focus would do to the case rule.

    .venv/bin/python -m models.probe_foci [--bundles DIR]
                                          [--only phantom,dicom,pseudo,dependent,noise,emphysema,expiration]
                                          [--seeds 1-10] [--amplitudes 0,150,300,450] [--noise-hu 0,50,100,150]
                                          [--emphysema 0,0.25,0.5,1] [--expiration 1,1.4,1.8]
                                          [--no-density-check] [--precision int8|fp32] [--json]

For each series: the shipped case rule's verdict and, for every focus spanning a qualifying run (after solid
lesions explained theirs), its span, boxed slices, peak score and largest box side (px at 512). The foci tables of
models/LESION2.md come from here.

- phantom: the 24-slice phantom with **one** ground-glass patch (seeds 1–10; `tests/test_cli_analyze.py`'s case):
  one focus is right, a second one is a stray that would make a single lesion look multifocal.
- dicom: the real HU series — COVID-CT-MD P001 and cap001, Lung-PET-CT-Dx A0001, the TB Portals volumes and the
  TotalSegmentator chest crop (NIfTI volumes written as DICOM to a temporary folder; needs nibabel).
- pseudo: the pseudo-labelled COVID-19 patients of COVID-SemiSeg as image series (per-image rule).
- dependent: A0001 (lung cancer) and P001 (COVID-19) with dependent ground-glass density added at the back of both
  lungs (models.dependent_density: a haze around every structure there, then a band along the pleura only;
  `--amplitudes` HU at the border, 0 = as read through the same writer): what gravity-dependent lung on a supine
  scan does to the case rule.
- noise: A0001, P001 and the TotalSegmentator chest crop (1.5 mm, enlarged 2× to 0.75 mm pixels, as a clinical
  512² slice has) with CT noise added (models.scan_noise: `--noise-hu` SD in HU, correlated over about a pixel):
  what a noisier acquisition does, and the noise the appliance measures (`noise` in each row).
- emphysema: the same three series with centrilobular emphysema added (models.emphysema: lucent spheres of 2-6 mm
  radius filling `--emphysema` shares; 0.25 ≈ 10 % of the lung below −950 HU): what a smoker's lungs do.
- expiration: the same three series with the aerated lung scaled towards water (models.expiration: `--expiration`
  factors; 1.4 takes normal lung from −850 to −790 HU, 1.8 to −730): what a scan in expiration does.

Research data is read in place from ../shared/data (or $CTRIAGE_DATA); what is absent is skipped with a reason.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from appliance.config import AnalysisConfig
from appliance.domain import SliceFinding
from appliance.pipeline.analyzer import Analyzer
from appliance.pipeline.case_logic import CaseRule, decide, slices_needed
from appliance.pipeline.foci import focus_members
from appliance.pipeline.solid_lesions import explain_foci
from models.data import DATA
from models.make_series import TB, VOLUMES

DICOM = {"P001": "covid-ct-md/P001", "cap001": "covid-ct-md/cap001", "A0001": "lung-pet-ct-dx-A0001"}
TS_CHEST = VOLUMES["ts-chest"][0]
PSEUDO = DATA / "covid-semiseg/TrainingSet/LungInfection-Train/Pseudo-label/Imgs"


KINDS = ("phantom", "dicom", "pseudo", "dependent", "noise", "emphysema", "expiration")


def _kinds(text: str) -> set[str]:
    kinds = {k.strip() for k in text.split(",") if k.strip()}
    if not kinds or kinds - set(KINDS):
        raise argparse.ArgumentTypeError(f"{text!r}: give some of {', '.join(KINDS)}, comma-separated")
    return kinds


def _seeds(text: str) -> list[int]:
    first, _, last = text.partition("-")
    try:
        seeds = list(range(int(first), int(last or first) + 1))
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"{text!r}: give FIRST-LAST (e.g. 1-10) or one seed")
    return seeds


def foci(findings: list[SliceFinding], rule: CaseRule) -> dict:
    """The verdict and each counted focus spanning a qualifying run (the rule's slices needed)."""
    findings = sorted(findings, key=lambda f: f.position)
    v = decide(findings, rule)
    need = slices_needed(findings, rule.min_run, rule.min_run_mm)
    counted, _ = explain_foci(findings, rule.gap_factor)
    rows = []
    for m in focus_members(counted, rule.gap_factor):
        sl = sorted({i for i, _ in m})
        if sl[-1] - sl[0] + 1 < need:
            continue
        boxes = [(counted[i].boxes[j], counted[i].shape) for i, j in m]
        rows.append({"first": sl[0], "last": sl[-1], "boxed": len(sl),
                     "peak": round(max(b.score for b, _ in boxes), 2),
                     "side": round(max(max(b.rect.height, b.rect.width) * 512 / max(shape) for b, shape in boxes))})
    return {"result": v.result, "foci": v.foci, "noise": (v.acquisition or {}).get("noise"), "rows": rows}


def _levels(what: str, example: str, most: float = float("inf"), least: float = 0.0):
    """An argparse type: comma-separated numbers from `least` to `most`."""
    def parse(text: str) -> list[float]:
        try:
            out = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            out = []
        if not out or any(not least <= v <= most for v in out):
            raise argparse.ArgumentTypeError(f"{text!r}: give {what}, comma-separated (e.g. {example})")
        return out
    return parse


_amplitudes = _levels("HU amplitudes ≥ 0", "0,150,300")
_shares = _levels("shares from 0 to 2", "0,0.25,0.5", 2.0)
_factors = _levels("factors from 1 to 2", "1,1.4,1.8", 2.0, 1.0)


def series(only: set[str], seeds: list[int], amplitudes: tuple[float, ...] = (0.0, 150.0, 300.0, 450.0),
           noise_hu: tuple[float, ...] = (0.0, 50.0, 100.0, 150.0),
           emphysema: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0), expiration: tuple[float, ...] = (1.0, 1.4, 1.8)):
    """(name, kind, files or folder) of every series to probe (a written one lives until the next is asked for);
    prints why one is skipped."""
    if "phantom" in only:
        from appliance.phantom import PhantomSpec, write_phantom

        for seed in seeds:
            with tempfile.TemporaryDirectory(prefix="ctriage-probe-") as d:
                write_phantom(d, PhantomSpec(slices=24, size=256, spacing_mm=1.4, lesion=True, seed=seed,
                                             second_focus=None))
                yield f"phantom seed {seed}", "dicom", Path(d)
    if "dicom" in only:
        for name, rel in DICOM.items():
            if (DATA / rel).exists():
                yield name, "dicom", DATA / rel
            else:
                print(f"SKIP {name}: {DATA / rel} is absent", file=sys.stderr)
        vols = [(f"TB {k + 1}", p) for k, p in enumerate(sorted(TB.glob("*x64.nii.gz")))] + [("TS chest", TS_CHEST)]
        try:
            from models.make_series import write_volume
            import nibabel  # noqa: F401
        except ImportError:
            print("SKIP TB and TotalSegmentator volumes: nibabel is not installed", file=sys.stderr)
            vols = []
        for name, path in vols:
            if not path.exists():
                print(f"SKIP {name}: {path} is absent", file=sys.stderr)
                continue
            with tempfile.TemporaryDirectory(prefix="ctriage-probe-") as d:
                write_volume(path, Path(d), name)
                yield name, "dicom", Path(d)
    if "pseudo" in only:
        groups: dict[str, list[Path]] = {}
        for p in sorted(PSEUDO.glob("*.jpg")):
            groups.setdefault(re.sub(r"_\d+\.jpg$", "", p.name), []).append(p)
        if not groups:
            print(f"SKIP pseudo-labelled patients: {PSEUDO} is absent", file=sys.stderr)
        for g, files in sorted(groups.items()):
            yield g, "images", files
    if "dependent" in only:
        from models.dependent_density import write_dependent

        for name in ("A0001", "P001"):
            if not (DATA / DICOM[name]).exists():
                print(f"SKIP {name} with a dependent band: {DATA / DICOM[name]} is absent", file=sys.stderr)
                continue
            for subpleural in (False, True):
                for amp in amplitudes:
                    with tempfile.TemporaryDirectory(prefix="ctriage-probe-") as d:
                        write_dependent(DATA / DICOM[name], Path(d), amp, subpleural=subpleural)
                        shape = "subpleural band" if subpleural else "dependent haze"
                        yield f"{name} + {shape} {amp:g} HU", "dicom", Path(d)
    if "noise" in only:
        yield from rewritten_series("noise", noise_hu)
    if "emphysema" in only:
        yield from rewritten_series("emphysema", emphysema)
    if "expiration" in only:
        yield from rewritten_series("expiration", expiration)


def rewritten_series(kind: str, levels: tuple[float, ...]):
    """A0001, P001 and the TotalSegmentator chest crop (enlarged to 0.75 mm pixels) with CT noise of each SD in HU
    (kind "noise"), emphysema of each share ("emphysema") or the aerated lung scaled by each factor
    ("expiration")."""
    from models.emphysema import write_emphysema
    from models.expiration import write_expiration
    from models.scan_noise import write_noisy

    sources = [(n, DATA / DICOM[n], 1) for n in ("A0001", "P001")] + [("TS chest", TS_CHEST, 2)]
    for name, src, enlarge in sources:
        if not src.exists():
            print(f"SKIP {name} with {kind}: {src} is absent", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory(prefix="ctriage-probe-") as base:
            if src.suffix == ".gz":  # a NIfTI volume: written as DICOM first
                try:
                    import nibabel  # noqa: F401
                    from models.make_series import write_volume
                except ImportError:
                    print(f"SKIP {name} with {kind}: nibabel is not installed", file=sys.stderr)
                    continue
                write_volume(src, Path(base) / "plain", name)
                src = Path(base) / "plain"
            for level in levels:
                out = Path(base) / f"{kind}-{level:g}"
                if kind == "noise":
                    write_noisy(src, out, level, enlarge=enlarge)
                    what = f"noise {level:g} HU"
                elif kind == "emphysema":
                    write_emphysema(src, out, level, spacing_z_mm=_spacing_z(src), enlarge=enlarge)
                    what = f"emphysema {level:g}"
                else:
                    write_expiration(src, out, level, enlarge=enlarge)
                    what = f"expiration ×{level:g}"
                yield f"{name} + {what}" + (f" (×{enlarge})" if enlarge > 1 else ""), "dicom", out


def _spacing_z(folder: Path) -> float:
    """Median distance between slice positions of the DICOM files in `folder` (mm)."""
    import numpy as np
    import pydicom

    zs = []
    for p in sorted(x for x in folder.rglob("*") if x.is_file()):
        try:
            zs.append(float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
        except Exception:  # annotations, licences: not slices
            continue
    d = np.diff(np.unique(zs))
    return float(np.median(d)) if d.size else 1.0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", type=Path, help="folder holding the valid-area and lesion bundles (default: shipped)")
    ap.add_argument("--only", type=_kinds, default="phantom,dicom,pseudo", help="comma-separated: " + ", ".join(KINDS))
    ap.add_argument("--seeds", type=_seeds, default="1-10", help="phantom seeds, FIRST-LAST (default 1-10)")
    ap.add_argument("--amplitudes", type=_amplitudes, default="0,150,300,450",
                    help="dependent band: HU added at the pleura, comma-separated (default 0,150,300,450)")
    ap.add_argument("--noise-hu", type=_amplitudes, default="0,50,100,150",
                    help="noise: SD in HU added to each series, comma-separated (default 0,50,100,150)")
    ap.add_argument("--emphysema", type=_shares, default="0,0.25,0.5,1",
                    help="emphysema: shares filled with lucent spheres, comma-separated (default 0,0.25,0.5,1)")
    ap.add_argument("--no-density-check", action="store_true",
                    help="keep lesion boxes no denser than the aerated lung (appliance.pipeline.opacity), to see what "
                         "the check changes")
    ap.add_argument("--expiration", type=_factors, default="1,1.4,1.8",
                    help="expiration: factors scaling the aerated lung towards water, 1 to 2 (default 1,1.4,1.8)")
    ap.add_argument("--json", action="store_true", help="one JSON object per series")
    ap.add_argument("--precision", choices=("int8", "fp32"), default="int8",
                    help="the lesion bundle's INT8 graph (shipped path, default) or its FP32 one: is a focus the model's "
                         "or the quantization's?")
    a = ap.parse_args(argv)
    from appliance.ingest.image_reader import image_series
    from appliance.oneshot import analyze_files, walk_files

    analyzer = Analyzer.load(AnalysisConfig(backend="openvino", workers=1, density_check=not a.no_density_check,
                                             precision=a.precision),
                             bundle_dir=a.bundles)
    rule = analyzer.rule  # the case rule the daemon, analyze and evaluate share
    print("# " + " · ".join(f"{b['name']} {b['version']}" for b in analyzer.bundles), file=sys.stderr)
    for name, kind, src in series(a.only, a.seeds, tuple(a.amplitudes), tuple(a.noise_hu), tuple(a.emphysema),
                                  tuple(a.expiration)):
        if kind == "images":
            slices, _ = image_series(src[0].parent, src)
            r = foci(analyzer.findings(slices), rule.for_images())
        else:
            found = analyze_files(sorted(walk_files(src)), analyzer, 10.0).series
            if not found:
                print(f"SKIP {name}: no readable series in {src}", file=sys.stderr)
                continue
            r = foci(max(found, key=lambda s: len(s.findings)).findings, rule)
        if a.json:
            print(json.dumps({"series": name, **r}), flush=True)
            continue
        stray = ", ".join(f"{x['first']}–{x['last']} ({x['boxed']} boxed, peak {x['peak']}, {x['side']} px)"
                          for x in r["rows"])
        noise = f" noise {r['noise']:.4f}" if r["noise"] is not None else ""
        print(f"{name:44s} {r['result']:13s}{noise} foci {r['foci']:2d}: {stray or '-'}", flush=True)


if __name__ == "__main__":
    main()
