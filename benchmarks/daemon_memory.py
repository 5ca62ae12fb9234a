"""Memory of the daemon over many studies in a row: RSS after each study must stay flat.

    python benchmarks/daemon_memory.py --studies 20 --slices 120 [--json]

Starts a local broker and the daemon in-process, exports N synthetic studies one after the other into its watch
folder, waits for each final verdict, and records the process RSS after each. Prints the series and the growth
from study 2 to the last (study 1 includes model loading and first-inference allocations).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import psutil


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--slices", type=int, default=120)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from appliance.malloc import limit_arenas

    limit_arenas()  # as `ctriage run` does (export MALLOC_ARENA_MAX to compare another setting)
    from appliance.embedded_broker import start_broker
    from appliance.config import from_dict
    from appliance.daemon import Daemon
    from appliance.phantom import PhantomSpec, write_phantom

    work = Path(tempfile.mkdtemp(prefix="ctriage-mem-"))
    url, stop_broker = start_broker(workdir=work / "broker")
    cfg = from_dict({"device_id": "mem-bench", "state_dir": str(work / "state"),
                     "watch": {"dir": str(work / "watch"), "min_free_mb": 0, "stable_seconds": 0.2,
                               "rescan_seconds": 1.0},
                     "series": {"quiet_seconds": 1.0}, "mqtt": {"url": url, "key_images": True}})
    (work / "watch").mkdir(parents=True)
    src = work / "src"
    write_phantom(src, PhantomSpec(slices=a.slices, thickness_mm=1.25, lesion=True))
    files = sorted(src.glob("*.dcm"))
    d = Daemon(cfg)
    d.start()
    proc = psutil.Process(os.getpid())
    rss = []
    t0 = time.time()
    try:
        for k in range(a.studies):
            # a new study each time: re-stamp the UIDs so nothing is a duplicate
            import pydicom
            from pydicom.uid import generate_uid

            study, series = generate_uid(), generate_uid()
            for p in files:
                ds = pydicom.dcmread(p)
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                tmp = work / "watch" / f".{k}-{p.name}.part"
                ds.save_as(tmp)
                os.replace(tmp, work / "watch" / f"{k}-{p.name}")
            time.sleep(2.0)  # let the watch folder take the files (stable time, rescan)
            d.wait_idle(600)  # spool empty, no series in flight (final published), outbox drained
            rss.append(round(proc.memory_info().rss / 2**20, 1))
            if not a.json:
                print(f"study {k + 1:2d}: RSS {rss[-1]:.0f} MB")
    finally:
        d.stop()
        stop_broker()
        shutil.rmtree(work, ignore_errors=True)
    res = {"studies": a.studies, "slices_per_study": a.slices, "rss_mb": rss,
           "growth_mb_study2_to_last": round(rss[-1] - rss[1], 1) if len(rss) > 1 else 0.0,
           "peak_rss_mb": round(max(rss), 1), "minutes": round((time.time() - t0) / 60, 1)}
    print(json.dumps(res) if a.json else f"growth from study 2 to {a.studies}: {res['growth_mb_study2_to_last']} MB")


if __name__ == "__main__":
    main()
