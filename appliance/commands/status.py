"""What the daemon is doing: running or not, health, queue, series in flight, recent verdicts, bundles, backend
and device in use, broker link, DICOM node, delivery of results to PACS. Reads the daemon's status file, store and
PACS outbox (works while it runs, and after it stopped).

Exit status: 0 running and healthy, 1 running but degraded, 3 not running.
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from appliance.commands.common import add_config_argument, load_config
from appliance.pipeline.anatomy import patient_terms

STALE_S = 15.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", metavar="DIR", help="the daemon's state directory (default: config state_dir)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--verdicts", type=int, default=5, metavar="N", help="recent verdicts to show (default 5)")
    add_config_argument(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def collect(state_dir: Path, verdicts: int = 5) -> dict[str, Any]:
    from appliance.daemon import DB_FILE, read_status
    from appliance.store import Store

    st = read_status(state_dir) or {}
    age = time.time() - float(st.get("heartbeat", 0) or 0)
    running = bool(st) and st.get("state") in ("running", "starting", "stopping") and age < STALE_S \
        and _alive(int(st.get("pid", 0) or 0))
    out: dict[str, Any] = {"state_dir": str(state_dir), "running": running,
                           "daemon_state": st.get("state", "never started") if st else "never started",
                           "heartbeat_age_s": round(age, 1) if st else None,
                           "health": st.get("health") if running else None,
                           "problems": st.get("problems", {}) if running else {},
                           "device": st.get("device"), "version": st.get("version"), "started": st.get("started"),
                           "analyzer": st.get("analyzer"), "broker": st.get("broker") if running else None,
                           "open_series": st.get("open_series", []) if running else [],
                           "slices_per_s": st.get("slices_per_s"), "stage_ms": st.get("stage_ms"),
                           "last_verdict_latency_s": st.get("last_verdict_latency_s")}
    out["dicom"] = st.get("dicom") if running else None
    out["pacs"] = pacs_state(state_dir, st.get("pacs") if running else None)
    spool = state_dir / "spool"
    out["queue"] = sum(1 for e in os.scandir(spool) if e.is_file() and not e.name.startswith(".")) \
        if spool.is_dir() else 0
    try:
        store = Store(state_dir / DB_FILE, readonly=True)
    except Exception as e:  # noqa: BLE001
        out["store"] = f"unavailable: {e}"
        out["counts"], out["recent_verdicts"] = {}, []
        return out
    try:
        out["counts"] = store.counts()
        out["recent_verdicts"] = [
            {k: v.get(k) for k in ("created", "study_key", "series_key", "state", "result", "complete_reason")}
            | {"evidence": v.get("evidence"), "focal": v.get("focal"), "slices": (v.get("counts") or {}).get("slices")}
            for v in store.recent_verdicts(verdicts)]
        queued = _queued_for_pacs(store)
        if queued and out["pacs"] is None:
            out["pacs"] = {"running": False, "calling_ae_title": None, "building": 0, "dropped": 0, "error": None,
                           "destinations": []}
        if out["pacs"] is not None:
            out["pacs"]["queued"] = queued
    except sqlite3.Error as e:  # being created right now, or damaged
        out["store"] = f"unavailable: {e}"
        out["counts"], out["recent_verdicts"] = {}, []
    finally:
        store.close()
    return out


def _queued_for_pacs(store: Any) -> int:
    """Final verdicts committed but not yet handed to the PACS sender (the daemon's store)."""
    from appliance.daemon import PACS_PENDING

    try:
        return len(json.loads(store.kv_get(PACS_PENDING) or "[]"))
    except (json.JSONDecodeError, TypeError):
        return 0


def pacs_state(state_dir: Path, live: dict[str, Any] | None) -> dict[str, Any] | None:
    """PACS delivery per destination: pending and failed from the outbox on disk, delivered (since the daemon
    started), last error and next retry from the running daemon. None when there is neither."""
    from appliance.publish.pacs_outbox import JOBS

    root = state_dir / "pacs-outbox"
    dests: dict[str, dict[str, Any]] = {}
    for d in (live or {}).get("destinations", []):
        dests[d["destination"]] = {"destination": d["destination"], "configured": True, "pending": d["pending"],
                                   "failed": d["failed"], "delivered": d["delivered"],
                                   "last_error": d.get("last_error"), "retry_in_s": d.get("retry_in_s")}
    building = 0
    if root.is_dir():
        jobs = root / JOBS
        building = sum(1 for _ in jobs.glob("[0-9]*.json")) if jobs.is_dir() else 0
        for d in sorted(root.iterdir()):
            if not d.is_dir() or d.name == JOBS:
                continue
            label = d / "destination.txt"
            name = label.read_text().strip() if label.is_file() else d.name
            pending = sum(1 for _ in d.glob("[0-9]*.dcm"))
            failed = sum(1 for _ in (d / "failed").glob("*.dcm")) if (d / "failed").is_dir() else 0
            if name not in dests and live is not None and not (pending or failed):
                continue  # an empty folder of a destination that is no longer configured
            e = dests.setdefault(name, {"destination": name, "configured": False if live is not None else None,
                                        "delivered": None, "last_error": None, "retry_in_s": None})
            e["pending"], e["failed"] = pending, failed
    if live is None and not dests and not building:
        return None
    return {"running": live is not None, "calling_ae_title": (live or {}).get("calling_ae_title"),
            "queued": (live or {}).get("queued", 0), "building": building, "dropped": (live or {}).get("dropped", 0),
            "error": (live or {}).get("error"), "destinations": list(dests.values())}


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    info = collect(cfg.state_path, args.verdicts)
    code = 3 if not info["running"] else (0 if info["health"] == "ok" else 1)
    if args.json:
        print(json.dumps(info, indent=1))
        return code
    print(_render(info))
    return code


def _render(i: dict[str, Any]) -> str:
    lines = []
    if i["running"]:
        lines.append(f"ctriage daemon: running ({i['device']}, version {i['version']}, since {i['started']}), "
                     f"health {i['health'].upper()}")
        for k, v in (i["problems"] or {}).items():
            lines.append(f"  ! {k}: {v}")
    else:
        age = f", last heartbeat {i['heartbeat_age_s']:.0f} s ago" if i["heartbeat_age_s"] is not None else ""
        lines.append(f"ctriage daemon: NOT RUNNING (last state: {i['daemon_state']}{age}) — "
                     f"state dir {i['state_dir']}")
    a = i.get("analyzer")
    if a:
        lines.append(f"analysis: {a['backend']} ({a['precision']}) on {a['device']}")
        lines.append("bundles: " + ", ".join(f"{b['name']} {b['version']} ({b['sha256'][:12]})" for b in a["bundles"]))
    b = i.get("broker")
    if b:
        link = "connected" if b.get("connected") else f"DISCONNECTED ({b.get('last_error') or 'connecting'})"
        lines.append(f"broker: {b.get('url', '?')} {link}, MQTT {b.get('protocol', '?')}")
    c = i.get("counts", {})
    lines.append(f"queue: {i['queue']} file(s) waiting; outbox: {c.get('outbox', 0)} message(s) unsent; "
                 f"analysed {c.get('analysed', 0)}, duplicates {c.get('duplicate', 0)}, "
                 f"quarantined {c.get('rejected', 0)}")
    if i.get("slices_per_s") is not None and i["running"]:
        lines.append(f"throughput: {i['slices_per_s']:.2f} slices/s (last minute); stage ms/slice: "
                     + ", ".join(f"{k} {v:.1f}" for k, v in (i.get("stage_ms") or {}).items()))
    dn = i.get("dicom")
    if dn:
        ds = dn.get("stats") or {}
        lines.append(f"DICOM node: {dn['ae_title']} on port {dn['port']}: {ds.get('stored', 0)} instance(s) stored, "
                     f"{ds.get('failed', 0)} refused, {ds.get('refused', 0)} association(s) rejected")
    lines += _render_pacs(i.get("pacs"))
    for s in i.get("open_series", []):
        lines.append(f"in flight: series {s['series_key']} (study {s['study_key']}): {s['slices']} slice(s)"
                     + (f" of {s['expected']}" if s.get("expected") else "")
                     + (f", provisional {s['provisional']}" if s.get("provisional") else "")
                     + (f"; looks incomplete ({s['looks_incomplete']}): waiting for more slices"
                        if s.get("looks_incomplete") else ""))
    if i.get("recent_verdicts"):
        lines.append("recent verdicts:")
        for v in i["recent_verdicts"]:
            ev = v.get("evidence")
            fo = v.get("focal")
            evs = (f" {patient_terms(ev['quadrant'])} run {ev['run']}" if ev
                   else f" (one focal lesion {patient_terms(fo['quadrant'])} run {fo['run']})" if fo else "")
            lines.append(f"  {v['created']}  study {v['study_key']}  {v['state']:<11} {v['result'].upper()}{evs}"
                         + (f"  ({v['complete_reason']})" if v.get("complete_reason") else ""))
    return "\n".join(lines)


def _render_pacs(p: dict[str, Any] | None) -> list[str]:
    if not p:
        return []
    lines = []
    head = "results to PACS" + (f" (calling AE {p['calling_ae_title']})" if p.get("calling_ae_title") else "")
    extra = []
    if p.get("queued"):
        extra.append(f"{p['queued']} verdict(s) not yet queued")
    if p.get("building"):
        extra.append(f"{p['building']} being built")
    if p.get("dropped"):
        extra.append(f"{p['dropped']} could not be built")
    lines.append(head + (": " + ", ".join(extra) if extra else ":"))
    if p.get("error"):
        lines.append(f"  ! {p['error']}")
    for d in p.get("destinations", []):
        delivered = f", {d['delivered']} delivered since start" if d.get("delivered") is not None else ""
        gone = " (no longer configured)" if d.get("configured") is False else ""
        line = f"  {d['destination']}{gone}: {d.get('pending', 0)} pending, {d.get('failed', 0)} failed{delivered}"
        if d.get("last_error"):
            retry = f", retry in {d['retry_in_s']:.0f} s" if d.get("retry_in_s") is not None else ""
            line += f" — {d['last_error']}{retry}"
        lines.append(line)
    return lines
