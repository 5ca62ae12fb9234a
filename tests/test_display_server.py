"""Triage display, server side: payload validation, flags, acknowledgements, expiry, devices, HTTP routes, MQTT.

The payload builders here (verdict, overlay, key_png) are shared with the browser tests in test_display.py.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import queue
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from appliance.config import Config, ConfigError, from_dict
from appliance.display.screen_state import DisplayState, flag_of, iso, schema_dir
from appliance.domain import Box, Evidence, Rect, SeriesVerdict, SliceFinding
from appliance.publish import messages

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = [{"name": "valid-area", "version": "1.0.0", "sha256": "a" * 64},
           {"name": "lesion", "version": "1.2.0", "sha256": "b" * 64}]
T0 = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.timezone.utc)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


# ---- payload builders (shared with test_display.py) ----------------------------------------------------------------

def verdict(device: str, key: str, state: str = "final", result: str = "positive", *,
            created: dt.datetime | None = None, labels: dict[str, str] | None = None, slices: int = 180,
            reason: str | None = None, lead_s: float = 4.0, focal: Evidence | None = None) -> dict:
    ev = Evidence("lower-right", 112, 131, 20) if result == "positive" else None
    v = SeriesVerdict(result=result, state=state, evidence=ev, slices=slices, lung_slices=int(slices * 0.8),
                      lesion_slices=41 if ev else focal.run if focal else 0, reason=reason, focal=focal,
                      foci=2 if ev else 1 if focal else 0)
    p = messages.verdict_payload(device=device, study_key=key, series_key=key[::-1], verdict=v, bundles=BUNDLES,
                                 backend="openvino", device_type="CPU",
                                 complete_reason="quiet 5 s" if state == "final" else None,
                                 timings={"first_slice_to_verdict_s": lead_s, "ms_per_slice": 19.5}, labels=labels)
    if created is not None:
        p["created"] = iso(created)
    return p


@functools.lru_cache(maxsize=1)
def _key_slice() -> tuple[np.ndarray, SliceFinding]:
    """A synthetic phantom slice (not a patient) with its lesion box: 256², lesion in the lower-right quadrant."""
    from appliance.phantom import PhantomSpec, phantom_slice
    from appliance.pipeline.classic_lung import lung_mask, mask_box

    spec = PhantomSpec(size=256, slices=60)
    k = 36
    hu = phantom_slice(spec, k, np.random.default_rng(3))
    clear = phantom_slice(PhantomSpec(size=256, slices=60, lesion=False), k, np.random.default_rng(3))
    from scipy import ndimage as ndi

    changed = ndi.binary_opening(np.abs(hu - clear) > 100, iterations=2)  # the lesion, not the differing noise
    labels, n = ndi.label(changed)
    sizes = ndi.sum(changed, labels, index=np.arange(1, n + 1))
    ys, xs = np.nonzero(labels == int(np.argmax(sizes)) + 1)
    lesion = Rect(int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
    y0, x0, y1, x1 = mask_box(lung_mask(hu))
    finding = SliceFinding(key="k", position=0.0, shape=hu.shape, lung=Rect(y0, x0, y1, x1),
                           boxes=[Box(lesion, float(lesion.height * lesion.width * 4), 0.91, "lower-right")])
    return hu, finding


def key_png() -> bytes:
    from appliance.imaging import window
    from appliance.publish.overlays import png_bytes, render

    hu, finding = _key_slice()
    return png_bytes(render(window(hu), finding, max_size=256, text=False))  # the tile captions it in HTML


def overlay(device: str, key: str, state: str = "final", *, image: bool = True,
            created: dt.datetime | None = None) -> dict:
    hu, finding = _key_slice()
    boxes = [{"box": b.normalised(hu.shape), "quadrant": b.quadrant, "score": b.score, "area_px512": b.area_512}
             for b in finding.boxes]
    p = messages.overlay_payload(device=device, study_key=key, series_key=key[::-1], state=state, slices=180,
                                 key_slices=[{"index": 121, "score": 0.91, "quadrants": ["lower-right"],
                                              "boxes": boxes}],
                                 image_png=key_png() if image else None, image_index=121, image_size=(256, 256))
    if created is not None:
        p["created"] = iso(created)
    return p


def status(device: str, state: str = "online") -> dict:
    return messages.status_payload(device=device, state=state, bundles=BUNDLES, backend="openvino", device_type="CPU",
                                   precision="INT8", started=messages.now_iso())


def enc(p: dict) -> bytes:
    return json.dumps(p).encode()


# ---- the state (pure) --------------------------------------------------------------------------------------------

KEY = "9f3a61c2d07e4b18"
DEV = "ct-room-2"


def test_builders_make_schema_valid_payloads(validators):
    assert validators.problem("verdict", verdict(DEV, KEY)) is None
    assert validators.problem("verdict", verdict(DEV, KEY, "provisional", "negative")) is None
    focal = verdict(DEV, KEY, "final", "negative", focal=Evidence("lower-right", 11, 21, 11), reason="one focus")
    assert validators.problem("verdict", focal) is None
    assert focal["focal"]["run"] == 11 and focal["counts"]["foci"] == 1 and focal["evidence"] is None
    assert validators.problem("overlay", overlay(DEV, KEY)) is None
    assert validators.problem("status", status(DEV)) is None
    assert validators.problem("status", messages.offline_payload(DEV)) is None
    assert key_png().startswith(b"\x89PNG")


@pytest.mark.parametrize("state,result,flag", [
    ("provisional", "positive", "positive"), ("final", "positive", "positive"),
    ("provisional", "negative", "pending"), ("final", "negative", "negative"),
    ("provisional", "indeterminate", "pending"), ("final", "indeterminate", "indeterminate")])
def test_flag_of_each_verdict(state, result, flag):
    assert flag_of(verdict(DEV, KEY, state, result)) == flag
    assert flag_of(None) == "pending"


def test_provisional_then_final_updates_one_study(st):
    ev = st.handle(f"ctriage/{DEV}/verdict/{KEY}", enc(verdict(DEV, KEY, "provisional", "positive", created=T0)),
                   now=T0)
    assert [e[0] for e in ev] == ["device", "study"]
    s = ev[1][1]
    assert (s["flag"], s["state"], s["short"], s["quadrants"], s["anatomy"]) == \
           ("positive", "provisional", "9f3a61", ["lower-right"], ["left posterior"])
    assert s["scanned"] == iso(T0 - dt.timedelta(seconds=4))
    assert [b["version"] for b in s["bundles"]] == ["1.0.0", "1.2.0"]
    t1 = T0 + dt.timedelta(seconds=30)
    ev = st.handle(f"ctriage/{DEV}/verdict/{KEY}", enc(verdict(DEV, KEY, "final", "positive", created=t1, lead_s=34)),
                   now=t1)
    assert ev[-1][1]["state"] == "final"
    assert len(st.studies) == 1
    assert ev[-1][1]["scanned"] == iso(T0 - dt.timedelta(seconds=4))  # the scan start does not move


def test_late_older_verdict_and_provisional_after_final_are_ignored(st):
    topic = f"ctriage/{DEV}/verdict/{KEY}"
    st.handle(topic, enc(verdict(DEV, KEY, "final", "negative", created=T0)), now=T0)
    assert st.handle(topic, enc(verdict(DEV, KEY, "provisional", "negative", created=T0 - dt.timedelta(seconds=5))),
                     now=T0) == []
    assert st.handle(topic, enc(verdict(DEV, KEY, "provisional", "negative", created=T0 + dt.timedelta(seconds=5))),
                     now=T0) == []
    assert st.snapshot()["studies"][0]["flag"] == "negative"


@pytest.mark.parametrize("topic,payload,why", [
    (f"ctriage/{DEV}/verdict/{KEY}", b"{not json", "not JSON"),
    (f"ctriage/{DEV}/verdict/{KEY}", b"[1, 2]", "not a JSON object"),
    (f"ctriage/{DEV}/verdict/{KEY}", b"\xff\xfe", "not JSON"),
    (f"ctriage/{DEV}/verdict/{KEY.upper()}", None, "16 hex digits"),
    (f"ctriage/other-room/verdict/{KEY}", None, "device differs"),
    (f"ctriage/{DEV}/verdict/{'0' * 16}", None, "study_key differs"),
    (f"ctriage/{DEV}/verdict", None, "16 hex digits"),
    (f"ctriage/{DEV}/stats/x", None, "not a topic"),
    (f"ctriage/{DEV}/verdict/{KEY}/x", None, "16 hex digits"),
    (f"other/{DEV}/verdict/{KEY}", None, "outside the prefix"),
])
def test_malformed_messages_are_ignored_with_a_reason(st, caplog, topic, payload, why):
    with caplog.at_level(logging.WARNING, logger="appliance.display.screen_state"):
        assert st.handle(topic, payload if payload is not None else enc(verdict(DEV, KEY))) == []
    assert st.studies == {} and st.ignored == 1
    assert why in caplog.text


@pytest.mark.parametrize("mutate,rule", [
    (lambda p: p.update(result="maybe"), "result: enum"),
    (lambda p: p.pop("state"), "required"),
    (lambda p: p.update(evidence={"quadrant": "middle"}), "evidence: oneOf"),
    (lambda p: p.update(created="yesterday"), "created: not an ISO 8601"),
    (lambda p: p.update(extra="PHANTOM^SYNTHETIC"), "additionalProperties"),
])
def test_schema_violations_are_logged_without_payload_values(st, caplog, mutate, rule):
    p = verdict(DEV, KEY)
    p["labels"] = {"name": "PHANTOM^SYNTHETIC"}
    mutate(p)
    with caplog.at_level(logging.WARNING):
        assert st.handle(f"ctriage/{DEV}/verdict/{KEY}", enc(p)) == []
    assert rule in caplog.text
    assert "PHANTOM" not in caplog.text and "maybe" not in caplog.text and "yesterday" not in caplog.text


@pytest.mark.parametrize("data,why", [("not base64!", "not base64"), ("aGVsbG8=", "not a PNG"),
                                      (None, "damaged PNG")])
def test_bad_key_images_are_refused(st, caplog, data, why):
    import base64

    p = overlay(DEV, KEY)
    p["image"]["data"] = data if data is not None else base64.b64encode(key_png()[:60]).decode()
    with caplog.at_level(logging.WARNING):
        assert st.handle(f"ctriage/{DEV}/overlay/{KEY}", enc(p)) == []
    assert why in caplog.text


def test_overlay_image_and_boxes_reach_the_study(st):
    st.handle(f"ctriage/{DEV}/verdict/{KEY}", enc(verdict(DEV, KEY)))
    ev = st.handle(f"ctriage/{DEV}/overlay/{KEY}", enc(overlay(DEV, KEY)))
    s = ev[-1][1]
    assert re.fullmatch(rf"/img/{DEV}/{KEY}/[0-9a-f]{{16}}\.png", s["image"]) and s["key_slice"] == 121
    assert s["boxes"][0]["quadrant"] == "lower-right" and all(0 <= v <= 1 for v in s["boxes"][0]["box"])
    assert st.image(DEV, KEY) == key_png()
    assert "data" not in json.dumps(st.snapshot())  # images go by URL, not inside the events
    # an overlay without an image keeps the boxes (the page draws them on a canvas)
    s = st.handle(f"ctriage/{DEV}/overlay/{KEY}", enc(overlay(DEV, KEY, image=False)))[-1][1]
    assert s["image"] is None and s["boxes"]


def test_labels_are_dropped_unless_the_site_enables_them(validators):
    name = {"name": "DOE^JANE", "patient_id": "MRN-0042"}
    off = DisplayState(validators=validators)
    s = off.handle(f"ctriage/{DEV}/verdict/{KEY}", enc(verdict(DEV, KEY, labels=name)))[-1][1]
    assert s["labels"] is None
    assert "DOE" not in json.dumps(off.snapshot()) and "MRN" not in json.dumps(off.snapshot())
    on = DisplayState(validators=validators, show_labels=True)
    s = on.handle(f"ctriage/{DEV}/verdict/{KEY}", enc(verdict(DEV, KEY, labels=name)))[-1][1]
    assert s["labels"] == name


def test_ack_counts_for_the_flag_it_was_given_on(st):
    topic = f"ctriage/{DEV}/verdict/{KEY}"
    st.handle(topic, enc(verdict(DEV, KEY, "provisional", "negative", created=T0)), now=T0)
    ack = {"schema": "ctriage.ack/1", "study_key": KEY, "seen_by": "nurse-station", "created": iso(at(5))}
    s = st.handle(f"ctriage/{DEV}/ack/{KEY}", enc(ack), now=T0)[-1][1]
    assert s["acked"] and s["ack"]["seen_by"] == "nurse-station"
    # the scan turns positive after the ack: the positive has not been seen yet
    s = st.handle(topic, enc(verdict(DEV, KEY, "provisional", "positive", created=at(10))), now=T0)[-1][1]
    assert s["flag"] == "positive" and not s["acked"] and s["ack"] is not None
    ack["created"] = iso(at(20))
    assert st.handle(f"ctriage/{DEV}/ack/{KEY}", enc(ack), now=T0)[-1][1]["acked"]
    # the final positive confirms the same flag: still acknowledged
    s = st.handle(topic, enc(verdict(DEV, KEY, "final", "positive", created=at(30))), now=T0)[-1][1]
    assert s["acked"]


def test_ack_before_its_study_is_kept(st):
    ack = {"schema": "ctriage.ack/1", "study_key": KEY, "seen_by": "other-screen", "created": iso(at(9))}
    assert st.handle(f"ctriage/{DEV}/ack/{KEY}", enc(ack), retained=True, now=T0) == []
    s = st.handle(f"ctriage/{DEV}/verdict/{KEY}", enc(verdict(DEV, KEY, created=T0)), retained=True, now=T0)[-1][1]
    assert s["acked"] and s["ack"]["seen_by"] == "other-screen"


def test_old_studies_expire_and_cleared_retained_messages_remove(validators):
    st = DisplayState(validators=validators, expire_minutes=60)
    st.handle(f"ctriage/{DEV}/verdict/{KEY}", enc(verdict(DEV, KEY, created=T0)), now=T0)
    old = "0123456789abcdef"
    # a retained verdict older than the window never shows
    assert st.handle(f"ctriage/{DEV}/verdict/{old}", enc(verdict(DEV, old, created=T0 - dt.timedelta(hours=3))),
                     now=T0)[-1:] == []
    assert st.expire_old(T0 + dt.timedelta(minutes=59)) == []
    assert st.expire_old(T0 + dt.timedelta(minutes=61)) == [("remove", {"id": f"{DEV}/{KEY}"})]
    st.handle(f"ctriage/{DEV}/verdict/{KEY}", enc(verdict(DEV, KEY, created=T0)), now=T0)
    assert st.handle(f"ctriage/{DEV}/verdict/{KEY}", b"", now=T0) == [("remove", {"id": f"{DEV}/{KEY}"})]


def test_a_clock_ahead_never_puts_a_scan_in_the_future(st):
    s = st.handle(f"ctriage/{DEV}/verdict/{KEY}", enc(verdict(DEV, KEY, created=at(7200))), now=T0)[-1][1]
    assert s["scanned"] == iso(T0 - dt.timedelta(seconds=4))


def test_device_online_offline_and_last_seen(st):
    t1, t2 = T0 + dt.timedelta(minutes=1), T0 + dt.timedelta(minutes=5)
    d = st.handle(f"ctriage/{DEV}/status", enc(status(DEV)), now=T0)[-1][1]
    assert d["state"] == "online" and d["last_seen"] == iso(T0) and d["version"]
    st.handle(f"ctriage/{DEV}/stats", enc(messages.stats_payload(device=DEV, queue=0, slices_per_s=40.0)), now=t1)
    will = messages.offline_payload(DEV)
    will["created"] = iso(T0 - dt.timedelta(hours=1))  # the will was written when the device connected
    d = st.handle(f"ctriage/{DEV}/status", enc(will), now=t2)[-1][1]
    assert (d["state"], d["last_seen"], d["since"]) == ("offline", iso(t1), iso(t2))
    # a verdict from a device never heard of makes it known, state unknown until its status arrives
    other = st.handle(f"ctriage/ct-room-9/verdict/{KEY}", enc(verdict("ct-room-9", KEY)), retained=True, now=t2)
    assert other[0] == ("device", other[0][1]) and other[0][1]["state"] == "unknown"


def test_schemas_are_found():
    assert (schema_dir() / "ack.schema.json").is_file()


def test_display_config_validation():
    assert from_dict({"display": {"name": "fever-clinic-1", "expire_minutes": 30}}).display.name == "fever-clinic-1"
    with pytest.raises(ConfigError, match="name: at most 64"):
        from_dict({"display": {"name": "x" * 65}})
    with pytest.raises(ConfigError, match="expire_minutes"):
        from_dict({"display": {"expire_minutes": 0}})


# ---- the server (HTTP + MQTT, real mosquitto) --------------------------------------------------------------------

def _cfg(**display) -> Config:
    return from_dict({"display": {"name": "test-screen", **display}})


def _get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _post(url: str, body: bytes, ctype: str = "application/json") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _until(pred, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    return pred()


class Listener:
    """A paho subscriber collecting (topic, payload, retain) tuples."""

    def __init__(self, url: str, topic: str) -> None:
        from paho.mqtt import client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        port = int(url.rsplit(":", 1)[1])
        self.q: queue.Queue = queue.Queue()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_message = lambda c, u, m: self.q.put((m.topic, m.payload, m.retain))
        self.c.connect("127.0.0.1", port)
        self.c.subscribe(topic, qos=1)
        self.c.loop_start()

    def publish(self, topic: str, payload: dict | bytes, retain: bool = True) -> None:
        data = payload if isinstance(payload, bytes) else enc(payload)
        self.c.publish(topic, data, qos=1, retain=retain).wait_for_publish(5)

    def get(self, timeout: float = 5.0):
        return self.q.get(timeout=timeout)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def server(mosquitto):
    from .display_helpers import start_display

    srv = start_display(_cfg(), mqtt_url=mosquitto.url, bind="127.0.0.1", port=0)
    assert srv.wait_broker(10), "display did not connect to the broker"
    yield srv
    srv.stop()


def test_http_routes_static_and_security_headers(server):
    code, headers, body = _get(server.url)
    assert code == 200 and b"/static/app.js" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    for name in ("app.js", "style.css"):
        assert _get(server.url + "static/" + name)[0] == 200
    assert _get(server.url + "static/../server.py")[0] == 404
    assert _get(server.url + "static/%2e%2e/server.py")[0] == 404
    assert _get(server.url + "img/ct-room-2/" + KEY + "/" + "0" * 16 + ".png")[0] == 404
    for name in ("index.html", "app.js", "style.css"):  # everything local: no CDN, no web fonts, no internet
        text = (ROOT / "appliance/display/static" / name).read_text().replace("http://www.w3.org/2000/svg", "")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name


def test_events_stream_starts_with_a_snapshot(server):
    with urllib.request.urlopen(server.url + "events", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        lines = [r.readline().decode() for _ in range(4)]
    assert lines[0] == "retry: 1000\n" and lines[2] == "event: snapshot\n"
    snap = json.loads(lines[3][len("data: "):])
    assert snap["link"]["connected"] and snap["config"]["name"] == "test-screen"


def test_mqtt_verdict_to_state_and_ack_back(server, mosquitto):
    from jsonschema import Draft202012Validator

    bus = Listener(mosquitto.url, "ctriage/+/ack/+")
    try:
        bus.publish(f"ctriage/{DEV}/verdict/{KEY}", verdict(DEV, KEY, "provisional", "positive"))
        bus.publish(f"ctriage/{DEV}/overlay/{KEY}", overlay(DEV, KEY, "provisional"))
        assert _until(lambda: server.state.studies.get(f"{DEV}/{KEY}") and server.state.studies[f"{DEV}/{KEY}"].image)
        url = server.state.snapshot()["studies"][0]["image"]
        code, headers, png = _get(server.url + url.lstrip("/"))
        assert code == 200 and headers["Content-Type"] == "image/png" and png == key_png()
        assert _get(server.url + url.lstrip("/").replace(url[-20:-4], "0" * 16))[0] == 404  # a stale image URL

        assert _post(server.url + "api/ack", b"device=x", "application/x-www-form-urlencoded")[0] == 415
        assert _post(server.url + "api/ack", b'{"device": "ct-room-2"}')[0] == 400
        assert _post(server.url + "api/ack", enc({"device": DEV, "study_key": "nothex"}))[0] == 400
        assert _post(server.url + "api/ack", enc({"device": DEV, "study_key": "0" * 16}))[0] == 404
        code, out = _post(server.url + "api/ack", enc({"device": DEV, "study_key": KEY}))
        assert code == 202 and out["seen_by"] == "test-screen"
        topic, payload, _ = bus.get()
        assert topic == f"ctriage/{DEV}/ack/{KEY}"
        ack = json.loads(payload)
        schema = json.loads((ROOT / "config/schemas/ack.schema.json").read_text())
        Draft202012Validator(schema).validate(ack)
        assert ack["seen_by"] == "test-screen"
        assert _until(lambda: server.state.snapshot()["studies"][0]["acked"]
                      and not server.state.snapshot()["studies"][0]["ack"]["pending"])
        later = Listener(mosquitto.url, "ctriage/+/ack/+")  # retained: a screen started later learns it too
        try:
            assert later.get()[1:] == (payload, True)
        finally:
            later.close()
    finally:
        bus.close()


def test_garbage_on_the_bus_never_stops_the_server(server, mosquitto):
    bus = Listener(mosquitto.url, "ctriage/#")
    try:
        for topic, data in [(f"ctriage/{DEV}/verdict/{KEY}", b"\x00\x01garbage"),
                            (f"ctriage/{DEV}/status", b'{"schema": "ctriage.status/1"}'),
                            (f"ctriage/{DEV}/overlay/{KEY}", b"null"),
                            (f"ctriage/../verdict/{KEY}", b"{}")]:
            bus.publish(topic, data, retain=False)
        bus.publish(f"ctriage/{DEV}/verdict/{KEY}", verdict(DEV, KEY), retain=False)
        assert _until(lambda: f"{DEV}/{KEY}" in server.state.studies)
        assert server.state.ignored >= 3
    finally:
        bus.close()


def test_broker_restart_link_goes_down_and_comes_back(server, mosquitto):
    bus = Listener(mosquitto.url, "ctriage/#")
    bus.publish(f"ctriage/{DEV}/verdict/{KEY}", verdict(DEV, KEY))
    bus.close()
    assert _until(lambda: f"{DEV}/{KEY}" in server.state.studies)
    mosquitto.stop()
    assert _until(lambda: not server.state.link["connected"])
    assert server.state.link["error"] == "connection lost"
    # an acknowledgement while the broker is away is queued and sent after the reconnect
    code, out = _post(server.url + "api/ack", enc({"device": DEV, "study_key": KEY}))
    assert code == 202 and out["queued"]
    mosquitto.start()
    assert _until(lambda: server.state.link["connected"], 15)
    assert _until(lambda: (server.state.studies[f"{DEV}/{KEY}"].ack or {}).get("pending") is False, 10)


def test_display_started_before_the_broker_connects_when_it_comes(mosquitto):
    from .display_helpers import start_display

    mosquitto.stop()
    srv = start_display(_cfg(), mqtt_url=mosquitto.url, port=0)
    try:
        assert not srv.wait_broker(1.5)
        assert srv.state.link["error"] in ("connecting", "broker unreachable")
        assert _get(srv.url + "healthz")[0] == 200  # the page is served meanwhile and says the link is down
        mosquitto.start()
        assert srv.wait_broker(15)
    finally:
        srv.stop()


def test_an_mqtt_3_1_1_broker_is_spoken_to_in_3_1_1(tmp_path):
    """protocol = auto (the default): a broker without MQTT 5 (here amqtt) refuses the first CONNECT; 3.1.1 follows."""
    pytest.importorskip("amqtt", reason="amqtt not installed (the embedded 3.1.1 broker of the demo)")
    from paho.mqtt import client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from appliance.embedded_broker import free_port, start_amqtt
    from .display_helpers import start_display

    port = free_port()
    stop_broker = start_amqtt(port)
    srv = start_display(_cfg(), mqtt_url=f"mqtt://127.0.0.1:{port}", port=0)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    try:
        assert srv.wait_broker(20) and srv.protocol == "3.1.1"
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        pub.publish(f"ctriage/{DEV}/verdict/{KEY}", enc(verdict(DEV, KEY)), qos=1, retain=True).wait_for_publish(5)
        assert _until(lambda: f"{DEV}/{KEY}" in srv.state.studies, 10)
        assert _post(srv.url + "api/ack", enc({"device": DEV, "study_key": KEY}))[0] == 202
        assert _until(lambda: (srv.state.studies[f"{DEV}/{KEY}"].ack or {}).get("pending") is False, 10)
    finally:
        pub.loop_stop()
        pub.disconnect()
        srv.stop()
        stop_broker()


def test_cli_display_runs_and_stops_cleanly(mosquitto):
    from .display_helpers import spawn_display

    proc = spawn_display(mqtt_url=mosquitto.url, port=0)
    try:
        code, _, body = _get(proc.url + "healthz")
        assert code == 200 and json.loads(body)["ok"]
        assert _until(lambda: json.loads(_get(proc.url + "healthz")[2])["broker"]["connected"])
    finally:
        assert proc.stop() == 0


def test_cli_display_refuses_a_bad_broker_url_and_a_busy_port():
    import socket

    cmd = [sys.executable, "-m", "appliance.cli", "display"]
    r = subprocess.run(cmd + ["--mqtt-url", "http://x", "--port", "0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "url: must start with mqtt:// or mqtts://" in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(cmd + ["--port", str(port), "--mqtt-url", "mqtt://127.0.0.1:1"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
