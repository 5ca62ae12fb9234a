"""The fleet over a real broker, for test_updater.py and test_fleet_trust.py: a watcher that sees what a fleet
dashboard sees, an appliance wired the way the daemon wires its updater, and helpers to publish (honestly, or as an
attacker with raw retained messages)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from appliance.cli import main as cli
from appliance.config import AnalysisConfig
from appliance.fleet import distribution
from appliance.fleet.bundle_store import active_bundle_dir
from appliance.fleet.updater import Updater
from appliance.inference.bundle import find_bundles, load_bundle
from appliance.pipeline.analyzer import Analyzer

from .fleet_helpers import Fleet, make_variant, schema_validator

DEVICE = "ct-room-7"
FINAL = {"installed", "refused", "failed", "rolled_back", "confirmed"}


class Watcher:
    """An MQTT client collecting every `ctriage/+/update` and `ctriage/+/trust` payload."""

    def __init__(self, url: str) -> None:
        self.items: list[dict] = []
        self.trust: list[dict] = []
        self.cond = threading.Condition()
        self.client = distribution.mqtt_client(url, client_id="watcher")
        self.client.on_message = self._on_message
        ok = threading.Event()
        self.client.on_subscribe = lambda *a: ok.set()
        self.client.subscribe([("ctriage/+/update", 1), ("ctriage/+/trust", 1)])
        ok.wait(5)

    def _on_message(self, client, userdata, msg) -> None:
        with self.cond:
            (self.trust if msg.topic.endswith("/trust") else self.items).append(json.loads(msg.payload))
            self.cond.notify_all()

    def wait(self, pred, timeout: float = 60.0, trust: bool = False) -> dict:
        deadline = time.time() + timeout
        with self.cond:
            while True:
                for p in (self.trust if trust else self.items):
                    if pred(p):
                        return p
                left = deadline - time.time()
                if left <= 0:
                    got = [(p["step"], p["outcome"], p["reason"]) for p in self.items]
                    raise AssertionError(f"no matching message; got {got}")
                self.cond.wait(left)

    def outcome(self, version: str, timeout: float = 60.0) -> dict:
        return self.wait(lambda p: p["outcome"] in FINAL and (p["bundle"] or {}).get("version") == version, timeout)

    def metadata(self, outcome: str, timeout: float = 30.0, contains: str = "") -> dict:
        return self.wait(lambda p: p["step"] == "metadata" and p["outcome"] == outcome
                         and contains in (p["reason"] or ""), timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Appliance:
    """The daemon's part, exactly as it wires the updater: route the fleet topics in, publish its reports out."""

    def __init__(self, url: str, state: Path, shipped: Path, anchor: Path | None, **kw) -> None:
        self.activated: list[Analyzer] = []
        self.client = distribution.mqtt_client(url, client_id=f"ctriage-{DEVICE}")
        kw.setdefault("settle_s", 0.1)
        self.updater = Updater(state, anchor, AnalysisConfig(), self.publish, lambda: None, device=DEVICE,
                               shipped_dir=shipped, **kw)
        self.updater.on_activated(self.activated.append)
        self.client.on_message = lambda c, u, m: self.updater.handle_message(m.topic, m.payload)
        ok = threading.Event()
        self.client.on_subscribe = lambda *a: ok.set()
        self.client.subscribe(self.updater.subscription, qos=1)
        ok.wait(5)

    def publish(self, topic: str, payload: dict, retain: bool) -> None:
        self.client.publish(topic, json.dumps(payload), qos=1, retain=retain)

    def close(self) -> None:
        self.updater.drain(30)
        self.updater.close()
        self.client.disconnect()
        self.client.loop_stop()


def send_raw(url: str, metadata: dict[str, bytes], chunks: dict[str, list[bytes]] | None = None) -> None:
    """Put retained messages on the broker as anyone with publish rights could (an attacker, a broken mirror)."""
    c = distribution.mqtt_client(url)
    try:
        distribution.publish_files(c, metadata, chunks)
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.fixture
def env(tmp_path, mosquitto, source_bundles):
    """A broker, a fleet repository with its own keys, an appliance trusting it (not started), a watcher."""
    shipped = source_bundles["lesion"].parent
    watcher = Watcher(mosquitto.url)
    apps: list[Appliance] = []

    class Env:
        pass

    e = Env()
    e.url, e.state, e.shipped, e.watcher, e.tmp = mosquitto.url, tmp_path / "state", shipped, watcher, tmp_path
    e.fleet = Fleet(tmp_path / "fleet")
    e.base = load_bundle(source_bundles["lesion"], verify=False).version
    e.validator = schema_validator("update")

    def start(anchor: Path | None | str = "fleet", **kw) -> Appliance:
        a = Appliance(mosquitto.url, e.state, shipped, e.fleet.root_json if anchor == "fleet" else anchor,
                      groups=("pilot",), **kw)
        apps.append(a)
        return a

    def variant(version: str, mutate=None, name: str = "lesion", label: str = "", **fields) -> Path:
        return make_variant(source_bundles[name], tmp_path / "variants" / f"{name}-{version}{label}", version,
                            mutate, **fields)

    def release(bundle: Path, *extra: str, fleet: Fleet | None = None, **sign_kw) -> None:
        """Sign into the repository (extra key directories: Paths in `extra`) and publish it with the bundle's
        chunks, as an operator does (extra strings: `publish` options)."""
        f = fleet or e.fleet
        f.sign(bundle, *[x for x in extra if isinstance(x, Path)], **sign_kw)
        extra = tuple(x for x in extra if not isinstance(x, Path))
        assert cli(["models", "publish", str(bundle), "--repo", str(f.repo.dir), "--mqtt-url", mosquitto.url,
                    *extra]) == 0

    def publish_meta(fleet: Fleet | None = None) -> None:
        assert cli(["models", "publish", "--repo", str((fleet or e.fleet).repo.dir), "--mqtt-url", mosquitto.url]) == 0

    def lesion_version() -> str:
        d = active_bundle_dir(e.state) or shipped
        return find_bundles(d)["lesion"].version

    e.start, e.variant, e.release, e.publish_meta, e.lesion_version = start, variant, release, publish_meta, \
        lesion_version
    yield e
    for a in apps:
        a.close()
    watcher.close()
