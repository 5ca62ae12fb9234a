"""The whole chain on one machine, on a SYNTHETIC study: broker → appliance → triage display, fed like a CT console.

Starts a local MQTT broker (mosquitto when installed, else the embedded Python broker), the appliance daemon on a
temporary watch folder and state folder, and the triage display on http://127.0.0.1:8080/ (or the next free port);
then exports two synthetic chest phantom studies into the watch folder slice by slice, the way a CT console does
(temporary name, then rename; a short pause between slices): study 1 has lesions in both lungs (positive), study 2 has
clear lungs (negative). The verdicts are printed as the display receives them (PROVISIONAL, then FINAL), then a
table; the demo keeps running (drop more DICOM files into the watch folder) until Ctrl-C, which stops everything
and removes the temporary folders.

The phantom is made of ellipses (body, lungs, heart, spine), random vessels and patchy ground-glass opacities: it
is not a patient. ctriage is not a medical device.

Examples:
  ctriage demo                          # open the printed address in a browser; Ctrl-C to stop
  ctriage demo --once --pause 0         # feed, print the final verdicts, stop (CI)
  ctriage demo --embedded-broker --port 9000 --keep
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from appliance.commands.common import add_backend_arguments, add_config_argument, load_config
from appliance.commands.demo_console import Console, VerdictFeed, print_summary
from appliance.commands.demo_studies import export_studies, write_sample_studies

PORT_TRIES = 20  # without --port: the configured display port (8080) or one of the next ones
MB_PER_SLICE = 0.6  # 512² × 16 bit and header
MAX_SLICES = 400


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, metavar="N",
                   help="display HTTP port on 127.0.0.1 (default: 8080 or the next free one; 0: any free)")
    p.add_argument("--slices", type=int, default=60, metavar="N", help="slices per study (default 60, at least 20)")
    p.add_argument("--pause", type=float, default=0.3, metavar="SECONDS",
                   help="pause between exported slices (default 0.3)")
    p.add_argument("--quiet-seconds", type=float, default=3.0, metavar="S",
                   help="a series is complete after S seconds without a new slice (default 3)")
    p.add_argument("--once", action="store_true",
                   help="feed the studies, wait for the final verdicts, print them and stop (exit 0)")
    p.add_argument("--no-display", action="store_true", help="do not start the triage display")
    p.add_argument("--embedded-broker", action="store_true",
                   help="use the embedded Python MQTT broker (amqtt) even when mosquitto is installed")
    p.add_argument("--out", metavar="DIR",
                   help="working folder (new or empty; kept): export/, state/, broker/, studies/ "
                        "(default: a temporary folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the temporary working folder")
    add_backend_arguments(p)
    add_config_argument(p)


# -- set-up helpers ------------------------------------------------------------------------------------------------
def _port_free(port: int) -> str | None:
    """None when 127.0.0.1:port can be bound, else why not."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def _choose_port(requested: int | None, default: int) -> list[int]:
    from appliance.errors import UsageError

    if requested is not None:
        if not 0 <= requested <= 65535:
            raise UsageError(f"--port: must be between 0 and 65535, got {requested}")
        why = _port_free(requested) if requested else None
        if why:
            raise UsageError(f"--port {requested}: 127.0.0.1:{requested} is busy ({why}); choose another with --port")
        return [requested]
    ports = [p for p in range(default, min(default + PORT_TRIES, 65536)) if _port_free(p) is None]
    if not ports:
        raise UsageError(f"ports {default}-{default + PORT_TRIES - 1} on 127.0.0.1 are all busy; "
                         f"choose one with --port (0: any free)")
    return ports


def _check_broker_possible(embedded: bool) -> None:
    from appliance.embedded_broker import mosquitto_path
    from appliance.errors import UsageError

    if not embedded and mosquitto_path():
        return
    try:
        import amqtt.broker  # noqa: F401
    except ImportError:
        what = ("--embedded-broker needs the amqtt package" if embedded else
                "mosquitto is not installed and neither is the amqtt package")
        raise UsageError(f"no MQTT broker possible: {what} (apt-get install mosquitto, or "
                         f"pip install -e '.[demo]')") from None


def _work_dir(args: argparse.Namespace) -> tuple[Path, bool]:
    """(working folder, remove it at the end)."""
    from appliance.errors import UsageError

    if args.out:
        out = Path(args.out).expanduser()
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"--out {out}: exists and is not an empty folder; name a new one")
        out.mkdir(parents=True, exist_ok=True)
        return out, False
    return Path(tempfile.mkdtemp(prefix="ctriage-demo-")), not args.keep


def _quiet_loggers(verbose: bool) -> None:
    if not verbose:  # the embedded broker reports every client (and our port probe) at warning level
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


# -- the demo ------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from appliance.errors import UsageError

    if not 20 <= args.slices <= MAX_SLICES:
        raise UsageError(f"--slices: between 20 and {MAX_SLICES}, got {args.slices} "
                         f"(a series needs 20 slices for a negative verdict)")
    if not 0 <= args.pause <= 60:
        raise UsageError(f"--pause: between 0 and 60 seconds, got {args.pause:g}")
    if not 0.1 <= args.quiet_seconds <= 3600:
        raise UsageError(f"--quiet-seconds: between 0.1 and 3600, got {args.quiet_seconds:g}")
    _check_broker_possible(args.embedded_broker)
    cfg = load_config(args)
    display_ports = [] if args.no_display else _choose_port(args.port, cfg.display.port)
    _quiet_loggers(getattr(args, "verbose", False))

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():  # a second Ctrl-C: stop waiting for a clean shutdown
            raise KeyboardInterrupt
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    console = Console()
    work, remove = _work_dir(args)
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(_finish, work, remove, console)
            return _run(args, cfg, work, display_ports, stop, console, stack)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _finish(work: Path, remove: bool, console: Console) -> None:
    if remove:
        shutil.rmtree(work, ignore_errors=True)
        console.say("stopped; temporary files removed")
    else:
        console.say(f"stopped; files kept in {work}")


def _run(args: argparse.Namespace, cfg: Any, work: Path, display_ports: list[int], stop: threading.Event,
         console: Console, stack: contextlib.ExitStack) -> int:
    import pydicom

    from appliance.embedded_broker import BrokerError, mosquitto_path, start_broker
    from appliance.errors import UsageError
    from appliance.config import ConfigError
    from appliance.daemon import Daemon
    from appliance.privacy import pseudonym

    need_mb = 2 * args.slices * MB_PER_SLICE * 3 + 50  # studies/, export → processed/, headroom
    free_mb = shutil.disk_usage(work).free / 2**20
    if free_mb < need_mb:
        raise UsageError(f"{work}: {free_mb:.0f} MB free, the demo needs about {need_mb:.0f} MB")

    console.say("ctriage demo — the studies are SYNTHETIC: a chest phantom made of ellipses, not a patient. "
                "ctriage is not a medical device.")
    console.say(f"working folder {work}")

    # broker
    embedded = args.embedded_broker or mosquitto_path() is None
    try:
        url, stop_broker = start_broker(workdir=work / "broker", prefer="amqtt" if embedded else "mosquitto")
    except BrokerError as e:
        raise UsageError(f"no MQTT broker: {e}") from None
    stack.callback(lambda: (stop_broker(), console.say("broker stopped")))
    console.say(f"MQTT broker started at {url} ({'embedded Python broker (amqtt)' if embedded else 'mosquitto'})")

    # appliance
    cfg = cfg.with_overrides({
        "state_dir": str(work / "state"), "watch.dir": str(work / "export"),
        "watch.stable_seconds": 0.2, "watch.rescan_seconds": 1.0, "watch.incomplete_seconds": 5.0,
        "watch.min_free_mb": 0,  # the demo's folder may sit on a small /tmp; its space was checked above
        "series.quiet_seconds": args.quiet_seconds, "mqtt.url": url,
        "mqtt.reconnect_min_seconds": 0.2, "mqtt.reconnect_max_seconds": 2.0, "mqtt.stats_interval_seconds": 2.0,
        **({"mqtt.protocol": "3.1.1"} if embedded else {}),  # amqtt speaks MQTT 3.1.1 only: no fallback round trip
    })
    Path(cfg.watch.dir).mkdir(parents=True, exist_ok=True)
    console.say("loading the models …")
    daemon = Daemon(cfg)
    daemon.start()
    stack.callback(lambda: (daemon.stop(), console.say("appliance stopped")))
    a = daemon.analyzer
    models = " + ".join(f"{b['name']} {b['version']}" for b in a.bundles)
    _wait(lambda: daemon.transport.connected, 10.0, stop)
    console.say(f"appliance {cfg.device_id} listening: watch folder {cfg.watch.dir}; models {models}; "
                f"{a.backend} ({a.precision}) on {a.device}")

    # display
    display_url = None
    if display_ports:
        from appliance.display.server import DisplayServer

        err: Exception | None = None
        server = None
        for port in display_ports:
            try:
                server = DisplayServer(cfg, mqtt_url=url, bind="127.0.0.1", port=port).start()
                break
            except ConfigError as e:  # taken between the check and now
                err = e
        if server is None:
            raise UsageError(f"display: {err}")
        stack.callback(lambda: (server.stop(), console.say("display stopped")))
        if not server.wait_broker(10):
            console.say("warning: the display has not reached the broker yet")
        display_url = server.url
        console.say(f"triage display at {display_url} — open it in a browser (Ctrl-C here stops the demo)")

    # the studies
    console.say(f"writing 2 SYNTHETIC studies of {args.slices} slices (study 1: lesions in both lungs; "
                f"study 2: clear lungs) …")
    studies = write_sample_studies(work / "studies", args.slices)
    for s in studies:
        uid = str(pydicom.dcmread(s.files[0], stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                  .StudyInstanceUID)
        s.study_key = pseudonym(daemon.secret, uid)
    feed = VerdictFeed(url, cfg.mqtt.prefix, cfg.device_id, studies, console)
    stack.callback(feed.close)

    export = Path(cfg.watch.dir)
    export_studies(studies, export, args.slices, args.pause, stop, console.say)
    if stop.is_set():
        console.say("interrupted; stopping …")
        return 0

    keys = [s.study_key for s in studies]
    limit = 60.0 + 2 * args.slices * 0.5 + args.quiet_seconds
    console.say(f"export done; the appliance declares each series complete after {args.quiet_seconds:g} s "
                f"without a new slice")
    if not _wait(lambda: feed.has_final(keys), limit, stop):
        if stop.is_set():
            console.say("interrupted; stopping …")
            return 0
        missing = [str(s.number) for s in studies if s.study_key not in feed.finals]
        console.say(f"error: no final verdict for study {', '.join(missing)} after {limit:.0f} s "
                    f"(state and logs in {work}; run with -v for the appliance log)")
        return 1
    print_summary(studies, feed, console)
    if display_url:
        console.say(f"triage display: {display_url}")
    if args.once:
        return 0
    console.say(f"running: drop DICOM files into {export} to analyse more; Ctrl-C stops the demo")
    while not stop.wait(0.5):
        pass
    console.say("stopping …")
    return 0


def _wait(cond: Any, timeout: float, stop: threading.Event) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if stop.wait(0.1):
            return False
    return bool(cond())
