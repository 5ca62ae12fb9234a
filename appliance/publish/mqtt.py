"""Getting messages out: a small `Transport` interface, its MQTT implementation (paho-mqtt 2.x), and the outbox
pump that drains the store's outbox through a transport, in order, one acknowledged message at a time.

MQTT: protocol 5 where the broker speaks it (falls back to 3.1.1 in `protocol = "auto"`), persistent session
(clean_start False + session expiry / clean_session False), QoS 1, last will (`status` offline, retained), TLS
(CA, client certificate) and user/password from the URL, the config or CTRIAGE_MQTT_PASSWORD, reconnect with
exponential backoff. A message counts as delivered only when the broker acknowledged it (PUBACK); paho re-sends
unacknowledged messages after a reconnect, and the outbox re-sends them after a restart (at least once).
Subscription handlers run on their own thread, so a slow handler never stalls the network loop.
"""
from __future__ import annotations

import logging
import os
import queue
import ssl
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from appliance.config import ConfigError, MQTTConfig

log = logging.getLogger("ctriage.mqtt")

PASSWORD_ENV = "CTRIAGE_MQTT_PASSWORD"
CONNACK_TIMEOUT_S = 5.0  # protocol = auto: no CONNACK this long after the socket opened → try the other protocol
AckCallback = Callable[[str | None], None]  # None: acknowledged; else why the broker refused it
Handler = Callable[..., None]  # (topic, payload), or (topic, payload, retained) when subscribed with_retain
LinkListener = Callable[[bool, str | None], None]  # (connected, why not: "refused: …", "connection lost", …)


# -- broker address ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool
    username: str = ""
    password: str = ""

    def redacted(self) -> str:
        user = f"{self.username}:***@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_url(url: str) -> BrokerURL:
    """mqtt[s]://[user[:pass]@]host[:port] → BrokerURL (default port 1883, or 8883 with TLS)."""
    u = urlsplit(url)
    if u.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"[mqtt] url: must start with mqtt:// or mqtts://, got {url!r}")
    try:
        port = u.port
    except ValueError:
        raise ConfigError(f"[mqtt] url: invalid port in {url!r}") from None
    if not u.hostname:
        raise ConfigError(f"[mqtt] url: no host in {url!r}")
    tls = u.scheme == "mqtts"
    return BrokerURL(u.hostname, port or (8883 if tls else 1883), tls, unquote(u.username or ""),
                     unquote(u.password or ""))


def credentials(cfg: MQTTConfig, url: BrokerURL) -> tuple[str, str]:
    """(username, password): the URL's, else config username and CTRIAGE_MQTT_PASSWORD or password_file."""
    user = url.username or cfg.username
    pw = url.password
    if not pw:
        pw = os.environ.get(PASSWORD_ENV, "")
    if not pw and cfg.password_file:
        pw = Path(cfg.password_file).expanduser().read_text().strip()
    return user, pw


# -- the interface -----------------------------------------------------------------------------------------------
class Transport(ABC):
    """A way out for the appliance's messages (MQTT here; another transport implements the same few calls).

    `send` is asynchronous: `on_ack` is called (on any thread) once the far end has taken the message.
    `generation` changes whenever messages handed over earlier may have been lost (a new connection object), so
    the outbox pump knows to send its in-flight message again.
    """

    name = "transport"
    generation = 0
    _link_listeners: tuple[LinkListener, ...] = ()

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self, offline_payload: bytes | None = None) -> None:
        """Leave cleanly; publish `offline_payload` as the final retained status first when given."""

    @abstractmethod
    def send(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry: int | None = None,
             on_ack: AckCallback | None = None) -> None: ...

    @abstractmethod
    def subscribe(self, topic: str, handler: Handler, *, with_retain: bool = False) -> None:
        """Call `handler(topic, payload)` for each message matching `topic`; with_retain: also pass the message's
        retain flag (a retained message is old state, a live one news)."""

    @abstractmethod
    def set_status(self, payload: bytes) -> None:
        """The retained status message: sent now when connected, and again on every (re)connect."""

    def health(self) -> dict[str, Any]:
        return {"transport": self.name, "connected": self.connected}

    def add_link_listener(self, listener: LinkListener) -> None:
        """`listener(connected, why)` on every change of the link (on any thread); why is None when connected,
        else "refused: <reason>", "connection lost" or "broker unreachable"."""
        self._link_listeners = (*self._link_listeners, listener)

    def _link(self, connected: bool, why: str | None = None) -> None:
        for listener in self._link_listeners:
            try:
                listener(connected, why)
            except Exception:
                log.exception("link listener failed")


# -- MQTT --------------------------------------------------------------------------------------------------------
class MQTTTransport(Transport):
    name = "mqtt"

    def __init__(self, cfg: MQTTConfig, client_id: str, status_topic: str | None, will_payload: bytes = b"",
                 url: str | None = None, *, clean: bool = False) -> None:
        """status_topic None: no status and no last will (a client that only listens, like the display).
        clean: a clean session that the broker forgets at disconnect (for clients whose state is the retained
        messages), instead of the persistent session that keeps QoS 1 messages while offline."""
        self.cfg = cfg
        self.clean = clean
        self.url = parse_url(url or cfg.url)
        self.username, self.password = credentials(cfg, self.url)
        self.client_id = client_id
        self.status_topic, self.will_payload = status_topic, will_payload
        self.protocol = "3.1.1" if cfg.protocol == "3.1.1" else "5"
        self._status: bytes | None = None
        self._subs: list[tuple[str, Handler, bool]] = []
        self._client: Any = None
        self._connected = threading.Event()
        self._lock = threading.Lock()  # never held while calling into paho
        self._pending: dict[int, AckCallback] = {}
        self._early: dict[int, str | None] = {}
        self._inbox: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._flip = threading.Event()
        self._handlers_thread: threading.Thread | None = None
        self._supervisor: threading.Thread | None = None
        self._connected_once = False
        self._socket_opened: float | None = None
        self.since: float | None = None
        self.last_error: str | None = None
        self.connects = 0
        self.refused = 0

    # -- state ---------------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def health(self) -> dict[str, Any]:
        return {"transport": "mqtt", "url": self.url.redacted(), "connected": self.connected,
                "protocol": self.protocol, "since": self.since, "connects": self.connects,
                "last_error": self.last_error, "refused_messages": self.refused}

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._handlers_thread = threading.Thread(target=self._dispatch, name="mqtt-handlers", daemon=True)
        self._handlers_thread.start()
        self._client = self._make_client()
        self._connect(self._client)
        if self.cfg.protocol == "auto":
            self._supervisor = threading.Thread(target=self._supervise, name="mqtt-protocol", daemon=True)
            self._supervisor.start()

    def stop(self, offline_payload: bytes | None = None) -> None:
        self._stopping.set()
        self._flip.set()
        c = self._client
        if c is not None:
            if offline_payload is not None and self.connected:
                try:
                    info = c.publish(self.status_topic, offline_payload, qos=1, retain=True)
                    info.wait_for_publish(timeout=3.0)
                except Exception as e:  # noqa: BLE001 - best effort on the way out
                    log.debug("offline status not sent: %s", e)
            try:
                c.disconnect()
            except Exception:
                pass
            try:
                c.loop_stop()
            except Exception:
                pass
        self._connected.clear()
        self._inbox.put(None)
        if self._handlers_thread is not None:
            self._handlers_thread.join(5)
        if self._supervisor is not None:
            self._supervisor.join(5)

    def _make_client(self) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        v5 = self.protocol == "5"
        kw: dict[str, Any] = {"callback_api_version": CallbackAPIVersion.VERSION2, "client_id": self.client_id,
                              "protocol": mqtt.MQTTv5 if v5 else mqtt.MQTTv311, "reconnect_on_failure": True}
        if not v5:
            kw["clean_session"] = self.clean
        c = mqtt.Client(**kw)
        c.max_inflight_messages_set(20)
        c.reconnect_delay_set(max(1, int(self.cfg.reconnect_min_seconds)), max(1, int(self.cfg.reconnect_max_seconds)))
        if self.status_topic is not None:
            c.will_set(self.status_topic, self.will_payload, qos=1, retain=True)
        if self.username:
            c.username_pw_set(self.username, self.password or None)
        if self.url.tls or self.cfg.ca_file:
            c.tls_set(ca_certs=self.cfg.ca_file or None, certfile=self.cfg.cert_file or None,
                      keyfile=self.cfg.key_file or None, cert_reqs=ssl.CERT_REQUIRED)
            if self.cfg.tls_insecure:
                c.tls_insecure_set(True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        c.on_publish = self._on_publish
        c.on_socket_open = self._on_socket_open
        c.on_message = self._on_message
        return c

    def _connect(self, c: Any) -> None:
        kw: dict[str, Any] = {}
        if self.protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if self.clean else int(self.cfg.session_expiry_seconds)
            kw = {"clean_start": self.clean, "properties": props}
        c.connect_async(self.url.host, self.url.port, keepalive=self.cfg.keepalive, **kw)
        c.loop_start()

    def _supervise(self) -> None:
        """protocol = auto: a broker that refuses, closes or ignores an MQTT 5 CONNECT gets 3.1.1 (and back)."""
        while not self._stopping.is_set():
            if not self._flip.wait(0.5):
                opened = self._socket_opened
                if (self._connected_once or opened is None or self.connected
                        or time.monotonic() - opened < CONNACK_TIMEOUT_S):
                    continue
            if self._stopping.is_set():
                return
            self._flip.clear()
            self._socket_opened = None
            old = self._client
            try:
                old.loop_stop()
            except Exception:
                pass
            self.protocol = "3.1.1" if self.protocol == "5" else "5"
            log.warning("MQTT: no CONNACK from the broker; trying protocol %s", self.protocol)
            self._client = self._make_client()
            self.generation += 1
            time.sleep(min(2.0, self.cfg.reconnect_min_seconds))
            if not self._stopping.is_set():
                self._connect(self._client)

    # -- paho callbacks (network thread) -----------------------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            self.last_error = f"connection refused: {reason_code}"
            log.error("MQTT: %s (%s)", self.last_error, self.url.redacted())
            if self.cfg.protocol == "auto" and not self._connected_once and int(getattr(reason_code, "value", 0)) in (
                    1, 0x84):  # unacceptable / unsupported protocol version
                self._flip.set()
            self._link(False, f"refused: {reason_code}")
            return
        self._connected_once = True
        self.connects += 1
        self.since = time.time()
        self.last_error = None
        session = bool(getattr(flags, "session_present", False))
        log.info("MQTT: connected to %s (protocol %s, session %s)", self.url.redacted(), self.protocol,
                 "resumed" if session else "new")
        subs = list(self._subs)
        if subs:
            client.subscribe([(t, self.cfg.qos) for t, _, _ in subs])
        if self._status is not None and self.status_topic is not None:
            client.publish(self.status_topic, self._status, qos=1, retain=True)
        self._connected.set()
        self._link(True)

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        self._socket_opened = time.monotonic()

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self.last_error = f"cannot reach the broker at {self.url.redacted()}"
        log.debug("MQTT: %s", self.last_error)
        self._link(False, "broker unreachable")

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        was = self.connected
        self._connected.clear()
        if self._stopping.is_set():
            return
        self.last_error = f"disconnected: {reason_code}"
        if was:
            log.warning("MQTT: connection lost (%s); reconnecting with backoff", reason_code)
        elif self.cfg.protocol == "auto" and not self._connected_once:
            self._flip.set()
        self._link(False, "connection lost")

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        refused = str(reason_code) if getattr(reason_code, "is_failure", False) else None
        with self._lock:
            cb = self._pending.pop(mid, None)
            if cb is None:
                self._early[mid] = refused
        if cb is not None:
            self._ack(cb, refused)

    def _ack(self, cb: AckCallback, refused: str | None) -> None:
        if refused:
            self.refused += 1
        try:
            cb(refused)
        except Exception:
            log.exception("MQTT: acknowledgement handler failed")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self._inbox.put((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _dispatch(self) -> None:
        import paho.mqtt.client as mqtt

        while True:
            item = self._inbox.get()
            if item is None:
                return
            topic, payload, retained = item
            for pattern, handler, with_retain in list(self._subs):
                if mqtt.topic_matches_sub(pattern, topic):
                    try:
                        handler(topic, payload, retained) if with_retain else handler(topic, payload)
                    except Exception:
                        log.exception("MQTT: handler for %s failed", pattern)

    # -- sending -------------------------------------------------------------------------------------------------
    def send(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry: int | None = None,
             on_ack: AckCallback | None = None) -> None:
        c = self._client
        props = None
        if expiry and self.protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = int(expiry)
        info = c.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc not in (0, 4):  # 4: not connected (paho keeps QoS>0 messages and sends them on reconnect)
            import paho.mqtt.client as mqtt

            err = mqtt.error_string(info.rc)
            if on_ack is not None:
                self._ack(on_ack, f"not accepted by the client: {err}")
            return
        cb = on_ack or (lambda refused: None)
        with self._lock:
            early = self._early.pop(info.mid, "pending")
            if early == "pending":
                self._pending[info.mid] = cb
        if early != "pending":
            self._ack(cb, early)

    def subscribe(self, topic: str, handler: Handler, *, with_retain: bool = False) -> None:
        self._subs.append((topic, handler, with_retain))
        c = self._client
        if c is not None and self.connected:
            c.subscribe(topic, qos=self.cfg.qos)

    def set_status(self, payload: bytes) -> None:
        self._status = payload
        c = self._client
        if c is not None and self.connected and self.status_topic is not None:
            c.publish(self.status_topic, payload, qos=1, retain=True)


# -- outbox pump -------------------------------------------------------------------------------------------------
class OutboxPump:
    """Drains the store's outbox through a transport: oldest first, one message in flight, deleted only when
    acknowledged. Survives disconnects (the transport re-sends) and restarts (the outbox is durable)."""

    def __init__(self, store: Any, transport: Transport, retry_seconds: float = 30.0) -> None:
        self.store, self.transport, self.retry_seconds = store, transport, retry_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._inflight: int | None = None
        self._sent_at = 0.0
        self._generation = -1
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.delivered = 0
        self.dropped = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)

    def kick(self) -> None:
        self._wake.set()

    def drain(self, timeout: float) -> bool:
        """Wait until the outbox is empty (True) or timeout / no connection (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.store.outbox_count() == 0:
                return True
            if not self.transport.connected:
                return False
            self._wake.set()
            time.sleep(0.05)
        return self.store.outbox_count() == 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:
                log.exception("outbox: send failed; retrying")
                time.sleep(1.0)
            self._wake.wait(0.5)
            self._wake.clear()

    def _step(self) -> None:
        while not self._stop.is_set() and self.transport.connected:
            with self._lock:
                inflight = self._inflight
            if inflight is not None:
                stale = self.transport.generation != self._generation
                if not stale and time.monotonic() - self._sent_at < self.retry_seconds:
                    return  # waiting for the acknowledgement
                msg = self.store.outbox_next(inflight - 1)
                if msg is None or msg.id != inflight:
                    with self._lock:
                        self._inflight = None
                    continue
            else:
                msg = self.store.outbox_next()
                if msg is None:
                    return
            with self._lock:
                self._inflight = msg.id
            self._sent_at = time.monotonic()
            self._generation = self.transport.generation
            self.store.outbox_attempt(msg.id)
            self.transport.send(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain, expiry=msg.expiry,
                                on_ack=lambda refused, mid=msg.id: self._acked(mid, refused))
            return

    def _acked(self, msg_id: int, refused: str | None) -> None:
        if refused:
            log.error("outbox: message %d refused (%s); dropped so later messages are not held up", msg_id, refused)
            self.dropped += 1
        else:
            self.delivered += 1
        self.store.outbox_done(msg_id)
        with self._lock:
            if self._inflight == msg_id:
                self._inflight = None
        self._wake.set()
