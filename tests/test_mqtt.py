"""MQTT transport and outbox pump against a real mosquitto: status + last will, expiry, in-order delivery across a
broker outage, subscriptions, MQTT 3.1.1, TLS with client certificate and password, the demo broker."""
from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from appliance.config import ConfigError, MQTTConfig
from appliance.publish.mqtt import MQTTTransport
from appliance.publish.mqtt_url import credentials, parse_url
from appliance.publish.outbox import OutboxPump
from appliance.store import Store

from .broker import Mosquitto, free_port


class Collector:
    """A plain MQTT 5 subscriber recording (topic, payload, retain, properties)."""

    def __init__(self, url: str, topics: list[str], client_id: str = "", persistent: bool = False, **tls) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        u = parse_url(url)
        self.messages: list[tuple[str, bytes, bool, dict]] = []
        self._cond = threading.Condition()
        self._ready = threading.Event()
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if tls:
            c.tls_set(**tls)
        c.on_connect = lambda cl, ud, fl, rc, pr: (cl.subscribe([(t, 1) for t in topics]), self._ready.set())
        c.on_message = self._on_message
        props = None
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        c.reconnect_delay_set(1, 2)
        c.connect_async(u.host, u.port, clean_start=not persistent, properties=props)
        c.loop_start()
        self.client = c
        assert self._ready.wait(10), "subscriber could not connect"
        time.sleep(0.2)

    def _on_message(self, client, userdata, m) -> None:
        props = {}
        if m.properties is not None and hasattr(m.properties, "MessageExpiryInterval"):
            props["expiry"] = m.properties.MessageExpiryInterval
        with self._cond:
            self.messages.append((m.topic, bytes(m.payload), bool(m.retain), props))
            self._cond.notify_all()

    def wait_for(self, pred, timeout: float = 20.0):
        """The first message (topic, payload, retain, props) for which pred is true."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching message in {timeout} s; got {[x[0] for x in self.messages]}")
                self._cond.wait(left)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def transport(url: str, **kw) -> MQTTTransport:
    cfg = MQTTConfig(url=url, reconnect_min_seconds=0.2, reconnect_max_seconds=1.0, **kw)
    return MQTTTransport(cfg, "ctriage-test", "ctriage/dev/status", json.dumps({"state": "offline"}).encode())


def test_parse_url_and_credentials(monkeypatch, tmp_path):
    u = parse_url("mqtts://ops:s%40cret@broker.example:8884")
    assert (u.host, u.port, u.tls, u.username, u.password) == ("broker.example", 8884, True, "ops", "s@cret")
    assert u.redacted() == "mqtts://ops:***@broker.example:8884"
    assert parse_url("mqtt://10.0.0.5").port == 1883 and parse_url("mqtts://h").port == 8883
    for bad in ("http://h:1", "mqtt://:1883", "mqtt://h:99999"):
        with pytest.raises(ConfigError):
            parse_url(bad)
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    cfg = MQTTConfig(username="cfg-user", password_file=str(pw))
    monkeypatch.delenv("CTRIAGE_MQTT_PASSWORD", raising=False)
    assert credentials(cfg, parse_url("mqtt://h")) == ("cfg-user", "from-file")
    monkeypatch.setenv("CTRIAGE_MQTT_PASSWORD", "from-env")
    assert credentials(cfg, parse_url("mqtt://h")) == ("cfg-user", "from-env")
    assert credentials(cfg, parse_url("mqtt://u:p@h")) == ("u", "p")


def test_status_will_expiry_and_subscriptions(mosquitto):
    sub = Collector(mosquitto.url, ["ctriage/#"])
    t = transport(mosquitto.url)
    got: list[tuple[str, bytes]] = []
    t.subscribe("ctriage/fleet/bundle/+", lambda topic, payload: got.append((topic, payload)))
    t.set_status(b'{"state": "online"}')
    t.start()
    try:
        assert t.wait_connected(10) and t.protocol == "5"
        sub.wait_for(lambda m: m[0] == "ctriage/dev/status" and b"online" in m[1])
        acks: list = []
        t.send("ctriage/dev/verdict/abc", b'{"v": 1}', qos=1, retain=True, expiry=120, on_ack=acks.append)
        m = sub.wait_for(lambda m: m[0] == "ctriage/dev/verdict/abc")
        assert 0 < m[3]["expiry"] <= 120
        deadline = time.monotonic() + 5
        while not acks and time.monotonic() < deadline:
            time.sleep(0.02)
        assert acks == [None], "PUBACK reported"
        sub.client.publish("ctriage/fleet/bundle/lesion", b"announce", qos=1)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        assert got == [("ctriage/fleet/bundle/lesion", b"announce")]
        health = t.health()
        assert health["connected"] and health["url"] == mosquitto.url
    finally:
        t.stop(b'{"state": "offline", "detail": "stopped"}')
    sub.wait_for(lambda m: m[0] == "ctriage/dev/status" and b"stopped" in m[1])
    late = Collector(mosquitto.url, ["ctriage/#"])
    m = late.wait_for(lambda m: m[0] == "ctriage/dev/verdict/abc")
    assert m[2], "verdicts are retained"
    m = late.wait_for(lambda m: m[0] == "ctriage/dev/status")
    assert m[2] and b"stopped" in m[1], "status is retained"
    late.close()
    sub.close()


def test_outbox_drains_in_order_across_a_broker_outage(tmp_path):
    # the broker fixture runs mosquitto as root when the tests are root, so its persistence file (the subscriber's
    # session and the messages queued for it) survives the restart
    mosquitto = Mosquitto(tmp_path / "broker").start()
    sub = Collector(mosquitto.url, ["out/#"], client_id="sub-outage", persistent=True)
    store = Store(tmp_path / "s.db")
    for i in range(5):
        store.outbox_add(f"out/{i}", str(i).encode(), 1)
    t = transport(mosquitto.url)
    t.start()
    pump = OutboxPump(store, t)
    pump.start()
    try:
        assert t.wait_connected(10)
        assert pump.drain(15)
        mosquitto.stop()
        deadline = time.monotonic() + 10
        while t.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not t.connected
        for i in range(5, 10):
            store.outbox_add(f"out/{i}", str(i).encode(), 1)
        pump.kick()
        time.sleep(1.0)
        assert store.outbox_count() == 5, "nothing leaves the outbox without a PUBACK"
        mosquitto.start()
        assert t.wait_connected(15)
        assert pump.drain(15) and store.outbox_count() == 0
        sub.wait_for(lambda m: m[0] == "out/9", timeout=20)
    finally:
        pump.stop()
        t.stop()
        sub.close()
        mosquitto.stop()
    topics = [m[0] for m in sub.messages if m[0].startswith("out/")]
    assert topics == [f"out/{i}" for i in range(10)], "in order, nothing lost, nothing twice"
    assert pump.delivered == 10


def test_mqtt_311_when_configured(mosquitto):
    sub = Collector(mosquitto.url, ["ctriage/#"])
    t = transport(mosquitto.url, protocol="3.1.1")
    t.start()
    try:
        assert t.wait_connected(10) and t.protocol == "3.1.1"
        acks: list = []
        t.send("ctriage/dev/verdict/x", b"{}", retain=True, expiry=60, on_ack=acks.append)
        m = sub.wait_for(lambda m: m[0] == "ctriage/dev/verdict/x")
        assert "expiry" not in m[3], "no message expiry in MQTT 3.1.1"
    finally:
        t.stop()
        sub.close()


def _tls_files(d: Path) -> dict[str, Path]:
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = key()
    ca = (x509.CertificateBuilder().subject_name(name("test ca")).issuer_name(name("test ca"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": d / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, san in (("server", x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])),
                     ("client", None)):
        k = key()
        b = (x509.CertificateBuilder().subject_name(name(f"test {who}")).issuer_name(ca.subject)
             .public_key(k.public_key()).serial_number(2 if who == "server" else 3)
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1)))
        if san is not None:
            b = b.add_extension(san, critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        out[f"{who}_cert"] = d / f"{who}.pem"
        out[f"{who}_key"] = d / f"{who}.key"
        out[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{who}_key"].write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return out


def test_tls_with_client_certificate_and_password(tmp_path, monkeypatch):
    f = _tls_files(tmp_path)
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "triage", "s3cret"], check=True, capture_output=True)
    port = free_port()
    extra = (f"listener {port} 127.0.0.1\ncafile {f['ca']}\ncertfile {f['server_cert']}\nkeyfile {f['server_key']}\n"
             f"require_certificate true\nallow_anonymous false\npassword_file {pw}\n")
    broker = Mosquitto(tmp_path / "broker", port=port, extra=extra, listener=False).start()
    try:
        monkeypatch.setenv("CTRIAGE_MQTT_PASSWORD", "s3cret")
        kw = dict(ca_file=str(f["ca"]), cert_file=str(f["client_cert"]), key_file=str(f["client_key"]))
        t = transport(f"mqtts://triage@127.0.0.1:{port}", **kw)
        t.start()
        try:
            assert t.wait_connected(10), t.last_error
        finally:
            t.stop()
        monkeypatch.setenv("CTRIAGE_MQTT_PASSWORD", "wrong")
        bad = transport(f"mqtts://triage@127.0.0.1:{port}", **kw)
        bad.start()
        try:
            assert not bad.wait_connected(3)
            assert "refused" in (bad.last_error or "") or "disconnected" in (bad.last_error or "")
        finally:
            bad.stop()
    finally:
        broker.stop()


def test_demo_broker_mosquitto_and_embedded_fallback():
    from appliance.embedded_broker import mosquitto_path, start_broker

    kinds = ["mosquitto"] if mosquitto_path() else []
    try:
        import amqtt  # noqa: F401

        kinds.append("amqtt")
    except ImportError:
        print("SKIP part: amqtt not installed (the embedded fallback broker)")
    if not kinds:
        pytest.skip("neither mosquitto nor amqtt is installed")
    for kind in kinds:
        url, stop = start_broker(prefer=kind)
        t = transport(url)  # protocol auto: MQTT 5 on mosquitto, 3.1.1 on amqtt after no CONNACK
        t.start()
        try:
            assert t.wait_connected(20), f"{kind}: {t.last_error}"
            assert t.protocol == ("5" if kind == "mosquitto" else "3.1.1")
            acks: list = []
            t.send("ctriage/dev/x", b"1", on_ack=acks.append)
            deadline = time.monotonic() + 5
            while not acks and time.monotonic() < deadline:
                time.sleep(0.02)
            assert acks == [None]
        finally:
            t.stop()
            stop()
