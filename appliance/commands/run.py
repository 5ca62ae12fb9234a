"""The appliance daemon: watch folder and/or DICOM node → analysis → provisional and final verdicts over MQTT, and
the final ones as DICOM SR (and key image) to PACS.

Runs until SIGTERM or SIGINT, then finishes the slices in hand, flushes its state and leaves the broker cleanly
(status offline). State (spool, processed/, quarantine/, ctriage.db, status.json) lives in --state-dir; a restart
resumes from it. `ctriage status --state-dir DIR` shows what the daemon is doing.

Examples:
  ctriage run --watch /srv/ct-export --mqtt-url mqtt://broker.local:1883 --device-id ct-room-2
  ctriage run --config /etc/ctriage/ctriage.toml --dicom-port 11112
  ctriage run --dicom-port 11112 --dicom-aet CT2_TRIAGE --pacs PACS@pacs.local:104 --mqtt-url mqtt://broker.local
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from appliance.dicom_names import is_ae_title
from appliance.errors import UsageError
from appliance.commands.common import add_backend_arguments, add_config_argument, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    p.add_argument("--watch", metavar="DIR", help="export folder to watch (config watch.dir)")
    p.add_argument("--state-dir", metavar="DIR", help="spool, processed/, quarantine/, store (config state_dir)")
    p.add_argument("--mqtt-url", metavar="URL", help="mqtt[s]://[user:pass@]host:port (config mqtt.url)")
    p.add_argument("--device-id", metavar="ID", help="this appliance's name in MQTT topics (config device_id)")
    p.add_argument("--quiet-seconds", type=float, metavar="S",
                   help="a series is complete after S seconds without a new slice (config series.quiet_seconds)")
    p.add_argument("--trust-root", metavar="FILE",
                   help="TUF root.json to start trusting model updates from when the state holds none yet "
                        "(config fleet.trust_root; default: the project root shipped in config/trust)")
    p.add_argument("--trust-key", action="append", default=[], metavar="FILE",
                   help="legacy Ed25519 public key (PEM) that may vouch once for a first TUF root; repeatable "
                        "(config fleet.trust_keys)")
    p.add_argument("--dicom-port", type=int, metavar="PORT",
                   help="run the DICOM node (C-STORE SCP) on PORT, feeding the spool (config [dicom] enabled, port)")
    p.add_argument("--dicom-aet", metavar="AET",
                   help="the DICOM node's AE title, also the calling AE title towards PACS unless "
                        "pacs.calling_ae_title is set (config dicom.ae_title)")
    p.add_argument("--pacs", action="append", default=[], metavar="AET@host:port",
                   help="send each final verdict as DICOM SR (and key image) to this PACS; repeatable, adds to "
                        "config pacs.destinations")
    p.add_argument("--log-json", action="store_true", default=None, help="JSON lines logs (config log_json)")
    add_backend_arguments(p)


def configure(args: argparse.Namespace):
    """Config file (or defaults) with the command-line overrides applied and checked."""
    cfg = load_config(args)
    overrides: dict[str, Any] = {}
    if args.watch:
        overrides["watch.dir"] = args.watch
    if args.mqtt_url:
        overrides["mqtt.url"] = args.mqtt_url
    if args.device_id:
        overrides["device_id"] = args.device_id
    if args.quiet_seconds is not None:
        overrides["series.quiet_seconds"] = args.quiet_seconds
    if args.log_json:
        overrides["log_json"] = True
    if args.dicom_port is not None:
        overrides.update({"dicom.enabled": True, "dicom.port": args.dicom_port})
    if args.dicom_aet is not None:
        aet = args.dicom_aet.strip()
        if not is_ae_title(aet):
            raise UsageError(f"--dicom-aet {args.dicom_aet!r}: an AE title is 1 to 16 printable characters, no '\\'")
        overrides["dicom.ae_title"] = aet
    if args.pacs:
        from appliance.publish.dicom_peer import Destination

        for d in args.pacs:
            try:
                Destination.parse(d)
            except ValueError as e:
                raise UsageError(f"--pacs {e}") from None
        overrides["pacs.destinations"] = list(dict.fromkeys([*cfg.pacs.destinations, *(d.strip() for d in args.pacs)]))
    for k in args.trust_key:
        if not Path(k).expanduser().is_file():
            raise UsageError(f"--trust-key {k}: no such file")
    if args.trust_root:
        if not Path(args.trust_root).expanduser().is_file():
            raise UsageError(f"--trust-root {args.trust_root}: no such file")
        overrides["fleet.trust_root"] = str(Path(args.trust_root).expanduser())
    cfg = cfg.with_overrides(overrides)
    from appliance.publish.mqtt_url import parse_url

    parse_url(cfg.mqtt.url)
    return cfg


def run(args: argparse.Namespace) -> int:
    from appliance.daemon import Daemon, setup_logging
    from appliance.fleet.updater import Updater

    cfg = configure(args)
    setup_logging(cfg, getattr(args, "verbose", False))
    daemon = Daemon(cfg)
    # before the analyzer loads: repairs <state>/bundles after a power cut; trust starts from fleet.trust_root, or
    # the shipped project root, or (legacy keys configured) a first root that one of those keys signed.
    updater = Updater.from_config(cfg, daemon.publish, lambda: daemon.idle_gate(600), extra_trust=args.trust_key)
    daemon.attach_updater(updater)
    try:
        return daemon.run_forever()
    finally:
        updater.close()
