"""`ctriage demo` end to end: a real broker (mosquitto, and the embedded amqtt), the daemon with the committed model
bundles, the triage display in headless Chromium, a SYNTHETIC phantom exported slice by slice; clean shutdown
(no broker process, no listening port, no temporary folder left). Screenshot: test-artifacts/demo/demo.png.
"""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .test_display import VIEW, browser  # noqa: F401 - the shared headless Chromium fixture

ROOT = Path(__file__).resolve().parents[1]
ART = ROOT / "test-artifacts" / "demo"


class Demo:
    """`ctriage demo …` as a child process; its stdout collected line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "demo", *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    @property
    def text(self) -> str:
        with self._cv:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.lines:
                    m = re.search(pattern, line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r}; output so far:\n" + "\n".join(self.lines))
                self._cv.wait(min(left, 0.5))

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the demo did not exit in time; output:\n" + self.text) from None
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def processes_mentioning(text: str) -> list[str]:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if text in cmd:
            found.append(f"{p.info['pid']}: {cmd}")
    return found


def assert_cleaned_up(d: Demo) -> None:
    """Nothing left: no process started for the demo's folder, no broker or display port open, no temp folder."""
    out = d.text
    work = re.search(r"^working folder (\S+)$", out, re.M).group(1)
    broker_port = int(re.search(r"MQTT broker started at mqtt://127\.0\.0\.1:(\d+)", out).group(1))
    assert "broker stopped" in out and "appliance stopped" in out
    assert not Path(work).exists(), f"{work} left behind"
    assert processes_mentioning(work) == []
    assert not listening(broker_port), "the broker still listens"
    m = re.search(r"http://127\.0\.0\.1:(\d+)/", out)
    if m:
        assert not listening(int(m.group(1))), "the display still listens"


def final_lines(out: str) -> dict[int, str]:
    return {int(m.group(2)): m.group(1) for m in re.finditer(r"▶ FINAL (POSITIVE|NEGATIVE|INDETERMINATE)\s+study (\d)",
                                                             out)}


def test_demo_once_runs_the_whole_chain_and_leaves_nothing_behind():
    d = Demo("--once", "--slices", "30", "--pause", "0")
    try:
        rc = d.wait(120)
    finally:
        d.kill()
    out = d.text
    print(out)
    assert rc == 0, out
    assert "SYNTHETIC" in out
    assert re.search(r"MQTT broker started at mqtt://127\.0\.0\.1:\d+ \((mosquitto|embedded Python broker)", out)
    assert re.search(r"^appliance ct-room-1 listening: watch folder \S+; models valid-area \S+ \+ lesion \S+", out, re.M)
    assert re.search(r"^triage display at http://127\.0\.0\.1:\d+/ — open it in a browser", out, re.M)
    assert "slice 30/30 exported" in out
    # the committed models fire on the lesion phantom and not on the clear one
    assert final_lines(out) == {1: "POSITIVE", 2: "NEGATIVE"}, out
    table = out.split("Final verdicts", 1)[1]
    assert re.search(r"^1 \(\w{6}\)\s+lesions in both lungs\s+30\s+\d+\s+\d+\s+POSITIVE\s+\S+", table, re.M)
    assert re.search(r"^2 \(\w{6}\)\s+clear lungs\s+30\s+\d+\s+0\s+NEGATIVE\s+no lesion run", table, re.M)
    assert re.search(r"^triage display: http://127\.0\.0\.1:\d+/$", out, re.M)
    assert_cleaned_up(d)


def test_demo_with_the_embedded_broker(tmp_path):
    pytest.importorskip("amqtt.broker", reason="amqtt not installed (pip install -e '.[demo]')")
    out_dir = tmp_path / "demo"
    d = Demo("--once", "--slices", "20", "--pause", "0", "--no-display", "--embedded-broker", "--out", str(out_dir))
    try:
        rc = d.wait(120)
    finally:
        d.kill()
    out = d.text
    print(out)
    assert rc == 0, out
    assert "(embedded Python broker (amqtt))" in out
    assert "http://" not in out  # --no-display
    assert set(final_lines(out)) == {1, 2}
    assert f"files kept in {out_dir}" in out
    assert len(list((out_dir / "state" / "processed").rglob("*.dcm"))) == 40  # every exported slice taken
    assert processes_mentioning(str(out_dir)) == []
    port = int(re.search(r"mqtt://127\.0\.0\.1:(\d+)", out).group(1))
    assert not listening(port)


def test_demo_on_the_display_then_ctrl_c(browser):  # noqa: F811
    from playwright.sync_api import expect

    d = Demo("--slices", "30", "--pause", "0.2", "--port", "0")
    try:
        url = d.wait_for(r"triage display at (http://127\.0\.0\.1:\d+/)", 60).group(1)
        page = browser.new_page(viewport=VIEW)
        page.goto(url)
        page.wait_for_selector("body.conn-live", timeout=10000)
        pos = page.locator(".tile.flag-positive")
        # the positive study shows PROVISIONAL while slices still arrive, then FINAL
        expect(pos.locator(".strip")).to_contain_text("PROVISIONAL", timeout=60000)
        expect(page.locator(".tile.flag-positive.state-final")).to_have_count(1, timeout=60000)
        expect(page.locator(".tile.flag-negative.state-final")).to_have_count(1, timeout=60000)
        expect(page.locator(".tile")).to_have_count(2)
        expect(pos.locator(".flag-word")).to_have_text("POSITIVE")
        expect(page.locator(".tile.flag-negative .flag-word")).to_have_text("NEGATIVE")
        expect(pos.locator("img.key-img")).to_be_visible(timeout=10000)
        page.wait_for_function("el => el.complete && el.naturalWidth > 0",
                               arg=pos.locator("img.key-img").element_handle(), timeout=10000)
        d.wait_for(r"^Final verdicts", 30)
        ART.mkdir(parents=True, exist_ok=True)
        page.wait_for_timeout(300)  # let the arrival animation settle
        page.screenshot(path=str(ART / "demo.png"))
        page.close()
        assert d.proc.poll() is None, "the demo must keep running until Ctrl-C"
        d.proc.send_signal(signal.SIGINT)
        rc = d.wait(60)
    finally:
        d.kill()
    out = d.text
    print(out)
    assert rc == 0, out
    assert "display stopped" in out
    assert_cleaned_up(d)


def test_busy_port_and_bad_options_are_one_line_errors(tmp_path, capsys):
    from appliance.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["demo", "--port", str(port), "--once"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"ctriage demo: --port {port}: 127.0.0.1:{port} is busy") and "\n" not in err

        from appliance.commands.demo import _choose_port

        assert port not in _choose_port(None, port)  # without --port: the next free one
    assert main(["demo", "--slices", "5"]) == 2
    assert "--slices" in capsys.readouterr().err
    (tmp_path / "x").write_text("")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_no_broker_possible_is_a_one_line_error(monkeypatch, capsys):
    from appliance.cli import main

    monkeypatch.setitem(sys.modules, "amqtt.broker", None)  # the amqtt package missing
    assert main(["demo", "--embedded-broker", "--once", "--no-display"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ctriage demo: no MQTT broker possible: --embedded-broker needs the amqtt package")
    assert "\n" not in err
