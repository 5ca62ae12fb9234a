"""Starting the triage display for tests: in this process (threads) or as a `ctriage display` child process."""
from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from appliance.config import Config
from appliance.display.server import DisplayServer

ROOT = Path(__file__).resolve().parents[1]


def start_display(cfg: Config | None = None, *, mqtt_url: str | None = None, bind: str | None = None,
                  port: int | None = None) -> DisplayServer:
    """Run the display in this process (background threads); port 0 picks a free port. Call .stop() when done."""
    from appliance import config as config_mod

    return DisplayServer(cfg or config_mod.load(None), mqtt_url=mqtt_url, bind=bind, port=port).start()


class DisplayProcess:
    """`ctriage display` running as a child process."""

    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc, self.url = proc, url

    def stop(self, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode


def spawn_display(*, config: str | Path | None = None, mqtt_url: str | None = None, bind: str = "127.0.0.1",
                  port: int = 0, timeout: float = 20.0, env: dict[str, str] | None = None) -> DisplayProcess:
    """Start `ctriage display` as a subprocess and return once it listens (port 0 picks a free port)."""
    cmd = [sys.executable, "-m", "appliance.cli", "display", "--bind", bind, "--port", str(port)]
    if mqtt_url:
        cmd += ["--mqtt-url", mqtt_url]
    if config:
        cmd += ["--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, cwd=ROOT, env={**os.environ, **(env or {})},
                            text=True)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ctriage display exited with status {proc.returncode}")
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            m = re.search(r"(http://\S+/)", line)
            if m:
                return DisplayProcess(proc, m.group(1))
    proc.kill()
    proc.wait()
    raise RuntimeError(f"ctriage display did not start within {timeout:g} s")


def validators_over(folder: Path, edit_verdict_schema):
    """The display's validators over a copy of the shipped schemas whose verdict schema `edit_verdict_schema(dict)`
    changed in place (an older schema file, say)."""
    import json
    import shutil

    from appliance.display.screen_state import Validators, schema_dir

    for f in schema_dir().glob("*.schema.json"):
        shutil.copy(f, folder / f.name)
    v = json.loads((folder / "verdict.schema.json").read_text())
    edit_verdict_schema(v)
    (folder / "verdict.schema.json").write_text(json.dumps(v))
    return Validators(folder)
