"""Where the fleet repository lives on the broker, and the publisher side (`ctriage models publish`).

Every file is a retained message under `<prefix>/fleet/`:

    <prefix>/fleet/metadata/<file>                  TUF metadata: N.root.json (every version), N.targets.json,
                                                    N.snapshot.json, timestamp.json
    <prefix>/fleet/bundle/<name>/<version>/chunk/<i>  raw bytes of chunk i of a release's archive (signed per chunk
                                                    in the targets metadata)

The publisher sends the chunks first, then the metadata with timestamp.json last, each acknowledged (QoS 1): an
appliance that sees the new timestamp finds everything it names already there.
"""
from __future__ import annotations

import re
import threading
import time
from typing import Any
from urllib.parse import unquote, urlparse

from appliance.fleet.release import NAME
from appliance.inference.bundle import BundleError, parse_version

META_FILE = re.compile(r"^(timestamp|[1-9][0-9]{0,8}\.(root|targets|snapshot))\.json$")


class PublishError(BundleError):
    """The broker cannot be reached or did not take what was published."""


def metadata_topic(prefix: str, filename: str) -> str:
    return f"{prefix.rstrip('/')}/fleet/metadata/{filename}"


def chunk_base(prefix: str, name: str, version: str) -> str:
    return f"{prefix.rstrip('/')}/fleet/bundle/{name}/{version}/chunk"


def parse_topic(prefix: str, topic: str) -> tuple[str, str, str | None, int | None] | None:
    """("metadata", file, None, None), ("chunk", name, version, index), or None for anything else."""
    base = f"{prefix.rstrip('/')}/fleet/"
    if not topic.startswith(base):
        return None
    parts = topic[len(base):].split("/")
    if len(parts) == 2 and parts[0] == "metadata" and META_FILE.match(parts[1]):
        return "metadata", parts[1], None, None
    if (len(parts) == 5 and parts[0] == "bundle" and parts[3] == "chunk" and NAME.match(parts[1])
            and parts[4].isdigit()):
        try:
            parse_version(parts[2])
        except BundleError:
            return None
        return "chunk", parts[1], parts[2], int(parts[4])
    return None


def mqtt_client(url: str, *, client_id: str = "", username: str = "", password: str = "", ca_file: str = "",
                cert_file: str = "", key_file: str = "", tls_insecure: bool = False, timeout: float = 10.0):
    """A connected paho client (network loop running) for mqtt[s]://[user:pass@]host[:port]."""
    import paho.mqtt.client as mqtt

    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise PublishError(f"MQTT URL must look like mqtt[s]://host:port, got {url!r}")
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
        raise PublishError(f"cannot reach the MQTT broker at {u.hostname}:{u.port}: {e}") from None
    c.loop_start()
    if not connected.wait(timeout) or getattr(result.get("rc"), "is_failure", False):
        c.loop_stop()
        raise PublishError(f"MQTT broker refused or did not answer: {result.get('rc', 'timeout')}")
    return c


def publish_files(client, metadata: dict[str, bytes], chunks: dict[str, list[bytes]] | None = None,
                  prefix: str = "ctriage", timeout: float = 120.0) -> dict[str, int]:
    """Chunks first (`chunks`: chunk topic base → chunk bytes), then metadata files, timestamp.json last; all
    retained, QoS 1, each acknowledged. Returns counts."""
    deadline = time.time() + timeout

    def pub(t: str, payload: bytes) -> None:
        info = client.publish(t, payload, qos=1, retain=True)
        info.wait_for_publish(max(0.1, deadline - time.time()))
        if not info.is_published():
            raise PublishError(f"broker did not acknowledge {t} in time")

    n = 0
    for base, parts in (chunks or {}).items():
        for i, c in enumerate(parts):
            pub(f"{base}/{i}", c)
            n += 1
    order = sorted(metadata, key=lambda f: (f == "timestamp.json", not f.endswith("root.json"),
                                            int(f.split(".")[0]) if f[0].isdigit() else 0, f))
    for f in order:
        pub(metadata_topic(prefix, f), metadata[f])
    return {"chunks": n, "metadata": len(order)}


def clear_chunks(client, base: str, count: int, timeout: float = 30.0) -> None:
    """Remove retained chunks (an empty retained message clears a topic)."""
    for i in range(count):
        client.publish(f"{base}/{i}", b"", qos=1, retain=True).wait_for_publish(timeout)
