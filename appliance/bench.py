"""Benchmark of the per-slice pipeline, per backend: header pass → decode → valid area → lesion → boxes →
measures (solid components, grading) → case rule.

Each backend runs in its own child process (`python -m appliance.bench --child …`) so that its peak RSS is its
own. Reported per backend: end-to-end slices/s over the whole series (as in `analyze`: the header pass reads and
groups the files while `workers` batches already read are decoded and run, each on its own inference stream;
`headers` is the time spent reading headers, overlapped with the rest), ms per stage (median and p95 over
batches; per worker, so with two workers the stages add up to about twice the wall time per slice), the time a
515-slice study would take at that rate, the streaming verdict latency after the last slice (slices fed one by
one as a console exports them), peak RSS, and the workers and batch size used.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def machine() -> dict:
    from appliance.inference.adapter import cpu_name

    return {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "machine": platform.machine(),
            "python": platform.python_version()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def generate_series(out: Path, slices: int, syntax: str = "explicit") -> Path:
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless

    from appliance.jpeg_lossless import JPEG_LOSSLESS_SV1
    from appliance.phantom import PhantomSpec, write_phantom

    ts = {"explicit": ExplicitVRLittleEndian, "jpeg-lossless": JPEG_LOSSLESS_SV1, "jpeg2000": JPEG2000Lossless,
          "jpeg-ls": JPEGLSLossless}[syntax]
    write_phantom(out, PhantomSpec(slices=slices, thickness_mm=1.25, lesion=True), transfer_syntax=ts)
    return out


def _pcts(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": 0.0, "p95": 0.0}
    a = np.asarray(values, dtype=float)
    return {"median": round(float(np.median(a)), 3), "p95": round(float(np.percentile(a, 95)), 3)}


def pixel_codec(path: str) -> str:
    """A series file's transfer syntax and what decodes it first, e.g. "JPEG Lossless …: imagecodecs 2026.3.6 …"."""
    import pydicom

    from appliance.ingest.jpeg_decoder import decoder_name

    ts = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta.TransferSyntaxUID
    return f"{ts.name}: {decoder_name(ts)}"


def bench_backend(path: Path, backend: str, precision: str, threads: int | None, streaming_slices: int,
                  bundles: Path | None = None, workers: int | None = None, batch: int | None = None,
                  analysis: dict | None = None) -> dict:
    """Run in the child: the whole series once (batch mode), then a streaming tail. `analysis`: the analysis
    settings of a configuration (`AnalysisConfig` fields; the arguments above override theirs)."""
    from appliance.oneshot import analyze_files, discover
    from appliance.config import AnalysisConfig
    from appliance.inference.deferred import DeferredAdapter
    from appliance.ingest.dicom_reader import load_pixels
    from appliance.ingest.series import sort_key
    from appliance.pipeline.analyzer import STAGES, Analyzer
    from appliance.pipeline.case_logic import decide

    t_load = time.perf_counter()
    cfg = AnalysisConfig(**{**(analysis or {}), "backend": backend, "precision": precision})
    for name, value in (("threads", threads), ("workers", workers), ("batch", batch)):
        if value:
            setattr(cfg, name, value)
    analyzer = Analyzer.load(cfg, bundles)
    load_s = time.perf_counter() - t_load
    files, _ = discover(path)
    # warm-up on files from the middle of the series (lung there, so both models run; the first inference
    # allocates); they are read again below
    k = analyzer.config.batch * analyzer.workers
    mid = max(0, len(files) // 2 - k // 2)
    analyze_files(files[mid: mid + k], analyzer, 10.0)

    lesion_ad = analyzer.lesion.adapter
    deferred = isinstance(lesion_ad, DeferredAdapter)  # a lesion bundle in two graphs
    if deferred:
        lesion_ad.slices = lesion_ad.deferred_runs = 0  # not the warm-up's
    per_stage: dict[str, list[float]] = {k: [] for k in ("headers", "decode") + STAGES + ("case_logic",)}
    # end to end, as `analyze` does it: the header pass (group and order the series) overlapped with decode and
    # analysis of the batches already read
    t0 = time.perf_counter()
    done = analyze_files(files, analyzer, 10.0)
    if not done.series:
        raise SystemExit(f"{path}: no usable DICOM series")
    largest = max(done.series, key=lambda a: len(a.series.slices))
    series, kept, findings = largest.series, largest.kept, largest.findings
    n = len(series.slices)
    analysed = sum(len(a.kept) + len(a.rejected) for a in done.series)  # every series found is analysed
    rejected, bad, decode_s = done.rejected, largest.rejected, largest.decode_s
    t_case = time.perf_counter()
    verdict, ordered = analyzer.verdict(kept, findings)  # the rule the daemon and analyze apply
    case_ms = (time.perf_counter() - t_case) * 1000.0
    wall = time.perf_counter() - t0
    # the daemon re-applies the rule to the series so far after every take of batch x workers slices: its summed
    # cost over the series (slices arriving in series order, as a console exports them)
    take = analyzer.config.batch * analyzer.workers
    t_rule = time.perf_counter()
    for k in range(take, len(ordered) + take, take):
        decide(ordered[:k], analyzer.rule, final=False)
    rule_stream_s = time.perf_counter() - t_rule
    # the lesion bundle's second graph: on how many of the slices the lesion model saw it had to run
    deferred_share = round(lesion_ad.deferred_runs / max(1, lesion_ad.slices), 3) if deferred else None
    pixels = pixel_codec(series.slices[0].key)
    batch = analyzer.config.batch
    for i in range(0, len(findings), batch):
        for k in STAGES:
            per_stage[k].append(findings[i].timings_ms.get(k, 0.0))
    per_stage["headers"].append(done.header_s * 1000.0 / max(1, len(files)))
    per_stage["decode"].append(decode_s * 1000.0 / max(1, n))
    per_stage["case_logic"].append(case_ms / max(1, n))

    # streaming: slices arrive one at a time; latency = last slice in → verdict out
    tail = sorted(series.slices, key=sort_key)[-min(streaming_slices, n):]
    stream_findings = []
    lat = 0.0
    for k, s in enumerate(tail):
        t = time.perf_counter()
        load_pixels(s)
        f = analyzer.findings([s])[0]
        s.hu = None
        stream_findings.append(f)
        stream_findings.sort(key=lambda x: -x.position)
        decide(stream_findings, analyzer.rule, final=False)
        lat = time.perf_counter() - t
    sps = analysed / wall if wall > 0 else 0.0
    return {
        "slices": analysed,
        "wall_s": round(wall, 3),
        "slices_per_s": round(sps, 2),
        "study_515_s": round(515 / sps, 2) if sps else None,
        "stage_ms": {k: _pcts(v) for k, v in per_stage.items()},
        "stage_ms_mean": {k: round(float(np.mean(v)), 3) if v else 0.0 for k, v in per_stage.items()},
        "deferred_share": deferred_share,
        "pixels": pixels,
        "streaming_latency_s": round(lat, 3),
        "rule_stream_s": round(rule_stream_s, 3),
        "rule_take": take,
        "model_load_s": round(load_s, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "result": verdict.result,
        "evidence": verdict.evidence.as_dict() if verdict.evidence else None,
        "focal": verdict.focal.as_dict() if verdict.focal else None,
        "device": analyzer.device,
        "precision": precision,
        "workers": analyzer.workers,
        "batch": analyzer.config.batch,
        "bundles": analyzer.bundles,
        "rejected": len(rejected) + len(bad),
        "settings": changed_settings(analyzer.config),
    }


def changed_settings(cfg) -> dict:
    """The pipeline settings of `cfg` that differ from the defaults (runtime choices left out: reported apart)."""
    from dataclasses import asdict

    from appliance.config import AnalysisConfig

    skip = {"backend", "precision", "threads", "workers", "batch", "bundle_dir"}
    default = asdict(AnalysisConfig())
    return {k: v for k, v in asdict(cfg).items() if k not in skip and v != default[k]}


def run_bench(path: Path | None, backends: list[str], precision: str = "int8", slices: int = 120,
              syntax: str = "explicit", threads: int | None = None, streaming_slices: int = 8,
              bundles: Path | None = None, workers: int | None = None, batch: int | None = None,
              resample_mm: float | None = None, analysis: dict | None = None) -> dict:
    """Parent: generate (or resample) a series if asked, run each backend in a child process, collect the results.
    `analysis`: a configuration's analysis settings, for every child."""
    tmp = None
    if path is None:
        tmp = tempfile.TemporaryDirectory(prefix="ctriage-bench-")
        path = generate_series(Path(tmp.name), slices, syntax)
        source = f"generated phantom, {slices} slices, {syntax}"
    elif resample_mm:
        from appliance.resample import resample_series

        tmp = tempfile.TemporaryDirectory(prefix="ctriage-bench-")
        n = resample_series(path, Path(tmp.name), resample_mm)
        source = f"{path} resampled to {resample_mm:g} mm: {n} slices (interpolated pixels, vendor headers)"
        path = Path(tmp.name)
    else:
        source = str(path)
    out: dict = {"machine": machine(), "source": source, "backends": {}}
    try:
        for be in backends:
            cmd = [sys.executable, "-m", "appliance.bench", "--child", str(path), "--backend", be,
                   "--precision", precision, "--streaming-slices", str(streaming_slices)]
            for flag, value in (("--threads", threads), ("--workers", workers), ("--batch", batch)):
                if value:
                    cmd += [flag, str(value)]
            if bundles:
                cmd += ["--bundles", str(bundles)]
            if analysis:
                cmd += ["--analysis", json.dumps(analysis)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                out["backends"][be] = {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
                continue
            out["backends"][be] = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if tmp is not None:
            tmp.cleanup()
    return out


def _child(argv: list[str]) -> int:
    from appliance.malloc import limit_arenas

    limit_arenas()  # as every `ctriage` command does
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", required=True)
    ap.add_argument("--backend", required=True)
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--streaming-slices", type=int, default=8)
    ap.add_argument("--bundles", type=Path)
    ap.add_argument("--analysis", type=json.loads, help="analysis settings (JSON object of AnalysisConfig fields)")
    a = ap.parse_args(argv)
    res = bench_backend(Path(a.child), a.backend, a.precision, a.threads, a.streaming_slices, a.bundles,
                        a.workers, a.batch, a.analysis)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
