"""`ctriage demo`'s output for the technician: progress lines, each verdict as the display receives it
(subscribed like the display), and the closing table of final verdicts."""
from __future__ import annotations

import json
import threading
import uuid
from typing import Any

from appliance.commands.common import table
from appliance.commands.demo_studies import DemoStudy


class Console:
    """Progress lines for the technician, from the main thread and the MQTT thread alike."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def say(self, text: str = "") -> None:
        with self._lock:
            print(text, flush=True)


def evidence_text(payload: dict[str, Any], short: bool = False) -> str:
    from appliance.pipeline.anatomy import ANATOMY

    ev = payload.get("evidence")
    c = payload.get("counts", {})
    if ev:
        q = ev["quadrant"]
        slices = f"slices {ev['first_slice'] + 1}-{ev['last_slice'] + 1}"
        if short:
            return f"{q} ({ANATOMY.get(q, q)}), {slices}"
        return (f"lesion on {ev['run']} consecutive slices ({slices[7:]}), image {q} = patient's "
                f"{ANATOMY.get(q, q)}")
    if payload.get("result") == "indeterminate":
        return payload.get("reason") or "not enough to decide"
    fo = payload.get("focal")
    if fo:
        slices = f"slices {fo['first_slice'] + 1}-{fo['last_slice'] + 1}"
        if short:
            return f"one focal lesion {fo['quadrant']}, {slices}"
        return payload.get("reason") or f"one focal lesion ({fo['quadrant']}, {slices})"  # the case rule's note
    if short:
        return "no lesion run"
    return f"no lesion run; {c.get('lung_slices', 0)} of {c.get('slices', 0)} slices show lung"


ADVICE = {"positive": "isolate the patient; a radiologist reads the scan",
          "negative": "no COVID-19 pattern found", "indeterminate": "review the scan"}


class VerdictFeed:
    """Subscribes to the appliance's verdicts (as the display does) and prints each change for the technician."""

    def __init__(self, url: str, prefix: str, device: str, studies: list[DemoStudy], console: Console) -> None:
        from paho.mqtt import client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from appliance.publish.mqtt_url import parse_url

        self.studies = {s.study_key: s for s in studies}
        self.console = console
        self.latest: dict[str, dict[str, Any]] = {}
        self.finals: dict[str, dict[str, Any]] = {}
        self._shown: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self.topic = f"{prefix.rstrip('/')}/{device}/verdict/+"
        u = parse_url(url)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ctriage-demo-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311, clean_session=True)
        self.client.on_connect = lambda c, *_: c.subscribe(self.topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect_async(u.host, u.port, keepalive=30)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, m: Any) -> None:
        try:
            p = json.loads(m.payload)
            key, state, result = p["study_key"], p["state"], p["result"]
        except (ValueError, KeyError, TypeError):
            return
        study = self.studies.get(key)
        with self._lock:
            self.latest[key] = p
            if state == "final":
                self.finals[key] = p
            if self._shown.get(key) == (state, result):
                return
            self._shown[key] = (state, result)
        who = f"study {study.number} ({study.label})" if study else f"study {key[:6]}"
        word = f"{state} {result.upper()}" if state == "provisional" else f"FINAL {result.upper()}"
        lat = p.get("timings", {}).get("last_slice_to_verdict_s")
        after = f"; {lat:.1f} s after its last slice" if state == "final" and lat is not None else ""
        self.console.say(f"  ▶ {word}  {who}: {evidence_text(p)} — {ADVICE.get(result, '')}{after}")

    def has_final(self, keys: list[str]) -> bool:
        with self._lock:
            return all(k in self.finals for k in keys)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def print_summary(studies: list[DemoStudy], feed: VerdictFeed, console: Console) -> None:
    rows = []
    surprises = []
    for s in studies:
        p = feed.finals[s.study_key]
        c = p.get("counts", {})
        lat = p.get("timings", {}).get("last_slice_to_verdict_s")
        rows.append([f"{s.number} ({s.study_key[:6]})", s.label, str(c.get("slices", "")),
                     str(c.get("lung_slices", "")), str(c.get("lesion_slices", "")), p["result"].upper(),
                     evidence_text(p, short=True), f"{lat:.1f} s" if lat is not None else "-"])
        if p["result"] != s.expected:
            models = ", ".join(f"{b['name']} {b['version']}" for b in p.get("bundles", []))
            surprises.append(f"note: study {s.number} ({s.label}) was built to be {s.expected.upper()} but came out "
                             f"{p['result'].upper()} with the models {models}: a model issue, not a demo issue")
    console.say()
    console.say("Final verdicts (SYNTHETIC phantom studies, not patients):")
    header = ["study", "phantom", "slices", "lung", "lesion", "verdict", "where", "final after last slice"]
    console.say(table(rows, header))
    for line in surprises:
        console.say(line)
    console.say()
