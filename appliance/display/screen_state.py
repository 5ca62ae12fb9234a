"""What the triage screen knows: studies, devices and the broker link, built from validated MQTT payloads.

Pure (no sockets, no threads): `DisplayState.handle(topic, payload, retained, now)` takes one MQTT message and
returns the events to push to the pages, or nothing when the message was ignored (malformed, stale, foreign).
Ignored messages are logged with the topic and the failed rule only — never with payload values, which could
hold identifiers.

Flags (what the tile says in large type):
  positive       any verdict with result positive (provisional, final or corrected): isolate now
  negative       final (or corrected) negative
  indeterminate  final (or corrected) indeterminate (the reason says why)
  pending        no verdict yet, or a provisional negative/indeterminate (the scan is still being analysed)

Verdict states: provisional, final, and corrected — a final that replaces an earlier final with another result
(it carries `correction`: what the earlier final said and what changed). A corrected verdict counts as final.

An acknowledgement counts for the flag it was given on: when the flag changes after the ack (analysing →
positive, or a correction from negative to positive), the tile asks to be acknowledged again.

Where the finding is: only the case rule's own run — `evidence` on a positive, `focal` on a negative naming a single
focal lesion — in patient terms (appliance.pipeline.anatomy). The overlay's per-box quadrants only draw boxes.

Payload checks live in appliance.display.payloads; what a tile says of a verdict (flag, finding, correction, the
viral-pneumonia-pattern grade, solid nodules or masses) in appliance.display.views.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from appliance.display.payloads import (
    DEVICE_RE, FINAL_STATES, KEY_RE, MAX_PAYLOAD, Ignored, Validators, checked_png, iso, parse_time, schema_dir,
    utcnow)
from appliance.display.views import (
    acquisition_view, correction_view, finding_of, flag_of, grade_view, others_view, where_text)
from appliance.pipeline.anatomy import patient_side

__all__ = ["DEVICE_RE", "KEY_RE", "Device", "DisplayState", "Ignored", "Study", "Validators", "flag_of", "iso",
           "schema_dir", "utcnow", "where_text"]  # what the server and the tests use from here

log = logging.getLogger(__name__)

MAX_STUDIES = 300  # the oldest go first beyond this


@dataclass
class Study:
    device: str
    study_key: str
    verdict: dict[str, Any] | None = None
    verdict_time: dt.datetime | None = None  # `created` of the verdict shown
    scanned: dt.datetime | None = None  # start of the scan (first verdict time − time to that verdict)
    flag: str = "pending"
    flag_since: dt.datetime | None = None
    overlay: dict[str, Any] | None = None
    overlay_time: dt.datetime | None = None
    image: bytes | None = None
    image_tag: str = ""  # content hash: the image URL changes with the image (and survives server restarts)
    ack: dict[str, Any] | None = None  # {"seen_by", "created", "pending"}

    @property
    def id(self) -> str:
        return f"{self.device}/{self.study_key}"


@dataclass
class Device:
    device: str
    state: str = "unknown"
    status: dict[str, Any] = field(default_factory=dict)
    last_seen: dt.datetime | None = None
    state_since: dt.datetime | None = None


class DisplayState:
    """Studies, devices and link state. Not thread-safe: the server serialises calls under one lock."""

    def __init__(self, *, prefix: str = "ctriage", expire_minutes: int = 720, show_labels: bool = False,
                 validators: Validators | None = None) -> None:
        self.prefix = prefix.rstrip("/")
        self.expire = dt.timedelta(minutes=expire_minutes)
        self.show_labels = show_labels
        self.validators = validators or Validators()
        self.studies: dict[str, Study] = {}
        self.devices: dict[str, Device] = {}
        self.early_acks: dict[str, dict[str, Any]] = {}  # acks that arrived before their study
        self.link: dict[str, Any] = {"connected": False, "since": None, "broker": "", "error": None}
        self.ignored = 0

    # ---- MQTT messages -------------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, retained: bool = False,
               now: dt.datetime | None = None) -> list[tuple[str, dict[str, Any]]]:
        """Apply one MQTT message; returns page events [(name, data)], [] when nothing changed or it was ignored."""
        now = now or utcnow()
        try:
            return self._handle(topic, payload, retained, now)
        except Ignored as e:
            self.ignored += 1
            log.warning("ignored message on %s: %s", _safe_topic(topic), e)
            return []

    def _handle(self, topic: str, payload: bytes, retained: bool, now: dt.datetime) -> list[tuple[str, dict]]:
        parts = topic.split("/")
        pre = self.prefix.split("/")
        if parts[:len(pre)] != pre:
            raise Ignored("topic outside the prefix")
        rest = parts[len(pre):]
        if not rest or not DEVICE_RE.match(rest[0]):
            raise Ignored("device level is not a valid device id")
        device, kind = rest[0], "/".join(rest[1:2])
        if kind in ("verdict", "overlay", "ack"):
            if len(rest) != 3 or not KEY_RE.match(rest[2]):
                raise Ignored("study key level is not 16 hex digits")
        elif kind not in ("status", "stats") or len(rest) != 2:
            raise Ignored("not a topic the screen uses")
        if len(payload) > MAX_PAYLOAD:
            raise Ignored(f"payload of {len(payload)} bytes is larger than {MAX_PAYLOAD}")
        if not payload:  # a cleared retained message
            return self._cleared(device, kind, rest[2] if len(rest) == 3 else "")
        try:
            data = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise Ignored("payload is not JSON") from None
        if not isinstance(data, dict):
            raise Ignored("payload is not a JSON object")
        problem = self.validators.problem(kind, data)
        if problem:
            raise Ignored(f"{kind} schema: {problem}")
        created = parse_time(data.get("created"))
        if created is None:
            raise Ignored("created: not an ISO 8601 date-time")
        if kind != "ack" and data.get("device") != device:
            raise Ignored("payload device differs from the topic")
        if kind in ("verdict", "overlay", "ack") and data.get("study_key") != rest[2]:
            raise Ignored("payload study_key differs from the topic")
        events: list[tuple[str, dict]] = []
        if kind != "ack":
            events += self._seen(device, kind, data, created, retained, now)
        if kind == "verdict":
            events += self._verdict(device, data, created, now)
        elif kind == "overlay":
            events += self._overlay(device, data, created, now)
        elif kind == "ack":
            events += self._ack(device, data, created, now)
        return events

    def _seen(self, device: str, kind: str, data: dict, created: dt.datetime, retained: bool,
              now: dt.datetime) -> list[tuple[str, dict]]:
        d = self.devices.get(device)
        changed = d is None
        if d is None:
            d = self.devices[device] = Device(device)
        offline_will = kind == "status" and data["state"] == "offline"
        # a live message proves the device was there now; a retained one only when it was created;
        # the last will was written when the device connected, so it says nothing about when it was last seen
        if not offline_will:
            seen = min(created, now) if retained else now
            if d.last_seen is None or seen > d.last_seen:
                d.last_seen = seen
                changed = True
        if kind == "status":
            if data["state"] != d.state:
                d.state_since = now if not retained else (None if offline_will else min(created, now))
            d.state = data["state"]
            d.status = {k: data.get(k) for k in ("version", "backend", "device_type", "precision", "detail")}
            d.status["bundles"] = [{"name": b.get("name"), "version": b.get("version")}
                                   for b in data.get("bundles", [])]
            changed = True
        elif d.state in ("unknown", "offline") and not retained:
            d.state, d.state_since, changed = "online", now, True  # it speaks again, whatever the will said
        return [("device", self.device_view(d))] if changed else []

    def _study(self, device: str, key: str) -> Study:
        sid = f"{device}/{key}"
        s = self.studies.get(sid)
        if s is None:
            s = self.studies[sid] = Study(device, key)
            if sid in self.early_acks:
                s.ack = self.early_acks.pop(sid)
        return s

    def _verdict(self, device: str, v: dict, created: dt.datetime, now: dt.datetime) -> list[tuple[str, dict]]:
        scanned = _scan_start(v, created, now)
        if now - scanned > self.expire:
            return self._drop(f"{device}/{v['study_key']}")
        s = self._study(device, v["study_key"])
        if s.verdict_time is not None and created < s.verdict_time:
            return []  # an older verdict arriving late
        if s.verdict is not None and s.verdict["state"] in FINAL_STATES and v["state"] == "provisional" \
                and v["series_key"] == s.verdict["series_key"]:
            return []  # a series' provisional never replaces its final (nor its correction)
        if not self.show_labels:
            v = {k: val for k, val in v.items() if k != "labels"}
        s.verdict, s.verdict_time = v, created
        s.scanned = min(s.scanned, scanned) if s.scanned else scanned
        flag = flag_of(v)
        if flag != s.flag or s.flag_since is None:
            s.flag, s.flag_since = flag, created
        self._trim()
        return [("study", self.study_view(s))]

    def _overlay(self, device: str, o: dict, created: dt.datetime, now: dt.datetime) -> list[tuple[str, dict]]:
        if now - min(created, now) > self.expire:
            return []
        image = None
        if o.get("image"):
            image = checked_png(o["image"]["data"])
        s = self._study(device, o["study_key"])
        if s.overlay_time is not None and created < s.overlay_time:
            return []
        if s.scanned is None:
            s.scanned = min(created, now)
        s.overlay, s.overlay_time = {k: val for k, val in o.items() if k != "image"}, created
        if o.get("image"):
            s.overlay["image"] = {k: val for k, val in o["image"].items() if k != "data"}
        if image != s.image:
            s.image, s.image_tag = image, hashlib.sha256(image).hexdigest()[:16] if image else ""
        self._trim()
        return [("study", self.study_view(s))]

    def _ack(self, device: str, a: dict, created: dt.datetime, now: dt.datetime) -> list[tuple[str, dict]]:
        sid = f"{device}/{a['study_key']}"
        ack = {"seen_by": a["seen_by"], "created": created, "pending": False}
        s = self.studies.get(sid)
        if s is None:
            if now - min(created, now) <= self.expire:
                self.early_acks[sid] = ack
            return []
        if s.ack is not None and not s.ack["pending"] and s.ack["created"] > created:
            return []
        s.ack = ack
        return [("study", self.study_view(s))]

    def _cleared(self, device: str, kind: str, key: str) -> list[tuple[str, dict]]:
        sid = f"{device}/{key}"
        if kind == "verdict":
            return self._drop(sid)
        if kind == "overlay" and sid in self.studies:
            s = self.studies[sid]
            if s.verdict is None:
                return self._drop(sid)
            s.overlay = s.overlay_time = s.image = None
            s.image_tag = ""
            return [("study", self.study_view(s))]
        if kind == "ack":
            self.early_acks.pop(sid, None)
        return []

    # ---- local changes ----------------------------------------------------------------------------------------

    def local_ack(self, device: str, key: str, seen_by: str, now: dt.datetime | None = None) -> list[tuple[str, dict]]:
        """An acknowledgement given on this screen, shown at once as pending until the broker echoes it back."""
        s = self.studies.get(f"{device}/{key}")
        if s is None:
            return []
        s.ack = {"seen_by": seen_by, "created": now or utcnow(), "pending": True}
        return [("study", self.study_view(s))]

    def set_link(self, connected: bool, broker: str, error: str | None = None,
                 now: dt.datetime | None = None) -> list[tuple[str, dict]]:
        if connected == self.link["connected"] and self.link["since"] is not None and error == self.link["error"]:
            return []
        if connected != self.link["connected"] or self.link["since"] is None:
            self.link["since"] = now or utcnow()
        self.link.update(connected=connected, broker=broker, error=error)
        return [("link", self.link_view())]

    def expire_old(self, now: dt.datetime | None = None) -> list[tuple[str, dict]]:
        now = now or utcnow()
        events: list[tuple[str, dict]] = []
        for sid, s in list(self.studies.items()):
            if s.scanned is not None and now - s.scanned > self.expire:
                events += self._drop(sid)
        for sid, a in list(self.early_acks.items()):
            if now - a["created"] > self.expire:
                del self.early_acks[sid]
        return events

    def _drop(self, sid: str) -> list[tuple[str, dict]]:
        if self.studies.pop(sid, None) is None:
            return []
        return [("remove", {"id": sid})]

    def _trim(self) -> None:
        if len(self.studies) > MAX_STUDIES:
            oldest = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
            order = sorted(self.studies.values(), key=lambda s: s.scanned or oldest)
            for s in order[: len(self.studies) - MAX_STUDIES]:
                del self.studies[s.id]

    # ---- what the page gets ------------------------------------------------------------------------------------

    def acked(self, s: Study) -> bool:
        return bool(s.ack) and (s.flag_since is None or s.ack["created"] >= s.flag_since)

    def study_view(self, s: Study) -> dict[str, Any]:
        v = s.verdict or {}
        ev = v.get("evidence")
        finding = finding_of(v)
        quadrants = [finding["quadrant"]] if finding else []  # the rule's finding only, never every box
        boxes: list[dict] = []
        key_index = None
        if s.overlay:
            img = s.overlay.get("image") or {}
            key_index = img.get("index")
            slices = s.overlay.get("key_slices", [])
            key = next((k for k in slices if k["index"] == key_index), slices[0] if slices else None)
            if key is not None:
                key_index = key["index"]
                boxes = [{"box": b["box"], "quadrant": b["quadrant"], "score": b["score"]} for b in key["boxes"]]
        return {
            "id": s.id, "device": s.device, "study_key": s.study_key, "short": s.study_key[:6],
            "flag": s.flag, "flag_since": iso(s.flag_since),
            "state": v.get("state") or (s.overlay or {}).get("state") or "provisional",
            "result": v.get("result"), "reason": v.get("reason"), "evidence": ev, "focal": v.get("focal"),
            "counts": v.get("counts"), "complete_reason": v.get("complete_reason"),
            "series": [{"result": x["result"], "state": x["state"]} for x in v.get("series", [])],
            "bundles": [{"name": b["name"], "version": b["version"]} for b in v.get("bundles", [])],
            "scanned": iso(s.scanned),
            "updated": iso(max((t for t in (s.verdict_time, s.overlay_time) if t), default=None)),
            "finding": finding, "where": where_text(finding) if finding else None,
            "quadrants": quadrants, "anatomy": [patient_side(q) for q in quadrants],
            "correction": correction_view(v), "grade": grade_view(v), "others": others_view(v),
            "acquisition": acquisition_view(v),
            "key_slice": key_index, "key_of": (s.overlay or {}).get("slices"),
            "key_state": (s.overlay or {}).get("state"), "boxes": boxes,
            "image": f"/img/{s.device}/{s.study_key}/{s.image_tag}.png" if s.image else None,
            "ack": ({"seen_by": s.ack["seen_by"], "created": iso(s.ack["created"]), "pending": s.ack["pending"]}
                    if s.ack else None),
            "acked": self.acked(s),
            "labels": ({str(k): str(val) for k, val in v["labels"].items()}
                       if self.show_labels and isinstance(v.get("labels"), dict) else None),
        }

    def device_view(self, d: Device) -> dict[str, Any]:
        return {"device": d.device, "state": d.state, "since": iso(d.state_since), "last_seen": iso(d.last_seen),
                **d.status}

    def link_view(self) -> dict[str, Any]:
        return {**self.link, "since": iso(self.link["since"])}

    def snapshot(self) -> dict[str, Any]:
        return {"studies": [self.study_view(s) for s in self.studies.values()],
                "devices": [self.device_view(d) for d in self.devices.values()],
                "link": self.link_view(), "ignored": self.ignored}

    def image(self, device: str, key: str, tag: str | None = None) -> bytes | None:
        """The key image of a study; with `tag`, only when it is still that image."""
        s = self.studies.get(f"{device}/{key}")
        if s is None or (tag is not None and tag != s.image_tag):
            return None
        return s.image


def _scan_start(v: dict, created: dt.datetime, now: dt.datetime) -> dt.datetime:
    t = min(created, now)  # a device clock ahead of ours must not put a scan in the future
    lead = (v.get("timings") or {}).get("first_slice_to_verdict_s")
    if isinstance(lead, (int, float)) and 0 <= lead <= 6 * 3600:
        t -= dt.timedelta(seconds=lead)
    return t


def _safe_topic(topic: str) -> str:
    """The topic for a log line: printable, bounded (topic levels are device ids and keyed hashes)."""
    return "".join(c if c.isprintable() else "?" for c in topic[:200])
