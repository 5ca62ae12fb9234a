"""A local MQTT broker for the demo and for trying the appliance on one machine.

`start_broker()` starts mosquitto when it is installed (a child process on a loopback port with a temporary
config), otherwise the embedded pure-Python broker from the `amqtt` package (MQTT 3.1.1 only: the appliance falls
back to 3.1.1 by itself). It returns (url, stop). Production sites run their own broker (mosquitto, EMQX, …).
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("ctriage.broker")


class BrokerError(RuntimeError):
    """No broker could be started."""


def mosquitto_path() -> str | None:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if cand and Path(cand).is_file():
            return cand
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float, alive: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def start_mosquitto(port: int, workdir: Path) -> Callable[[], None]:
    exe = mosquitto_path()
    if exe is None:
        raise BrokerError("mosquitto is not installed")
    conf = workdir / "mosquitto.conf"
    # as root, mosquitto would drop to its own user and could not write its log and persistence into workdir
    user = "user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
    conf.write_text(f"{user}listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {workdir}/\nlog_dest file {workdir}/mosquitto.log\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not _wait_port(port, 10.0, lambda: proc.poll() is None):
        proc.kill()
        log_text = (workdir / "mosquitto.log").read_text()[-500:] if (workdir / "mosquitto.log").exists() else ""
        raise BrokerError(f"mosquitto did not start on port {port}: {log_text}")

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    return stop


def start_amqtt(port: int) -> Callable[[], None]:
    try:
        from amqtt.broker import Broker
    except ImportError:
        raise BrokerError("neither mosquitto nor the amqtt package is installed (apt-get install mosquitto, or "
                          "pip install amqtt)") from None
    import asyncio

    ready = threading.Event()
    state: dict = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        state["loop"] = loop
        config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                  "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
        try:
            broker = Broker(config, loop=loop)
            loop.run_until_complete(broker.start())
        except Exception as e:  # noqa: BLE001
            state["error"] = e
            ready.set()
            return
        state["broker"] = broker
        ready.set()
        loop.run_forever()
        try:
            loop.run_until_complete(broker.shutdown())
        except Exception:  # noqa: BLE001
            pass
        loop.close()

    t = threading.Thread(target=run, name="amqtt-broker", daemon=True)
    t.start()
    ready.wait(15)
    if "error" in state or "broker" not in state:
        raise BrokerError(f"the embedded broker did not start: {state.get('error', 'timeout')}")
    if not _wait_port(port, 10.0, t.is_alive):
        raise BrokerError(f"the embedded broker does not listen on port {port}")

    def stop() -> None:
        loop = state.get("loop")
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        t.join(10)

    return stop


def start_broker(port: int | None = None, workdir: str | Path | None = None,
                 prefer: str = "auto") -> tuple[str, Callable[[], None]]:
    """Start a loopback broker; returns (url, stop). prefer: auto (mosquitto, else amqtt) | mosquitto | amqtt."""
    port = port or free_port()
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ctriage-broker-")
        workdir = tmp.name
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    if prefer in ("auto", "mosquitto") and (mosquitto_path() or prefer == "mosquitto"):
        stop = start_mosquitto(port, wd)
        kind = "mosquitto"
    else:
        stop = start_amqtt(port)
        kind = "amqtt (embedded)"
    log.info("local MQTT broker (%s) on 127.0.0.1:%d", kind, port)

    def stop_all() -> None:
        stop()
        if tmp is not None:
            tmp.cleanup()

    return f"mqtt://127.0.0.1:{port}", stop_all
