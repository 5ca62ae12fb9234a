"""The triage screen's server: MQTT in (paho), Server-Sent Events out, acknowledgements back to MQTT.

One process holds the MQTT session and the current state (appliance.display.state); pages get a snapshot on
connect and every change after it over `GET /events` (text/event-stream). A click on "seen" is `POST /api/ack`;
the server publishes `<prefix>/<device>/ack/<study_key>` (QoS 1, retained, expiring with the studies) and the tile
turns acknowledged when the broker echoes it back, so every screen shows the same.

Routes: `/` page · `/static/<file>` assets · `/events` SSE · `/api/state` JSON snapshot · `/api/ack` POST ·
`/img/<device>/<study_key>/<hash>.png` key image · `/healthz`.

For the demo: `start_display(cfg)` runs it in this process (threads) and returns the running DisplayServer;
`spawn_display(...)` runs `ctriage display` as a subprocess and returns once it serves.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import re
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from appliance.config import Config, ConfigError
from appliance.display.state import DEVICE_RE, KEY_RE, DisplayState, iso, utcnow

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
PING_SECONDS = 5.0  # SSE heartbeat: the page reconnects when it hears nothing for a few of these
EXPIRE_CHECK_SECONDS = 30.0
CONNACK_TIMEOUT_S = 5.0  # protocol = auto: no CONNACK this long after the socket opened → try the other protocol
MAX_CLIENT_BACKLOG = 2000  # events queued for one slow page before it is dropped (it reconnects and resyncs)
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                 ".ico": "image/x-icon", ".wav": "audio/wav"}
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "media-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass
class Broker:
    """Where and how to reach the broker (the same URL and credential rules as the appliance's transport)."""

    host: str
    port: int
    tls: bool
    username: str = ""
    password: str = ""

    @property
    def label(self) -> str:
        """host:port, never the credentials."""
        return f"{self.host}:{self.port}"


def parse_broker(url: str, cfg: Config) -> Broker:
    from appliance.publish.mqtt import credentials, parse_url

    u = parse_url(url)
    user, password = credentials(cfg.mqtt, u)
    return Broker(u.host, u.port, u.tls, user, password)


def screen_name(cfg: Config) -> str:
    return (cfg.display.name or f"display@{socket.gethostname()}")[:64]


class Hub:
    """Fan-out of page events to the connected pages (one queue per page)."""

    def __init__(self) -> None:
        self.clients: set[queue.Queue] = set()

    def add(self) -> queue.Queue:
        q: queue.Queue = queue.Queue(MAX_CLIENT_BACKLOG)
        self.clients.add(q)
        return q

    def remove(self, q: queue.Queue) -> None:
        self.clients.discard(q)

    def send(self, events: list[tuple[str, dict]]) -> None:
        for q in list(self.clients):
            for ev in events:
                try:
                    q.put_nowait(ev)
                except queue.Full:  # a stalled page: cut it off, it reconnects and gets a fresh snapshot
                    self.clients.discard(q)
                    _drain_then_close(q)
                    break

    def close_all(self) -> None:
        for q in list(self.clients):
            _drain_then_close(q)
        self.clients.clear()


def _drain_then_close(q: queue.Queue) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass
    q.put_nowait(None)


class DisplayServer:
    """HTTP + SSE server fed by an MQTT subscription. `start()` returns at once; the broker may come later."""

    def __init__(self, cfg: Config, *, mqtt_url: str | None = None, bind: str | None = None,
                 port: int | None = None, static_dir: Path = STATIC) -> None:
        self.cfg = cfg
        self.broker = parse_broker(mqtt_url or cfg.mqtt.url, cfg)
        self.bind = bind if bind is not None else cfg.display.bind
        self.port = port if port is not None else cfg.display.port
        self.prefix = cfg.mqtt.prefix.rstrip("/")
        self.name = screen_name(cfg)
        self.static = {p.name: p for p in static_dir.iterdir() if p.is_file() and p.suffix in CONTENT_TYPES}
        self.lock = threading.RLock()
        self.state = DisplayState(prefix=self.prefix, expire_minutes=cfg.display.expire_minutes,
                                  show_labels=cfg.privacy.send_patient_labels)
        self.hub = Hub()
        self.stopping = threading.Event()
        self.httpd: ThreadingHTTPServer | None = None
        self.client = None
        self.protocol = "3.1.1" if cfg.mqtt.protocol == "3.1.1" else "5"
        self.client_id = cfg.mqtt.client_id or f"ctriage-display-{uuid.uuid4().hex[:10]}"
        self._flip = threading.Event()  # protocol = auto: the broker does not speak MQTT 5, try 3.1.1 (and back)
        self._connected_once = False
        self._opened: float | None = None  # when the socket of the current attempt opened; None after a CONNACK
        self._threads: list[threading.Thread] = []

    # ---- lifecycle ------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.httpd is not None, "not started"
        host, port = self.httpd.server_address[:2]
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(str(host), str(host))
        return f"http://{host}:{port}/"

    def start(self) -> "DisplayServer":
        server = self

        class Handler(_Handler):
            display = server

        try:
            self.httpd = _HTTPServer((self.bind, self.port), Handler)
        except OSError as e:
            raise ConfigError(f"cannot listen on {self.bind}:{self.port}: {e.strerror or e}") from None
        self._emit(self.state.set_link(False, self.broker.label, "connecting"))
        self.client = self._make_client()
        self._connect(self.client)
        jobs = [(self.httpd.serve_forever, "display-http"), (self._expiry_loop, "display-expiry")]
        if self.cfg.mqtt.protocol == "auto":
            jobs.append((self._supervise, "display-mqtt-protocol"))
        for target, name in jobs:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("triage display on %s (broker %s)", self.url, self.broker.label)
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._flip.set()
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None
        if self.httpd is not None:
            self.httpd.shutdown()
            with self.lock:
                self.hub.close_all()
            self.httpd.server_close()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> "DisplayServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def wait_broker(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.state.link["connected"]:
                    return True
            time.sleep(0.05)
        return False

    def _expiry_loop(self) -> None:
        while not self.stopping.wait(EXPIRE_CHECK_SECONDS):
            with self.lock:
                self._emit(self.state.expire_old())

    def _emit(self, events: list[tuple[str, dict]]) -> None:
        if events:
            with self.lock:
                self.hub.send(events)

    # ---- MQTT --------------------------------------------------------------------------------------------------

    def _make_client(self):
        from paho.mqtt import client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        m = self.cfg.mqtt
        v5 = self.protocol == "5"
        kw: dict[str, Any] = {"callback_api_version": CallbackAPIVersion.VERSION2, "client_id": self.client_id,
                              "protocol": mqtt.MQTTv5 if v5 else mqtt.MQTTv311}
        if not v5:
            kw["clean_session"] = True  # the retained messages are the state; nothing to catch up on
        c = mqtt.Client(**kw)
        if self.broker.username:
            c.username_pw_set(self.broker.username, self.broker.password or None)
        if self.broker.tls or m.ca_file:
            import ssl

            c.tls_set(ca_certs=m.ca_file or None, certfile=m.cert_file or None, keyfile=m.key_file or None,
                      cert_reqs=ssl.CERT_REQUIRED)
            if m.tls_insecure:
                c.tls_insecure_set(True)
        # a screen retries at least every 10 s whatever the appliance backoff: it should look live again quickly
        c.reconnect_delay_set(max(1, int(m.reconnect_min_seconds)), max(1, min(10, int(m.reconnect_max_seconds))))
        c.max_queued_messages_set(1000)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        c.on_socket_open = self._on_socket_open
        c.on_message = self._on_message
        return c

    def _connect(self, c) -> None:
        kw = {"clean_start": True} if self.protocol == "5" else {}
        c.connect_async(self.broker.host, self.broker.port, keepalive=self.cfg.mqtt.keepalive, **kw)
        c.loop_start()

    def _supervise(self) -> None:
        """protocol = auto: a broker that refuses, closes on or ignores an MQTT 5 CONNECT gets 3.1.1 (and back)."""
        while not self.stopping.is_set():
            if not self._flip.wait(0.5):
                opened = self._opened
                if self._connected_once or opened is None or time.monotonic() - opened < CONNACK_TIMEOUT_S:
                    continue
            if self.stopping.is_set():
                return
            self._flip.clear()
            self._opened = None
            old = self.client
            if old is not None:
                old.loop_stop()
            self.protocol = "3.1.1" if self.protocol == "5" else "5"
            log.warning("broker %s does not answer MQTT %s; trying MQTT %s", self.broker.label,
                        "3.1.1" if self.protocol == "5" else "5", self.protocol)
            self.client = self._make_client()
            if not self.stopping.wait(min(2.0, self.cfg.mqtt.reconnect_min_seconds)):
                self._connect(self.client)

    def _on_socket_open(self, client, userdata, sock) -> None:
        self._opened = time.monotonic()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._opened = None
        if reason_code.is_failure:
            log.warning("broker %s refused the connection: %s", self.broker.label, reason_code)
            if self.cfg.mqtt.protocol == "auto" and not self._connected_once and reason_code.value in (1, 0x84):
                self._flip.set()  # unacceptable / unsupported protocol version
            with self.lock:
                self._emit(self.state.set_link(False, self.broker.label, f"refused: {reason_code}"))
            return
        self._connected_once = True
        p = self.prefix
        client.subscribe([(f"{p}/+/{kind}", 1) for kind in ("status", "stats")]
                         + [(f"{p}/+/{kind}/+", 1) for kind in ("verdict", "overlay", "ack")])
        log.info("connected to broker %s (MQTT %s)", self.broker.label, self.protocol)
        with self.lock:
            self._emit(self.state.set_link(True, self.broker.label))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.stopping.is_set():
            return
        if self.cfg.mqtt.protocol == "auto" and not self._connected_once and self._opened is not None:
            self._flip.set()  # closed on our CONNECT without a CONNACK
        log.warning("lost the broker %s (%s); reconnecting", self.broker.label, reason_code)
        with self.lock:
            self._emit(self.state.set_link(False, self.broker.label, "connection lost"))

    def _on_connect_fail(self, client, userdata) -> None:
        with self.lock:
            self._emit(self.state.set_link(False, self.broker.label, "broker unreachable"))

    def _on_message(self, client, userdata, msg) -> None:
        try:
            with self.lock:
                self._emit(self.state.handle(msg.topic, msg.payload, bool(msg.retain)))
        except Exception:  # never let one message stop the subscription
            log.exception("display: failed to handle a message on %s", msg.topic[:200])

    def ack(self, device: str, study_key: str) -> tuple[HTTPStatus, dict[str, Any]]:
        """Publish "seen" for a study shown here; returns the HTTP status and body for the page."""
        if not DEVICE_RE.match(device) or not KEY_RE.match(study_key):
            return HTTPStatus.BAD_REQUEST, {"error": "device or study_key malformed"}
        now = utcnow()
        payload = {"schema": "ctriage.ack/1", "study_key": study_key, "seen_by": self.name, "created": iso(now)}
        problem = self.state.validators.problem("ack", payload)
        if problem:  # a bad screen name would be a configuration error; refuse rather than publish junk
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"ack schema: {problem}"}
        with self.lock:
            if f"{device}/{study_key}" not in self.state.studies:
                return HTTPStatus.NOT_FOUND, {"error": "no such study on this screen"}
            events = self.state.local_ack(device, study_key, self.name, now)
            self._emit(events)
            connected = self.state.link["connected"]
        client = self.client
        if client is None:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": "display is stopping"}
        props = None
        if self.protocol == "5":  # the ack expires with the study (MQTT 3.1.1 has no message expiry)
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = self.cfg.display.expire_minutes * 60
        info = client.publish(f"{self.prefix}/{device}/ack/{study_key}", json.dumps(payload), qos=1, retain=True,
                              properties=props)
        return HTTPStatus.ACCEPTED, {"ok": True, "queued": not connected or info.rc != 0, "seen_by": self.name}

    def page_config(self) -> dict[str, Any]:
        return {"sound": self.cfg.display.sound, "expire_minutes": self.cfg.display.expire_minutes,
                "name": self.name, "labels": self.cfg.privacy.send_patient_labels}


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class _Handler(BaseHTTPRequestHandler):
    display: DisplayServer
    server_version = "ctriage-display"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http %s " + format, self.address_string(), *args)

    # ---- responses ------------------------------------------------------------------------------------------

    def _headers(self, status: int, ctype: str, length: int | None = None, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if ctype.startswith("text/html"):
            self.send_header("Content-Security-Policy", CSP)
        self.end_headers()

    def _send(self, status: int, body: bytes, ctype: str, cache: str = "no-store") -> None:
        self._headers(status, ctype, len(body), cache)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    # ---- routes ---------------------------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        d = self.display
        path = urllib.parse.urlsplit(self.path).path
        if path in ("/", "/index.html"):
            return self._file("index.html")
        if path.startswith("/static/"):
            return self._file(path[len("/static/"):])
        if path == "/events":
            return self._events()
        if path == "/api/state":
            with d.lock:
                snap = d.state.snapshot()
            return self._json(200, {**snap, "config": d.page_config(), "server_time": iso(utcnow())})
        if path == "/healthz":
            with d.lock:
                link = d.state.link_view()
            return self._json(200, {"ok": True, "broker": link})
        m = re.fullmatch(r"/img/([A-Za-z0-9][A-Za-z0-9_.-]{0,63})/([0-9a-f]{16})/([0-9a-f]{16})\.png", path)
        if m:
            with d.lock:
                png = d.state.image(m.group(1), m.group(2), m.group(3))
            if png is None:
                return self._json(404, {"error": "no key image"})
            return self._send(200, png, "image/png", cache="private, max-age=86400")
        return self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path != "/api/ack":
            return self._json(404, {"error": "not found"})
        if self.headers.get_content_type() != "application/json":
            return self._json(415, {"error": "send application/json"})
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = -1
        if not 0 < n <= 4096:
            return self._json(400, {"error": "body missing or too large"})
        try:
            body = json.loads(self.rfile.read(n))
            device, key = body["device"], body["study_key"]
            if not isinstance(device, str) or not isinstance(key, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return self._json(400, {"error": "expected {\"device\": …, \"study_key\": …}"})
        status, out = self.display.ack(device, key)
        return self._json(status, out)

    def _file(self, name: str) -> None:
        p = self.display.static.get(name)  # only files that were in static/ at start: no path tricks
        if p is None:
            return self._json(404, {"error": "not found"})
        return self._send(200, p.read_bytes(), CONTENT_TYPES[p.suffix], cache="no-cache")

    def _events(self) -> None:
        d = self.display
        if self.command == "HEAD":
            return self._headers(200, "text/event-stream; charset=utf-8")
        with d.lock:
            q = d.hub.add()
            snap = {**d.state.snapshot(), "config": d.page_config(), "server_time": iso(utcnow())}
        try:
            self._headers(200, "text/event-stream; charset=utf-8", cache="no-store")
            self.wfile.write(b"retry: 1000\n\n" + _sse("snapshot", snap))
            self.wfile.flush()
            while not d.stopping.is_set():
                try:
                    ev = q.get(timeout=PING_SECONDS)
                except queue.Empty:
                    ev = ("ping", {"server_time": iso(utcnow())})
                if ev is None:
                    break
                self.wfile.write(_sse(*ev))
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
            pass
        finally:
            with d.lock:
                d.hub.remove(q)
            self.close_connection = True


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# ---- starting it from elsewhere (the demo) -----------------------------------------------------------------------


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
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, cwd=root, env={**os.environ, **(env or {})},
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
