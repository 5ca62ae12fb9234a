"""A candidate lesion bundle against the shipped one, every check of models/LESION2.md in one command and one table.

    python -m models.check_candidate /tmp/cand                      # cand holds valid-area-X and lesion-Y
    python -m models.check_candidate /tmp/cand --rounds 0 --json    # no bench; one JSON object

Both bundle sets (the candidate and `--baseline`, by default the shipped `models/bundles`) go through the same
commands, each in its own process, OpenVINO INT8:

- `ctriage evaluate` on the held-back images (`models.make_eval_set`, built when absent): Dice with its 95 %
  interval, and the candidate's paired Dice difference to the baseline (`--baseline`); specificity on the
  140 non-COVID crops;
- `models.tune`: pseudo-labelled held-back slices boxed, specificity on all held-back negatives;
- `models.eval_dicom_slices`: P001 (COVID-19) labelled / unlabelled slices boxed, cap001 (pneumonia) the same;
- `models.probe_foci --only phantom`: one-patch phantoms called positive (a stray second focus);
- the lesion bundle's INT8 vs FP32 mask agreement, as its export measured it (its manifest);
- `ctriage bench --slices 255`, the two sets alternating `--rounds` times (these machines are noisy: compare
  within a run only).

Research data is read in place from ../shared/data (or $CTRIAGE_DATA); a check whose data is absent is left out
of the table, with the reason printed. The bar to ship is in models/LESION2.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BUNDLES = Path(__file__).resolve().parent / "bundles"  # the shipped set (models.export's; no torch needed here)
EVAL_SET = Path(tempfile.gettempdir()) / "ctriage-eval"


class CheckError(RuntimeError):
    """A check's command failed; the message says which and how."""


def _run(args: list[str], what: str) -> str:
    p = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CheckError(f"{what} failed (exit {p.returncode}): {tail}")
    return p.stdout


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def bundle_set(folder: Path) -> str:
    """'valid-area X · lesion Y' of a bundles folder (the versions the appliance loads from it), or CheckError
    when one of the two is missing."""
    found = {name: b.version for name, b in _bundles(folder).items()}
    missing = [n for n in ("valid-area", "lesion") if n not in found]
    if missing:
        raise CheckError(f"{folder}: no {' and no '.join(missing)} bundle (a bundles folder holds both, e.g. "
                         "copy models/bundles/valid-area-X next to the candidate lesion bundle)")
    return f"valid-area {found['valid-area']} · lesion {found['lesion']}"


def _bundles(folder: Path) -> dict:
    from appliance.inference.bundle import find_bundles

    return find_bundles(Path(folder))


def int8_agreement(folder: Path) -> float | None:
    """The lesion bundle's INT8 vs FP32 mask agreement (OpenVINO) as its export measured it (manifest), if any."""
    b = _bundles(folder).get("lesion")
    if b is None:
        return None
    q = json.loads((Path(b.path) / "manifest.json").read_text()).get("quantization") or {}
    v = q.get("fp32_vs_int8_openvino_mask_dice")
    return round(float(v), 4) if isinstance(v, (int, float)) else None


def quality(bundles: Path, eval_set: Path, baseline_json: Path | None, seeds: str) -> dict:
    """Every quality check of one bundle set (each its own process)."""
    out: dict = {"bundles": bundle_set(bundles), "int8_agreement": int8_agreement(bundles)}
    cmd = ["appliance.cli", "evaluate", str(eval_set / "images"), "--json", "--backend", "openvino",
           "--bundles", str(bundles)]
    ev = json.loads(_run(cmd + (["--baseline", str(baseline_json)] if baseline_json else []), "ctriage evaluate"))
    out["evaluation"] = ev
    out["dice"], out["dice_ci95"] = ev["dice"]["mean"], ev["dice"]["ci95"]
    out["crops_specificity"] = ev["per_image"]["specificity"]
    out["crops_false_alarms"] = ev["per_image"]["fp"]
    if "dice_vs_baseline" in ev:
        out["dice_vs_baseline"] = {k: ev["dice_vs_baseline"][k] for k in ("difference", "ci95", "better", "worse")}
    tune = json.loads(_run(["models.tune", "--bundles", str(bundles), "--backend", "openvino"], "models.tune"))
    out["pseudo_slices_boxed"] = round(tune["current"]["sens_pseudo"], 4)
    out["negatives_specificity"] = round(tune["current"]["spec_all"], 4)
    for r in _jsonl(_run(["models.eval_dicom_slices", "--bundles", str(bundles), "--json"], "eval_dicom_slices")):
        out[r["series"]] = {k: r[k] for k in ("labelled_boxed", "labelled", "unlabelled_boxed", "unlabelled",
                                              "result")}
    ph = _jsonl(_run(["models.probe_foci", "--bundles", str(bundles), "--only", "phantom", "--seeds", seeds,
                      "--json"], "probe_foci"))
    out["phantoms_positive"] = [sum(r["result"] == "positive" for r in ph), len(ph)]
    return out


def speed(sets: dict[str, Path], rounds: int) -> dict[str, list[float]]:
    """slices/s of each set, the sets alternating round by round in this process's machine."""
    got: dict[str, list[float]] = {k: [] for k in sets}
    for _ in range(rounds):
        for name, folder in sets.items():
            d = json.loads(_run(["appliance.cli", "bench", "--json", "--backend", "openvino", "--slices", "255",
                                 "--bundles", str(folder)], "ctriage bench"))
            got[name].append(d["backends"]["openvino"]["slices_per_s"])
    return got


def _fmt_series(r: dict | None) -> str:
    return "—" if not r else f"{r['labelled_boxed']}/{r['labelled']} / {r['unlabelled_boxed']}/{r['unlabelled']}"


def table(rows: dict[str, dict]) -> str:
    """The two rows as a markdown table (the form of models/LESION2.md's tables)."""
    head = ["", "bundles", "Dice (95 % interval)", "vs baseline, paired (better / worse)", "pseudo slices boxed",
            "negatives spec. (crops false alarms)", "P001 labelled / unlabelled", "cap001 labelled / unlabelled",
            "phantoms positive", "INT8 agreement", "slices/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        ci = r.get("dice_ci95") or [float("nan")] * 2
        vs = r.get("dice_vs_baseline")
        paired = "—" if not vs else (f"{vs['difference']:+.3f} ({vs['ci95'][0]:+.3f} … {vs['ci95'][1]:+.3f}) "
                                     f"({vs['better']} / {vs['worse']})" if vs["ci95"] else f"{vs['difference']:+.3f}")
        sps = r.get("slices_per_s") or []
        lines.append("| " + " | ".join([
            name, r["bundles"], f"{r['dice']:.3f} ({ci[0]:.3f}–{ci[1]:.3f})", paired,
            f"{r['pseudo_slices_boxed']:.3f}", f"{r['negatives_specificity']:.3f} ({r['crops_false_alarms']})",
            _fmt_series(r.get("P001")), _fmt_series(r.get("cap001")),
            f"{r['phantoms_positive'][0]} / {r['phantoms_positive'][1]}",
            "—" if r.get("int8_agreement") is None else f"{r['int8_agreement']:.3f}",
            " / ".join(f"{v:.1f}" for v in sps) or "—"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("candidate", type=Path, help="bundles folder: the candidate lesion bundle and a valid-area one")
    ap.add_argument("--baseline", type=Path, default=BUNDLES, help="bundles folder to compare with (the shipped)")
    ap.add_argument("--eval-set", type=Path, default=EVAL_SET, help="models.make_eval_set's folder (built if absent)")
    ap.add_argument("--rounds", type=int, default=2, help="bench rounds, the sets alternating (0: no bench)")
    ap.add_argument("--seeds", default="1-10", help="phantom seeds, FIRST-LAST")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    a = ap.parse_args(argv)
    if a.rounds < 0:
        ap.error("--rounds must be 0 or more")
    try:
        for folder in (a.candidate, a.baseline):
            bundle_set(folder)
        missing = [m for m in ("torch", "nibabel") if importlib.util.find_spec(m) is None]
        if missing:  # models.tune and the volume series need them; say so before minutes of checks
            raise CheckError(f"needs the `train` extra ({', '.join(missing)} missing): pip install -e '.[train]'")
        if not (a.eval_set / "images").is_dir():
            print(f"building the held-back evaluation set in {a.eval_set}", file=sys.stderr)
            _run(["models.make_eval_set", str(a.eval_set)], "models.make_eval_set")
        rows: dict[str, dict] = {}
        with tempfile.TemporaryDirectory() as tmp:
            print("checking the baseline …", file=sys.stderr)
            rows["baseline"] = quality(a.baseline, a.eval_set, None, a.seeds)
            base_json = Path(tmp) / "baseline.json"
            base_json.write_text(json.dumps(rows["baseline"].pop("evaluation")))
            print("checking the candidate …", file=sys.stderr)
            rows["candidate"] = quality(a.candidate, a.eval_set, base_json, a.seeds)
            rows["candidate"].pop("evaluation")
        if a.rounds:
            print(f"bench, {a.rounds} round(s) alternating …", file=sys.stderr)
            for name, v in speed({"baseline": a.baseline, "candidate": a.candidate}, a.rounds).items():
                rows[name]["slices_per_s"] = v
    except CheckError as e:
        print(f"check_candidate: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if a.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
