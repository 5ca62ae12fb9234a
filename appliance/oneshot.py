"""One-shot analysis of a folder: discover files → read headers and group series, analysing each batch as soon
as it is read → case rule per series → reports.

Used by `ctriage analyze`, `evaluate`, `bench` and `demo`. Pixel data is decoded batch by batch (each of the
analyzer's workers decodes a batch while the other's is in the models, and the calling thread reads the next
headers) and dropped once analysed, so memory stays flat.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from appliance.domain import SeriesVerdict, SliceFinding, SliceImage
from appliance.ingest.dicom_reader import Rejected, load_pixels, read_slice
from appliance.ingest.image_reader import image_series, is_image_file, natural_key
from appliance.ingest.series import Series, sort_key
from appliance.pipeline.analyzer import Analyzer, stage_summary
from appliance.privacy import pseudonym
from appliance.publish.key_slices import key_slices, lead_run
from appliance.publish.overlays import render, slice_grey


@dataclass
class SeriesReport:
    kind: str  # "dicom" | "images"
    source: str  # folder holding the series' files
    series_key: str
    study_key: str
    description: str
    verdict: SeriesVerdict
    findings: list[SliceFinding]
    slices: list[SliceImage]  # headers only (pixels dropped), series order
    rejected: list[dict] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    spacing_mm: float = 0.0
    thickness_mm: float | None = None

    def as_dict(self, analyzer: Analyzer) -> dict:
        v = self.verdict
        return {
            "schema": "ctriage.analysis/1",
            "kind": self.kind,
            "source": self.source,
            "study_key": self.study_key,
            "series_key": self.series_key,
            "description": self.description,
            "result": v.result,
            "state": v.state,
            "evidence": v.evidence.as_dict() if v.evidence else None,
            "focal": v.focal.as_dict() if v.focal else None,
            "foci": v.foci,
            "reason": v.reason,
            "grade": v.grade,
            "others": v.others,
            "acquisition": v.acquisition,
            "slices": v.slices,
            "lung_slices": v.lung_slices,
            "lesion_slices": v.lesion_slices,
            "gaps": v.gaps,
            "spacing_mm": round(self.spacing_mm, 3),
            "thickness_mm": self.thickness_mm,
            "key_slices": key_slices(self.findings, lead=lead_run(v)),
            "rejected": self.rejected,
            "bundles": analyzer.bundles,
            "backend": analyzer.backend,
            "device": analyzer.device,
            "precision": analyzer.precision,
            "timings": {"ms_per_slice": self.timings_ms, "total_s": round(self.seconds, 3)},
        }


def walk_files(root: Path, broken: list[Path] | None = None) -> list[Path]:
    """Files under root, recursively, hidden names skipped; symbolically linked folders are followed (a dataset
    assembled from links to series folders), each real folder once, so a link loop ends. Links that lead nowhere
    are left out (and added to `broken` when given)."""
    seen: set[str] = set()
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        here = Path(dirpath)
        for f in filenames:
            if f.startswith("."):
                continue
            if (here / f).is_file():
                out.append(here / f)
            elif broken is not None and (here / f).is_symlink() and not (here / f).exists():
                broken.append(here / f)
    return out


def discover(path: Path) -> tuple[list[Path], dict[Path, list[Path]]]:
    """Files under path (recursively, hidden ones skipped): DICOM candidates, and image files grouped by folder."""
    files = [path] if path.is_file() else sorted(walk_files(path), key=lambda p: natural_key(str(p)))
    images: dict[Path, list[Path]] = {}
    others = []
    for p in files:
        if is_image_file(p):
            images.setdefault(p.parent, []).append(p)
        else:
            others.append(p)
    return others, images


def _decode(batch: list[SliceImage], max_tilt_deg: float) -> tuple[list[SliceImage], list[dict], float]:
    t = time.perf_counter()
    ok, bad = [], []
    for s in batch:
        try:
            load_pixels(s, max_tilt_deg)
            ok.append(s)
        except Rejected as e:
            bad.append({"file": s.key, "reason": e.reason, "series_uid": s.series_uid})
    return ok, bad, time.perf_counter() - t


def _analyse_chunk(analyzer: Analyzer, chunk: list[SliceImage], max_tilt_deg: float, keep_prob: bool
                   ) -> tuple[list[SliceImage], list[SliceFinding], list[dict], float, int]:
    """One worker's share: decode the chunk, run it through the models, drop the pixels."""
    ok, bad, dt = _decode(chunk, max_tilt_deg)
    fs = analyzer.batch(ok, keep_prob=keep_prob) if ok else []
    for s in ok:
        s.hu = None  # drop pixels once analysed
    return ok, fs, bad, dt, len(chunk)


@dataclass
class SeriesAnalysis:
    """One series as `analyze_files` leaves it: slices analysed (arrival order), their findings, decode failures."""

    series: Series
    kept: list[SliceImage] = field(default_factory=list)
    findings: list[SliceFinding] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    decode_s: float = 0.0
    seconds: float = 0.0  # from the start of the pass until this series' last slice was analysed


@dataclass
class FilesAnalysis:
    series: list[SeriesAnalysis]  # first-seen order
    rejected: list[dict]  # files the header pass refused (with series_uid where known)
    header_s: float = 0.0  # time spent reading headers (overlapped with the analysis)
    duplicates: int = 0


def analyze_files(files: list[Path], analyzer: Analyzer, max_tilt_deg: float,
                  progress: Callable[[int], None] | None = None, keep_prob: bool = False) -> FilesAnalysis:
    """Header pass and analysis overlapped: each file's header is read (pixel data left on disk) and the slice is
    grouped into its series at once (first seen wins among duplicates, as `group_series`); every full batch goes
    to the analyzer's workers while the next headers are read, so the header pass no longer runs alone on one core.

    Findings do not depend on the other slices of a batch (nor on their order). Every file is counted once through
    `progress` (analysed, rejected or duplicate). A parsed header is held only until its batch is decoded, so
    memory does not grow with the number of files.
    """
    t0 = time.perf_counter()
    out: dict[str, SeriesAnalysis] = {}
    res = FilesAnalysis([], [])
    size = max(1, analyzer.config.batch)

    def batches():
        batch: list[SliceImage] = []
        for p in files:
            t = time.perf_counter()
            try:
                s = read_slice(p, max_tilt_deg=max_tilt_deg, with_pixels=False)
            except Rejected as e:
                res.rejected.append({"file": str(p), "reason": e.reason, "series_uid": getattr(e, "series_uid", "")})
                s = None
            res.header_s += time.perf_counter() - t
            if s is not None and s.series_uid not in out:
                out[s.series_uid] = SeriesAnalysis(Series(s.series_uid, s.study_uid))
            if s is None or not out[s.series_uid].series.add(s):
                if s is not None:
                    s.source, res.duplicates = None, res.duplicates + 1
                if progress:
                    progress(1)
                continue
            batch.append(s)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    for ok, fs, bad, dt, n in analyzer.map(lambda c: _analyse_chunk(analyzer, c, max_tilt_deg, keep_prob), batches()):
        now = time.perf_counter() - t0
        for s, f in zip(ok, fs):
            a = out[s.series_uid]
            a.kept.append(s)
            a.findings.append(f)
            a.seconds = now
        for b in bad:
            a = out[b.pop("series_uid")]
            a.rejected.append(b)
            a.seconds = now
        if ok:
            share = dt / len(ok)
            for s in ok:
                out[s.series_uid].decode_s += share
        if progress:
            progress(n)
    res.series = list(out.values())
    return res


def analyze_path(path: Path, analyzer: Analyzer, secret: bytes, max_tilt_deg: float = 10.0,
                 overlays: Path | None = None, progress: Callable[[int], None] | None = None,
                 on_total: Callable[[int], None] | None = None) -> tuple[list[SeriesReport], list[dict]]:
    """Analyse every series found under `path`. Returns (reports, rejected files not tied to a report)."""
    dicom_files, image_groups = discover(path)
    if on_total:
        on_total(len(dicom_files) + sum(len(v) for v in image_groups.values()))
    done = analyze_files(dicom_files, analyzer, max_tilt_deg, progress)
    rejected = done.rejected
    reports: list[SeriesReport] = []
    uid_report: dict[str, SeriesReport] = {}
    for a in done.series:
        ser, kept = a.series, a.kept
        if not kept:  # every slice of it was rejected: nothing usable, its files are listed with their reasons
            rejected += a.rejected
            continue
        verdict, ordered = analyzer.verdict(kept, a.findings)
        order = sorted(range(len(kept)), key=lambda i: sort_key(kept[i]))
        ordered_slices = [kept[i] for i in order]
        folder = _common_folder([s.key for s in ser.slices])
        timings = {"decode": round(a.decode_s * 1000 / max(1, len(ser.slices)), 3), **stage_summary(ordered)}
        rep = SeriesReport("dicom", folder, pseudonym(secret, ser.uid), pseudonym(secret, ser.study_uid),
                           ser.description, verdict, ordered, ordered_slices, a.rejected, timings,
                           a.seconds, ser.spacing, ordered_slices[0].thickness if ordered_slices else None)
        reports.append(rep)
        uid_report[ser.uid] = rep
    for folder, files in sorted(image_groups.items(), key=lambda kv: natural_key(str(kv[0]))):
        t0 = time.perf_counter()
        slices, bad = image_series(folder, files)
        if not slices:
            rejected += bad
            continue
        t1 = time.perf_counter()
        findings = analyzer.findings(slices)
        if progress:
            progress(len(files))
        verdict, ordered = analyzer.verdict(slices, findings)  # the daemon's rule: < min_slices is indeterminate
        ordered_slices = sorted(slices, key=sort_key)
        timings = {"decode": round((t1 - t0) * 1000 / len(slices), 3), **stage_summary(ordered)}
        key = pseudonym(secret, str(folder.resolve()))
        rep = SeriesReport("images", str(folder), key, key, folder.name, verdict, ordered, ordered_slices, bad,
                           timings, time.perf_counter() - t0, 1.0, None)
        reports.append(rep)
    loose = attribute_rejections(rejected, reports, uid_report)
    if overlays is not None:
        for rep in reports:
            write_overlays(rep, overlays, max_tilt_deg)
    return reports, loose


def attribute_rejections(rejected: list[dict], reports: list[SeriesReport],
                         uid_report: dict[str, SeriesReport]) -> list[dict]:
    """Attach each rejected file to its series' report (same SeriesInstanceUID), else to the report whose folder
    holds it (deepest first); return those that belong to no report."""
    loose = []
    for r in rejected:
        uid = r.pop("series_uid", "")
        rep = uid_report.get(uid) if uid else None
        if rep is None:
            holders = [x for x in reports if x.source and (r["file"].startswith(x.source.rstrip("/") + "/"))]
            rep = max(holders, key=lambda x: len(x.source)) if holders else None
        if rep is None:
            loose.append(r)
        else:
            rep.rejected.append(r)
    return loose


def _common_folder(keys: list[str]) -> str:
    import os

    if not keys:
        return ""
    try:
        return os.path.commonpath([str(Path(k).parent) for k in keys])
    except ValueError:
        return str(Path(keys[0]).parent)


def write_overlays(rep: SeriesReport, out: Path, max_tilt_deg: float = 10.0) -> list[Path]:
    """One PNG per slice with lesion: lung window, lung box, lesion boxes, quadrant and score."""
    d = out / rep.series_key
    written = []
    n = len(rep.findings)
    for i, (s, f) in enumerate(zip(rep.slices, rep.findings)):
        if not f.boxes:
            continue
        if rep.kind == "dicom":
            img = read_slice(s.key, max_tilt_deg=max_tilt_deg)
            grey = slice_grey(img.hu, None)
        else:
            from appliance.ingest.image_reader import read_image

            grey = read_image(Path(s.key), i, rep.source).window01
        ev, fo = rep.verdict.evidence, rep.verdict.focal
        tag = ("  [run]" if ev and ev.first_slice <= i <= ev.last_slice
               else "  [focal lesion]" if fo and fo.first_slice <= i <= fo.last_slice else "")
        title = f"{rep.series_key[:8]}  slice {i + 1}/{n}  {rep.verdict.result.upper()}{tag}"
        im = render(np.asarray(grey), f, title=title, max_size=0)
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"slice_{i + 1:04d}.png"
        im.save(p)
        written.append(p)
    return written
