"""Measure the pipeline on a labelled dataset: Table 3 of Chen et al. 2020 per image and per patient, plus Dice where
masks exist.

    DATASET/covid/<patient>/     slices: DICOM files, or lung-window crop images (*.png, *.jpg), natural name order
    DATASET/control/<patient>/   the same
    DATASET/masks/<patient>/<file stem>.png   optional lesion masks (non-zero = lesion), same size as the image

Per image: positives = COVID images with lesion (mask non-empty; without masks, every COVID image), negatives =
every control image; an image is called positive when it gets at least one box. COVID images whose mask is empty
are excluded (reported as `excluded`). Per patient: positive when the case rule fires (indeterminate counts as a
negative call). Undefined ratios are shown as "-" (null in JSON).

--json prints one JSON object; --report DIR writes DIR/index.html (self-contained: ROC, threshold sweep, Dice
histogram, patients, misses and false alarms) and DIR/metrics.json. Exit status 2 on a malformed dataset.

Mean Dice comes with its 95 % bootstrap interval (images resampled): over 10 images it is wide. --baseline FILE
(an earlier --json output or metrics.json of the same dataset, e.g. with the bundles in service) adds the paired
difference per image and its interval: whether a candidate bundle is better beyond what the images can show.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from appliance.errors import UsageError
from appliance.ingest.dicom_file import document_kinds
from appliance.pipeline.anatomy import run_text
from appliance.pipeline.grade_text import pattern_text
from appliance.commands.common import (add_backend_arguments, add_config_argument, load_config, make_analyzer,
                                       progress_bar, table)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="DATASET", help="folder with covid/<patient>/, control/<patient>/, masks/")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--report", metavar="DIR", help="write an HTML report (index.html) and metrics.json here")
    p.add_argument("--progress", action="store_true", default=None, help="force a progress bar on stderr")
    p.add_argument("--baseline", metavar="FILE", help="an earlier evaluation of the same dataset (--json output or "
                   "metrics.json): report the paired Dice difference with its 95 %% bootstrap interval")
    add_backend_arguments(p)
    add_config_argument(p)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def summary(data: dict) -> str:
    """The readable form of the evaluation object."""
    from appliance.evaluate import spread_words

    pi, pp, d = data["per_image"], data["per_patient"], data["dice"]
    rows = [[label, _pct(pi[k]), _pct(pp[k])] for k, label in
            (("sensitivity", "sensitivity"), ("specificity", "specificity"), ("accuracy", "accuracy"),
             ("ppv", "PPV"), ("npv", "NPV"))]
    rows.append(["TP/FP/TN/FN", f"{pi['tp']}/{pi['fp']}/{pi['tn']}/{pi['fn']}",
                 f"{pp['tp']}/{pp['fp']}/{pp['tn']}/{pp['fn']}"])
    out = [table(rows, ["", "per image", "per patient"]), ""]
    out.append(f"images {pi['images']} ({pi['excluded']} COVID image(s) with an empty mask excluded), "
               f"patients {pp['patients']}")
    if d["n"]:
        ci = d.get("ci95")
        out.append(f"Dice {d['mean']:.3f}" + (f" (95 % interval {ci[0]:.3f}–{ci[1]:.3f})" if ci else "")
                   + f", IoU {d['iou_mean']:.3f}, over {d['n']} image(s) with a mask, "
                   f"{d['both_empty']} of them empty in mask and prediction"
                   + (f"; {d['lesion_mean']:.3f} over the {d['lesion_n']} with lesion" if d["lesion_n"] else ""))
        vs = data.get("dice_vs_baseline")
        if vs:
            ci = vs["ci95"]
            was = ", ".join(f"{b['name']} {b['version']}" for b in vs.get("bundles_baseline") or []) or "baseline"
            verdict = "" if ci is None else " — " + spread_words(ci)
            out.append(f"Dice vs {was}: {vs['difference']:+.3f}"
                       + (f" (95 % interval {ci[0]:+.3f} … {ci[1]:+.3f})" if ci else "")
                       + f" over {vs['n']} paired image(s), better on {vs['better']}, worse on {vs['worse']}"
                       + verdict)
    else:
        out.append("Dice: no masks")
    if data["roc_auc"] is not None:
        out.append(f"ROC AUC per image {data['roc_auc']:.3f}")
    prow = []
    for p in data["patients"]:
        ev = p["evidence"]
        run = run_text(ev["quadrant"], ev["first_slice"], ev["last_slice"], ev["run"]) if ev else (p["reason"] or "-")
        pattern = pattern_text(p.get("grade"), p["result"]) or "-"
        off = (p.get("result_without_other_findings") or p["result"]).upper()
        prow.append([p["patient"], p["group"], p["result"].upper(), off, pattern, str(p["slices"]),
                     str(p["lesion_slices"]), run])
    out += ["", table(prow, ["patient", "group", "result", "without other findings", "pattern", "slices", "lesion",
                             "run / reason"]), ""]
    cats: dict[str, int] = {}
    for p in data["patients"]:
        if p["result"] == "positive" and p.get("grade"):
            cats[p["grade"]["category"]] = cats.get(p["grade"]["category"], 0) + 1
    ungraded = sum(1 for p in data["patients"] if p["result"] == "positive" and not p.get("grade"))
    if cats or ungraded:
        out += ["positives by pattern (RSNA consensus categories): "
                + ", ".join([f"{k} {cats[k]}" for k in ("typical", "indeterminate", "atypical") if k in cats]
                            + ([f"not graded (no HU: crop images) {ungraded}"] if ungraded else [])), ""]
    named = [(p["patient"], o["text"]) for p in data["patients"] for o in p.get("others") or []]
    if named:
        out += ["solid nodules and masses named (not the COVID-19 pattern; a halo around one does not count):"]
        out += [f"  {who}: {text}" for who, text in named] + [""]
    if data["rejected"]:
        out.append(f"{len(data['rejected'])} file(s) rejected:")
        out += [f"  {r['file']}: {r['reason']}" for r in data["rejected"][:20]]
        if len(data["rejected"]) > 20:
            out.append(f"  … and {len(data['rejected']) - 20} more (use --json for all)")
        out.append("")
    if data.get("skipped"):
        out += [f"{len(data['skipped'])} other file(s) skipped, not DICOM: "
                + document_kinds([r["file"] for r in data["skipped"]]) + " (--json lists them)", ""]
    ms = "-" if data["ms_per_slice"] is None else f"{data['ms_per_slice']:.1f}"
    out.append(f"backend {data['backend']} ({data['precision']}) on {data['device']}; models "
               + ", ".join(f"{b['name']} {b['version']}" for b in data["bundles"])
               + f"; {ms} ms/slice, {data['total_s']:.1f} s in all")
    return "\n".join(out)


def _read_baseline(path: Path) -> dict:
    """The baseline evaluation object, or a UsageError saying what is wrong with the file (before models load)."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"--baseline {path}: cannot read it ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--baseline {path}: not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("dice"), dict) or "images" not in data["dice"]:
        raise UsageError(f"--baseline {path}: not an evaluation with per-image Dice (write it with "
                         "`ctriage evaluate --json` or --report)")
    return data


def run(args: argparse.Namespace) -> int:
    from appliance.evaluate import DatasetError, compare_dice, evaluate, find_patients

    root = Path(args.dataset)
    try:
        find_patients(root)  # layout errors before the models load
    except DatasetError as e:
        raise UsageError(str(e)) from None
    baseline = _read_baseline(Path(args.baseline)) if args.baseline else None
    if args.report:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--report needs matplotlib (pip install matplotlib)") from None
    cfg = load_config(args)
    analyzer = make_analyzer(cfg)
    bar = progress_bar(None, "evaluating", args.progress)
    try:
        ev = evaluate(root, analyzer, cfg.analysis.max_tilt_deg, progress=bar.update,
                      on_total=lambda n: setattr(bar, "total", n))
    except DatasetError as e:
        raise UsageError(str(e)) from None
    finally:
        bar.close()
    data = ev.as_dict()
    if baseline is not None:
        try:
            data["dice_vs_baseline"] = compare_dice(data, baseline)
        except DatasetError as e:
            raise UsageError(f"--baseline {args.baseline}: {e}") from None
    if args.report:
        from appliance.report import write_report

        page = write_report(ev, Path(args.report), cfg.analysis.max_tilt_deg, data=data, baseline=baseline)
        print(f"report written to {page}", file=sys.stderr)
    if args.json:
        print(json.dumps(data))
    else:
        print(summary(data))
    return 0
