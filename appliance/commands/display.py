"""The fever-clinic triage screen: a local web page fed live by the appliances' MQTT verdicts.

Open the printed address in a kiosk browser (1920×1080 at 3 m). Verdicts, key images and each appliance's
online/offline state arrive over MQTT; a tap on a tile publishes "seen" back (ctriage/<device>/ack/<study_key>).
Runs until interrupted (Ctrl-C or SIGTERM).
"""
from __future__ import annotations

import argparse
import signal
import threading

from appliance.commands.common import add_config_argument, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mqtt-url", metavar="URL",
                   help="broker, mqtt[s]://[user@]host[:port] (default: config [mqtt] url)")
    p.add_argument("--bind", metavar="ADDR", help="listen address (default: config [display] bind, 127.0.0.1)")
    p.add_argument("--port", type=int, metavar="N",
                   help="HTTP port (default: config [display] port, 8080; 0: any free)")
    add_config_argument(p)


def run(args: argparse.Namespace) -> int:
    from appliance.errors import UsageError
    from appliance.display.server import DisplayServer

    cfg = load_config(args)
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UsageError(f"--port: must be between 0 and 65535, got {args.port}")
    server = DisplayServer(cfg, mqtt_url=args.mqtt_url, bind=args.bind, port=args.port).start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"triage display on {server.url} (broker {server.broker_label}); Ctrl-C to stop", flush=True)
    try:
        done.wait()
    finally:
        server.stop()
    return 0
