"""A real mosquitto broker for tests: started on a free loopback port with a temporary config, stoppable and
restartable (for outage tests). Skips the test with a printed reason when mosquitto is not installed."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """mosquitto on 127.0.0.1:<port>. `extra` is appended to the generated config (listeners, TLS, ACLs…)."""

    def __init__(self, workdir: Path, port: int | None = None, extra: str = "", listener: bool = True) -> None:
        if MOSQUITTO is None:
            reason = "mosquitto is not installed (apt-get install mosquitto)"
            print(f"SKIP: {reason}")
            pytest.skip(reason)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        # as root, mosquitto would drop to its own user and could not write persistence into pytest's temp dirs
        user = ["user root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        lines = user + ["persistence true", f"persistence_location {self.workdir}/", "log_dest stderr",
                 "log_type error", "log_type warning", "log_type notice"]
        if listener:
            lines += [f"listener {self.port} 127.0.0.1", "allow_anonymous true"]
        self.conf.write_text("\n".join(lines) + "\n" + extra + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        logf = self.log.open("ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=logf, stderr=logf)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
