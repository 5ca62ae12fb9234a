"""The MQTT implementation of the `Transport` interface (appliance.publish.transport), on paho-mqtt 2.x.

MQTT: protocol 5 where the broker speaks it (falls back to 3.1.1 in `protocol = "auto"`), persistent session
(clean_start False + session expiry / clean_session False), QoS 1, last will (`status` offline, retained), TLS
(CA, client certificate) and user/password from the URL, the config or CTRIAGE_MQTT_PASSWORD, reconnect with
exponential backoff. A message counts as delivered only when the broker acknowledged it (PUBACK); paho re-sends
unacknowledged messages after a reconnect, and the outbox (appliance.publish.outbox) re-sends them after a restart
(at least once). Subscription handlers run on their own thread, so a slow handler never stalls the network loop.
The broker address and credentials: appliance.publish.mqtt_url.
"""
from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from typing import Any

from appliance.config import MQTTConfig
from appliance.publish.mqtt_url import credentials, parse_url
from appliance.publish.transport import AckCallback, Handler, Transport

log = logging.getLogger("ctriage.mqtt")

CONNACK_TIMEOUT_S = 5.0  # protocol = auto: no CONNACK this long after the socket opened → try the other protocol


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
