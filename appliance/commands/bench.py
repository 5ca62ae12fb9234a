"""Benchmark the per-slice pipeline on each available backend, side by side in one run.

PATH: a DICOM series to run (default: a generated synthetic series of --slices slices). Prints slices/s end to
end, ms per stage (median / p95), the time a 515-slice study takes at that rate, the streaming verdict latency
after the last slice, and peak RSS. `--json` prints {"backends": {name: {...}}, "machine": {...}}.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from appliance.errors import UsageError
from appliance.commands.common import add_config_argument, table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", metavar="PATH", help="a folder with one DICOM series (default: generated)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--backend", action="append", choices=["openvino", "onnxruntime"],
                   help="backend(s) to run (default: every installed one)")
    p.add_argument("--precision", choices=["int8", "fp32"], default="int8")
    p.add_argument("--slices", type=int, default=120, help="slices in the generated series (default 120)")
    p.add_argument("--syntax", choices=["explicit", "jpeg-lossless", "jpeg2000", "jpeg-ls"], default="explicit",
                   help="transfer syntax of the generated series")
    p.add_argument("--threads", type=int, help="inference threads (default: all cores)")
    p.add_argument("--workers", type=int, help="batches analysed at once, each on its own inference stream "
                                                "(default: 2 with 2+ threads)")
    p.add_argument("--batch", type=int, help="slices per model call and worker (default: config, 4)")
    p.add_argument("--bundles", metavar="DIR", help="directory holding the model bundles (default: the shipped ones)")
    p.add_argument("--resample", type=float, metavar="MM",
                   help="run PATH's series rewritten at MM between slices (a thin-slice series from a thick one: "
                        "real headers, pixels interpolated; for speed and memory only)")
    add_config_argument(p)


def run(args: argparse.Namespace) -> int:
    from appliance.bench import run_bench
    from appliance.inference.factory import available_backends
    from appliance.pipeline.analyzer import STAGES

    backends = args.backend or available_backends()
    if not backends:
        raise UsageError("no inference backend installed")
    path = Path(args.path) if args.path else None
    if path is not None and not path.exists():
        raise UsageError(f"{path}: no such folder")
    if args.resample is not None and path is None:
        raise UsageError("--resample needs PATH: the series to resample")
    bundles = Path(args.bundles) if args.bundles else None
    if bundles is not None and not bundles.is_dir():
        raise UsageError(f"{bundles}: no such folder")
    for name in ("threads", "workers", "batch"):
        v = getattr(args, name)
        if v is not None and not 1 <= v <= 256:
            raise UsageError(f"--{name} must be between 1 and 256")
    from dataclasses import asdict

    from appliance import config as config_mod
    from appliance.resample import ResampleError

    try:
        analysis = asdict(config_mod.load(args.config).analysis)
    except config_mod.ConfigError as e:
        raise UsageError(str(e)) from None
    if bundles is None and analysis.get("bundle_dir"):
        bundles = Path(analysis["bundle_dir"])
    try:
        res = run_bench(path, backends, args.precision, args.slices, args.syntax, args.threads, bundles=bundles,
                        workers=args.workers, batch=args.batch, resample_mm=args.resample, analysis=analysis)
    except ResampleError as e:
        raise UsageError(f"--resample: {e}") from None
    if args.json:
        print(json.dumps(res))
        return 0 if all("error" not in v for v in res["backends"].values()) else 1
    m = res["machine"]
    print(f"{res['source']} on {m['cpu']} ({m['cores']} cores)")
    changed = next((r["settings"] for r in res["backends"].values() if r.get("settings")), None)
    if changed:
        print("settings from the configuration, not the defaults: "
              + ", ".join(f"{k} = {json.dumps(v)}" for k, v in changed.items()))
    print()
    rows = []
    stages = ["headers", "decode", *STAGES, "case_logic"]
    for be, r in res["backends"].items():
        if "error" in r:
            rows.append([be, "error: " + r["error"]] + [""] * (5 + len(stages)))
            continue
        rows.append([be, f"{r['slices_per_s']:.1f}", f"{r['study_515_s']:.1f}", f"{r['streaming_latency_s']:.3f}",
                     f"{r['peak_rss_mb']:.0f}"] + [f"{r['stage_ms'][s]['median']:.1f}/{r['stage_ms'][s]['p95']:.1f}" for s in stages])
    print(table(rows, ["backend", "slices/s", "515-slice s", "stream lat s", "peak MB"] + [f"{s} ms" for s in stages]))
    ok = [r for r in res["backends"].values() if "error" not in r]
    if ok and max(r.get("workers", 1) for r in ok) > 1:
        w = max(r.get("workers", 1) for r in ok)
        print(f"\nstage times are median/p95 per slice within one worker; {w} workers run side by side, "
              f"batch {ok[0].get('batch')}")
    if ok and ok[0].get("pixels"):
        print(f"pixels: {ok[0]['pixels']}")
    for name, r in res["backends"].items():
        if r.get("rule_stream_s") is not None and "error" not in r:
            print(f"{name}: the case rule re-applied after every {r['rule_take']} slices, as the daemon does: "
                  f"{r['rule_stream_s']:.2f} s summed over the series ({r['rule_stream_s'] / r['wall_s']:.0%} of its "
                  "end-to-end time)")
        if r.get("deferred_share") is not None:
            print(f"{name}: the lesion bundle's deferred graph ran on {r['deferred_share']:.0%} of the slices the "
                  "lesion model saw (elsewhere no box could be made with it)")
    return 0 if all("error" not in v for v in res["backends"].values()) else 1
