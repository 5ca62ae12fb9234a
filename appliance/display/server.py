"""The triage screen's server: MQTT in (a Transport), Server-Sent Events out, acknowledgements back to MQTT.

One process holds the MQTT link and the current state (appliance.display.screen_state); pages get a snapshot on
connect and every change after it over `GET /events` (text/event-stream). A click on "seen" is `POST /api/ack`;
the server publishes `<prefix>/<device>/ack/<study_key>` (QoS 1, retained, expiring with the studies) and the tile
turns acknowledged when the broker echoes it back, so every screen shows the same.

The MQTT link is the appliance's own `MQTTTransport` (TLS, credentials, MQTT 5 → 3.1.1 fallback, reconnects), in a
clean session without status or last will: the retained messages are the state, nothing to catch up on.

Routes: `/` page · `/static/<file>` assets · `/events` SSE · `/api/state` JSON snapshot · `/api/ack` POST ·
`/img/<device>/<study_key>/<hash>.png` key image · `/healthz`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import queue
import re
import socket
import threading
import time
import urllib.parse
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from appliance.config import Config, ConfigError
from appliance.display.screen_state import DEVICE_RE, KEY_RE, DisplayState, iso, utcnow
from appliance.publish.messages import ACK_SCHEMA, Topics
from appliance.publish.mqtt import MQTTTransport, Transport

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
PING_SECONDS = 5.0  # SSE heartbeat: the page reconnects when it hears nothing for a few of these
EXPIRE_CHECK_SECONDS = 30.0
RECONNECT_MAX_S = 10  # a screen retries at least this often whatever the appliance backoff: it looks live again soon
MAX_CLIENT_BACKLOG = 2000  # events queued for one slow page before it is dropped (it reconnects and resyncs)
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                 ".ico": "image/x-icon", ".wav": "audio/wav"}
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "media-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def screen_name(cfg: Config) -> str:
    return (cfg.display.name or f"display@{socket.gethostname()}")[:64]


def display_transport(cfg: Config, mqtt_url: str | None = None) -> MQTTTransport:
    """The screen's MQTT link: the [mqtt] config (URL, TLS, credentials, protocol) in a clean session, no status."""
    m = dataclasses.replace(cfg.mqtt, reconnect_max_seconds=min(RECONNECT_MAX_S, cfg.mqtt.reconnect_max_seconds))
    client_id = cfg.mqtt.client_id or f"ctriage-display-{uuid.uuid4().hex[:10]}"
    return MQTTTransport(m, client_id, None, url=mqtt_url or cfg.mqtt.url, clean=True)


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
    """HTTP + SSE server fed by MQTT subscriptions. `start()` returns at once; the broker may come later.

    transport: the link to the broker, started and stopped with the server (default: `display_transport`)."""

    def __init__(self, cfg: Config, *, transport: Transport | None = None, mqtt_url: str | None = None,
                 bind: str | None = None, port: int | None = None, static_dir: Path = STATIC) -> None:
        self.cfg = cfg
        self.transport = transport or display_transport(cfg, mqtt_url)
        t = self.transport
        self.broker_label = f"{t.url.host}:{t.url.port}" if isinstance(t, MQTTTransport) else t.name  # no secrets
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
        self._emit(self.state.set_link(False, self.broker_label, "connecting"))
        topics = Topics.all_devices(self.prefix)
        for topic in [topics.status, topics.stats, *topics.studies()]:
            self.transport.subscribe(topic, self._on_message, with_retain=True)
        self.transport.add_link_listener(self._on_link)
        self.transport.start()
        for target, name in [(self.httpd.serve_forever, "display-http"), (self._expiry_loop, "display-expiry")]:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("triage display on %s (broker %s)", self.url, self.broker_label)
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self.httpd is not None:  # else start() failed before the transport started
            self.transport.stop()
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

    # ---- MQTT ----------------------------------------------------------------------------------------------

    @property
    def protocol(self) -> str:
        """The MQTT protocol version spoken ("5" or "3.1.1"; protocol = auto settles on one at connect)."""
        return str(getattr(self.transport, "protocol", ""))

    def _on_link(self, connected: bool, why: str | None) -> None:
        with self.lock:
            self._emit(self.state.set_link(connected, self.broker_label, why))

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            with self.lock:
                self._emit(self.state.handle(topic, payload, retained))
        except Exception:  # never let one message stop the subscription
            log.exception("display: failed to handle a message on %s", topic[:200])

    def ack(self, device: str, study_key: str) -> tuple[HTTPStatus, dict[str, Any]]:
        """Publish "seen" for a study shown here; returns the HTTP status and body for the page."""
        if not DEVICE_RE.match(device) or not KEY_RE.match(study_key):
            return HTTPStatus.BAD_REQUEST, {"error": "device or study_key malformed"}
        now = utcnow()
        payload = {"schema": ACK_SCHEMA, "study_key": study_key, "seen_by": self.name, "created": iso(now)}
        problem = self.state.validators.problem("ack", payload)
        if problem:  # a bad screen name would be a configuration error; refuse rather than publish junk
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"ack schema: {problem}"}
        with self.lock:
            if f"{device}/{study_key}" not in self.state.studies:
                return HTTPStatus.NOT_FOUND, {"error": "no such study on this screen"}
            events = self.state.local_ack(device, study_key, self.name, now)
            self._emit(events)
            connected = self.state.link["connected"]
        if self.stopping.is_set():
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": "display is stopping"}
        refused: list[str] = []  # filled at once when the client would not even queue it
        # the ack expires with the study (MQTT 5 message expiry; 3.1.1 has none)
        self.transport.send(Topics(self.prefix, device).ack(study_key), json.dumps(payload).encode(), qos=1,
                            retain=True, expiry=self.cfg.display.expire_minutes * 60,
                            on_ack=lambda why: refused.append(why) if why else None)
        return HTTPStatus.ACCEPTED, {"ok": True, "queued": not connected or bool(refused), "seen_by": self.name}

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
