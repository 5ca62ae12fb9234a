"""Bundle announcements on `<prefix>/fleet/bundle/<name>` (retained): what they hold, how they are checked, and
the publisher side (`ctriage models publish`).

An announcement (schema config/schemas/bundle.schema.json) carries the exact bytes of manifest.json and its
signature, the targets (devices and/or groups; both empty = every device) with a signature over them, and where
the files are: inline as retained MQTT chunks of one tar archive at `<prefix>/fleet/bundle/<name>/<version>/chunk/<i>`
(raw bytes, each with its size and sha256 in the announcement), and/or an HTTP(S) URL of the same archive.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from appliance.fleet.signing import (SignatureError, TrustedKey, decode_signature, encode_signature, key_id,
                                     verify_bundle, verify_bytes)
from appliance.fleet.transfer import DEFAULT_CHUNK, MAX_BUNDLE_BYTES, ChunkSpec, chunk_specs, pack, split
from appliance.inference.bundle import BundleError, parse_version

ANNOUNCE_SCHEMA = "ctriage.bundle-announcement/1"
TARGETS_CONTEXT = b"ctriage.targets/1\n"
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
DEVICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_CHUNKS = 100_000


class AnnouncementError(BundleError):
    """An announcement is malformed or not for this device."""


def bundle_topic(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/fleet/bundle/{name}"


def chunk_base(prefix: str, name: str, version: str) -> str:
    return f"{bundle_topic(prefix, name)}/{version}/chunk"


def parse_topic(prefix: str, topic: str) -> tuple[str, str | None, int | None] | None:
    """(name, None, None) for an announcement topic, (name, version, index) for a chunk topic, else None."""
    base = f"{prefix.rstrip('/')}/fleet/bundle/"
    if not topic.startswith(base):
        return None
    parts = topic[len(base):].split("/")
    if len(parts) == 1 and NAME.match(parts[0]):
        return parts[0], None, None
    if len(parts) == 4 and parts[2] == "chunk" and NAME.match(parts[0]) and parts[3].isdigit():
        try:
            parse_version(parts[1])
        except BundleError:
            return None
        return parts[0], parts[1], int(parts[3])
    return None


def targets_statement(name: str, version: str, sha256: str, devices: list[str], groups: list[str]) -> bytes:
    """The bytes the targets signature covers: which bundle goes to whom."""
    body = {"name": name, "version": version, "sha256": sha256, "devices": sorted(devices), "groups": sorted(groups)}
    return TARGETS_CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Announcement:
    name: str
    version: str
    sha256: str  # of manifest.json
    manifest_bytes: bytes
    signature: bytes
    devices: list[str]
    groups: list[str]
    targets_signature: bytes
    archive_size: int
    archive_sha256: str
    chunks: list[ChunkSpec] = field(default_factory=list)
    chunk_topic: str | None = None  # base; chunk i is at f"{chunk_topic}/{i}"
    url: str | None = None
    created: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def rollback_from(self) -> list[str]:
        return rollback_from(self.manifest)

    def targets(self, device: str, groups: list[str] | tuple[str, ...]) -> bool:
        """Is this announcement for `device` (by name or by one of its groups)? Both lists empty: everyone."""
        if not self.devices and not self.groups:
            return True
        return device in self.devices or bool(set(groups) & set(self.groups))

    def verify(self, trust: list[TrustedKey]) -> TrustedKey:
        """Manifest signature and targets signature (by the same trusted key set)."""
        signer = verify_bytes(self.manifest_bytes, self.signature, trust)
        try:
            verify_bytes(targets_statement(self.name, self.version, self.sha256, self.devices, self.groups),
                         self.targets_signature, trust)
        except SignatureError:
            raise SignatureError("targets signature does not verify with any trusted key") from None
        return signer

    @classmethod
    def parse(cls, payload: bytes | str | dict, prefix: str = "ctriage",
              topic_name: str | None = None) -> "Announcement":
        """Check structure and internal consistency (not signatures); raise AnnouncementError saying what is wrong."""
        if isinstance(payload, dict):
            d = payload
        else:
            try:
                d = json.loads(payload)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise AnnouncementError(f"announcement is not JSON ({e})") from None
        if not isinstance(d, dict):
            raise AnnouncementError("announcement is not a JSON object")
        if d.get("schema") != ANNOUNCE_SCHEMA:
            raise AnnouncementError(f"announcement schema {d.get('schema')!r} is not {ANNOUNCE_SCHEMA}")

        def req(key: str, tp: type | tuple) -> Any:
            if key not in d:
                raise AnnouncementError(f"announcement has no {key!r}")
            if not isinstance(d[key], tp):
                raise AnnouncementError(f"announcement {key!r} has the wrong type")
            return d[key]

        def b64(key: str, v: str) -> bytes:
            try:
                return base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                raise AnnouncementError(f"announcement {key!r} is not base64") from None

        name, version = req("name", str), req("version", str)
        if not NAME.match(name):
            raise AnnouncementError(f"bundle name {name!r} is not a valid topic level")
        if topic_name is not None and topic_name != name:
            raise AnnouncementError(f"announcement for {name!r} published on the topic of {topic_name!r}")
        parse_version(version)
        mbytes = b64("manifest", req("manifest", str))
        sha = hashlib.sha256(mbytes).hexdigest()
        if req("sha256", str).lower() != sha:
            raise AnnouncementError("announcement sha256 does not match its manifest")
        try:
            manifest = json.loads(mbytes)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise AnnouncementError("announced manifest is not JSON") from None
        if not isinstance(manifest, dict) or manifest.get("name") != name or str(manifest.get("version")) != version:
            raise AnnouncementError("announcement name/version differ from its manifest")
        sig = decode_signature(req("signature", str))
        targets = req("targets", dict)
        devices, groups = targets.get("devices", []), targets.get("groups", [])
        if not (isinstance(devices, list) and isinstance(groups, list)
                and all(isinstance(x, str) and DEVICE.match(x) for x in devices + groups)):
            raise AnnouncementError("announcement targets must be lists of device and group names")
        tsig = decode_signature(req("targets_signature", str))
        archive = req("archive", dict)
        size, asha = archive.get("size"), archive.get("sha256")
        if not isinstance(size, int) or size <= 0 or size > MAX_BUNDLE_BYTES:
            raise AnnouncementError(f"archive size {size!r} is not between 1 and {MAX_BUNDLE_BYTES} bytes")
        if not (isinstance(asha, str) and re.fullmatch(r"[0-9a-f]{64}", asha)):
            raise AnnouncementError("archive sha256 is not 64 hex digits")
        chunks: list[ChunkSpec] = []
        chunk_topic = None
        inline = d.get("inline")
        if inline is not None:
            if not isinstance(inline, dict) or not isinstance(inline.get("chunks"), list):
                raise AnnouncementError("announcement 'inline' needs a chunks list")
            chunk_topic = inline.get("topic")
            if chunk_topic != chunk_base(prefix, name, version):
                raise AnnouncementError(f"inline topic {chunk_topic!r} is not {chunk_base(prefix, name, version)!r}")
            if not 0 < len(inline["chunks"]) <= MAX_CHUNKS:
                raise AnnouncementError(f"announcement lists {len(inline['chunks'])} chunks")
            for c in inline["chunks"]:
                if not (isinstance(c, dict) and isinstance(c.get("size"), int) and c["size"] >= 0
                        and isinstance(c.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", c["sha256"])):
                    raise AnnouncementError("each chunk needs an integer size and a sha256")
                chunks.append(ChunkSpec(c["size"], c["sha256"]))
            if sum(c.size for c in chunks) != size:
                raise AnnouncementError("chunk sizes do not add up to the archive size")
        url = d.get("url")
        if url is not None and not (isinstance(url, str) and url.startswith(("https://", "http://", "file://"))):
            raise AnnouncementError("announcement url must be an http(s) URL")
        if not chunks and not url:
            raise AnnouncementError("announcement says neither inline chunks nor url")
        return cls(name, version, sha, mbytes, sig, list(devices), list(groups), tsig, size, asha, chunks, chunk_topic,
                   url, str(d.get("created", "")), manifest)


def rollback_from(manifest: dict[str, Any]) -> list[str]:
    """A signed rollback order: manifest {"rollback": {"from": ["1.3.0", …]}} lets this (older) version replace
    exactly those active versions. Anything else in "rollback" orders nothing."""
    rb = manifest.get("rollback")
    if isinstance(rb, dict) and isinstance(rb.get("from"), list):
        return [str(v) for v in rb["from"]]
    return []


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build(bundle_dir: str | Path, key, *, prefix: str = "ctriage", devices: list[str] | None = None,
          groups: list[str] | None = None, inline: bool = True, url: str | None = None,
          chunk_size: int = DEFAULT_CHUNK) -> tuple[dict[str, Any], bytes, list[bytes]]:
    """(announcement, archive, chunks) for a signed bundle; the manifest must verify with `key`'s public half."""
    from appliance.fleet.signing import public_of

    devices, groups = sorted(set(devices or [])), sorted(set(groups or []))
    for x in devices + groups:
        if not DEVICE.match(x):
            raise AnnouncementError(f"target {x!r} is not a device or group name")
    if not inline and not url:
        raise AnnouncementError("nothing to announce: give --url when not sending the files inline")
    b, _ = verify_bundle(bundle_dir, [public_of(key)])
    if not NAME.match(b.name):
        raise AnnouncementError(f"bundle name {b.name!r} is not a valid topic level")
    mbytes = (Path(bundle_dir) / "manifest.json").read_bytes()
    sig = (Path(bundle_dir) / "manifest.sig").read_bytes()
    archive = pack(bundle_dir)
    chunks = split(archive, chunk_size) if inline else []
    ann: dict[str, Any] = {
        "schema": ANNOUNCE_SCHEMA,
        "name": b.name,
        "version": b.version,
        "sha256": b.sha256,
        "manifest": base64.b64encode(mbytes).decode(),
        "signature": encode_signature(decode_signature(sig)),
        "signer": key_id(key.public_key()),
        "rollback": bool(rollback_from(b.manifest)),
        "targets": {"devices": devices, "groups": groups},
        "targets_signature": encode_signature(key.sign(targets_statement(b.name, b.version, b.sha256, devices,
                                                                         groups))),
        "archive": {"format": "tar", "size": len(archive), "sha256": hashlib.sha256(archive).hexdigest()},
        "created": now_iso(),
    }
    if inline:
        ann["inline"] = {"topic": chunk_base(prefix, b.name, b.version), "chunk_size": chunk_size,
                         "chunks": [{"size": c.size, "sha256": c.sha256} for c in chunk_specs(chunks)]}
    if url:
        ann["url"] = url
    return ann, archive, chunks


# ---- MQTT (publisher side) -------------------------------------------------------------------------------------

def mqtt_client(url: str, *, client_id: str = "", username: str = "", password: str = "", ca_file: str = "",
                cert_file: str = "", key_file: str = "", tls_insecure: bool = False, timeout: float = 10.0):
    """A connected paho client (network loop running) for mqtt[s]://[user:pass@]host[:port]."""
    import paho.mqtt.client as mqtt

    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise AnnouncementError(f"MQTT URL must look like mqtt[s]://host:port, got {url!r}")
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                    client_id=client_id or f"ctriage-publish-{time.time_ns() % 10**9}", protocol=mqtt.MQTTv311)
    user = username or (unquote(u.username) if u.username else "")
    pw = password or (unquote(u.password) if u.password else "")
    if user:
        c.username_pw_set(user, pw or None)
    if u.scheme == "mqtts" or ca_file:
        c.tls_set(ca_certs=ca_file or None, certfile=cert_file or None, keyfile=key_file or None)
        c.tls_insecure_set(tls_insecure)
    connected = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(client, userdata, flags, rc, props=None):
        result["rc"] = rc
        connected.set()

    c.on_connect = on_connect
    try:
        c.connect(u.hostname, u.port or (8883 if u.scheme == "mqtts" else 1883), keepalive=30)
    except OSError as e:
        raise AnnouncementError(f"cannot reach the MQTT broker at {u.hostname}:{u.port}: {e}") from None
    c.loop_start()
    if not connected.wait(timeout) or getattr(result.get("rc"), "is_failure", False):
        c.loop_stop()
        raise AnnouncementError(f"MQTT broker refused or did not answer: {result.get('rc', 'timeout')}")
    return c


def read_retained(client, topic: str, wait_s: float = 1.5) -> bytes | None:
    """The retained message on `topic`, if the broker has one (waits up to wait_s)."""
    got: dict[str, bytes] = {}
    ev, subscribed = threading.Event(), threading.Event()

    def on_message(c, userdata, msg):
        if msg.topic == topic:
            got["p"] = msg.payload
            ev.set()

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.subscribe(topic, qos=1)
    # a broker sends retained messages right with the subscription's acknowledgement
    if subscribed.wait(wait_s):
        ev.wait(min(wait_s, 0.5))
    client.unsubscribe(topic)
    client.on_message = client.on_subscribe = None
    return got.get("p") or None


def publish_announcement(client, ann: dict[str, Any], chunks: list[bytes], prefix: str = "ctriage",
                         timeout: float = 120.0) -> dict[str, Any]:
    """Chunks first (retained, QoS 1, each acknowledged), then the announcement; clear the chunks of the version
    the announcement replaces. Returns a summary."""
    name = ann["name"]
    topic = bundle_topic(prefix, name)
    old = read_retained(client, topic)
    deadline = time.time() + timeout

    def pub(t: str, payload: bytes) -> None:
        info = client.publish(t, payload, qos=1, retain=True)
        info.wait_for_publish(max(0.1, deadline - time.time()))
        if not info.is_published():
            raise AnnouncementError(f"broker did not acknowledge {t} in time")

    base = chunk_base(prefix, name, ann["version"])
    for i, c in enumerate(chunks):
        pub(f"{base}/{i}", c)
    pub(topic, json.dumps(ann, separators=(",", ":")).encode())
    cleared = 0
    if old:
        try:
            prev = json.loads(old)
            inline = prev.get("inline") or {}
            if prev.get("version") != ann["version"] and isinstance(inline.get("chunks"), list):
                pbase = chunk_base(prefix, name, str(prev["version"]))
                for i in range(len(inline["chunks"])):
                    pub(f"{pbase}/{i}", b"")
                    cleared += 1
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    return {"topic": topic, "chunks": len(chunks), "chunk_topic": base if chunks else None,
            "cleared_previous_chunks": cleared}
