"""Analyse a folder once: DICOM files (one or more series, nested folders) or lung-window crop images.

Exit status: 0 when at least one series was analysed, 2 when nothing usable was found (one line says why).
--json prints one JSON object per series (JSON Lines); slice numbers there are 0-based positions in series order
(head to feet), the table's are 1-based. Where the folder holds several series of one study, each of them also
carries `study`: the study's call as the appliance publishes it (positive when any series is), and the table ends
with a line for it. Quadrants are image quadrants (display orientation); the table adds the
patient's side.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from appliance.commands.common import (add_backend_arguments, add_config_argument, load_config, make_analyzer,
                                       progress_bar, table)
from appliance.errors import UsageError
from appliance.ingest.dicom_file import document_kinds, is_document
from appliance.pipeline.anatomy import run_text
from appliance.pipeline.case_logic import SeriesSummary, reader_notes, study_verdict
from appliance.pipeline.grade_text import UNGRADED, pattern_text


def split_documents(rejected: list[dict]) -> tuple[list[dict], list[dict]]:
    """(files that are plainly documents, not DICOM: XML annotations, licences, manifests; every other rejection)."""
    docs, rest = [], []
    for r in rejected:
        (docs if is_document(r["file"], r["reason"]) else rest).append(r)
    return docs, rest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help="folder (or file) of DICOM slices or lung-window crop images")
    p.add_argument("--json", action="store_true", help="JSON Lines: one object per series")
    p.add_argument("--overlays", metavar="DIR", help="write a PNG per slice with lesion (boxes, quadrant) here")
    p.add_argument("--progress", action="store_true", default=None, help="force a progress bar on stderr")
    add_backend_arguments(p)
    add_config_argument(p)


def finding_lines(name: str, v) -> list[str]:
    """What a series shows besides its result: the grade of a positive, solid nodules and masses named, a noisy
    scan, lesion boxes left out as no opacity."""
    out = []
    g = v.grade
    if not g and v.result == "positive":
        out.append(f"{name}: COVID-19 pattern (a viral pneumonia pattern: isolate pending PCR) — {UNGRADED}")
    if g and v.result == "positive":
        ext = g.get("extent", {})
        out.append(f"{name}: COVID-19 pattern (a viral pneumonia pattern: isolate pending PCR) — {g['category']} "
                   f"({', '.join(g.get('reasons', []))}); severity {g['severity']}/25; involved: right "
                   f"{ext.get('right', 0):g} %, left {ext.get('left', 0):g} %")
    out += [f"{name}: {o['text']} (slices {o['first_slice'] + 1}-{o['last_slice'] + 1})" for o in v.others]
    a = v.acquisition
    if a and a.get("noisy"):
        smoothed = f"; {a['smoothed_slices']} slices smoothed before analysis" if a.get("smoothed_slices") else ""
        out.append(f"{name}: noisy scan (noise {a['noise']:.3f}, validated up to {a['limit']:.3f}: sharp kernel or "
                   f"low dose) — lesion boxes are less reliable, read with care{smoothed}")
    if a and a.get("flat_boxes"):
        out.append(f"{name}: {a['flat_boxes']} lesion box(es) left out: no denser than the aerated lung around them "
                   "(noise or emphysema texture, not an opacity)")
    return out


def studies(reports) -> dict[str, dict]:
    """For each study with two or more series here: the call the appliance publishes for it (its study verdict: positive
    when any series is), the lead series and the notes its other series add to a positive's grade (prone images, a
    smoother series beside a noisy positive). {study_key: {"result", "series", "lead_series_key", "notes"}}."""
    by: dict[str, list] = {}
    for rep in reports:
        by.setdefault(rep.study_key, []).append(rep)
    out = {}
    for key, reps in by.items():
        if len(reps) > 1:
            v, lead = study_verdict([SeriesSummary(r.series_key, r.verdict, r.description) for r in reps])
            out[key] = {"result": v.result, "series": len(reps), "lead_series_key": lead.series_key,
                        "notes": reader_notes(v.grade)}
    return out


def study_lines(calls: dict[str, dict]) -> list[str]:
    """The study calls for people, one line each."""
    return [f"study {key[:10]} ({c['series']} series): {c['result'].upper()}, the study's call (lead series "
            f"{c['lead_series_key'][:10]})" + "".join(f"; {n}" for n in c["notes"]) for key, c in calls.items()]


def run(args: argparse.Namespace) -> int:
    from appliance.oneshot import analyze_path
    from appliance.privacy import load_secret

    path = Path(args.path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    cfg = load_config(args)
    analyzer = make_analyzer(cfg)
    secret = load_secret(cfg.privacy.study_key_secret_file, cfg.state_path)
    bar = progress_bar(None, "analysing", args.progress)
    reports, loose = analyze_path(path, analyzer, secret, cfg.analysis.max_tilt_deg,
                                  Path(args.overlays) if args.overlays else None,
                                  progress=bar.update, on_total=lambda n: setattr(bar, "total", n))
    bar.close()
    if not reports:
        reasons = Counter(r["reason"] for r in loose)
        top = "; ".join(f"{n} × {r}" for r, n in reasons.most_common(3))
        msg = f"no usable CT series in {path}" + (f": {len(loose)} file(s) rejected ({top})" if loose else ": no files found")
        if args.json:
            print(json.dumps({"error": msg, "rejected": loose}))
        raise UsageError(msg)
    if loose:  # files tied to no series: listed with the first report so nothing goes unmentioned
        reports[0].rejected.extend(loose)
    calls = studies(reports)
    if args.json:
        for rep in reports:
            d = rep.as_dict(analyzer)
            if rep.study_key in calls:
                d["study"] = calls[rep.study_key]
            print(json.dumps(d))
        return 0
    rows = []
    for rep in reports:
        v = rep.verdict
        ev = v.evidence
        evtxt = run_text(ev.quadrant, ev.first_slice, ev.last_slice, ev.run) if ev else (v.reason or "-")
        pattern = pattern_text(v.grade, v.result) or "-"
        rows.append([rep.series_key[:10], (rep.description or Path(rep.source).name)[:28], str(v.slices),
                     str(v.lung_slices), str(v.lesion_slices), v.result.upper(), pattern, evtxt])
    print(table(rows, ["series", "description", "slices", "lung", "lesion", "result", "pattern", "evidence"]))
    notes = [line for rep in reports for line in finding_lines(rep.series_key[:10], rep.verdict)]
    notes += study_lines(calls)
    if notes:
        print("\n" + "\n".join(notes))
    print(f"\nbackend {analyzer.backend} ({analyzer.precision}) on {analyzer.device}; models "
          + ", ".join(f"{b['name']} {b['version']}" for b in analyzer.bundles))
    documents, rejected = split_documents([r for rep in reports for r in rep.rejected])
    if rejected:
        print(f"\n{len(rejected)} file(s) rejected:")
        for r in rejected[:50]:
            print(f"  {r['file']}: {r['reason']}")
        if len(rejected) > 50:
            print(f"  … and {len(rejected) - 50} more (use --json for all)")
    if documents:
        print(f"\n{len(documents)} other file(s) skipped, not DICOM: "
              + document_kinds([r["file"] for r in documents]) + " (--json lists them)")
    if args.overlays:
        print(f"\noverlays written to {args.overlays}", file=sys.stderr)
    return 0
