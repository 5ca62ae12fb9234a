"""Triage display in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, a real
mosquitto, the real display server. Screenshots at 1920×1080 go to test-artifacts/display/.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from appliance.domain import Evidence
from appliance.config import from_dict
from appliance.publish import messages

from .broker import free_port
from .test_display_server import ROOT, Listener, enc, overlay, status, verdict

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ART = ROOT / "test-artifacts" / "display"
VIEW = {"width": 1920, "height": 1080}

K = {  # study keys (keyed hashes in production)
    "pos": "9f3a61c2d07e4b18", "neg": "1b2c3d4e5f607182", "ind": "a0b1c2d3e4f50617",
    "pend": "5e6f708192a3b4c5", "box": "c3d4e5f60718293a", "old": "77aa88bb99cc00dd", "older": "0d1e2f3a4b5c6d7e",
}


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        reason = "Chromium not installed (apt-get install chromium)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def display(mosquitto):
    from .display_helpers import start_display

    srv = start_display(from_dict({"display": {"name": "fever-clinic-1"}}), mqtt_url=mosquitto.url,
                        bind="127.0.0.1", port=0)
    assert srv.wait_broker(10)
    yield srv
    srv.stop()


@pytest.fixture
def bus(mosquitto):
    b = Listener(mosquitto.url, "ctriage/+/ack/+")
    yield b
    b.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport=VIEW)
    page.goto(url)
    page.wait_for_selector("body.conn-live", timeout=5000)
    return page


def tile(page, key: str):
    return page.locator(f'.tile[data-id$="/{key}"]')


def shot(page, name: str) -> None:
    ART.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(150)  # let the arrival animation settle
    page.screenshot(path=str(ART / name))


def assert_nothing_clipped(page) -> None:
    clipped = page.evaluate("""() => [...document.querySelectorAll('.tile, #top')].flatMap(t =>
        [...t.querySelectorAll('.flag, .flag-action, .strip, .strip-text, .facts, .facts > div, .where-text, '
                               + '.key-cap, .ack, #devices')]
          .filter(e => e.scrollWidth > e.clientWidth + 1 || e.scrollHeight > e.clientHeight + 1)
          .map(e => (t.dataset.id || t.id) + ' ' + e.className))""")
    assert clipped == [], f"text does not fit: {clipped}"


def ago(minutes: float):
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=minutes)


def test_verdict_appears_within_a_second_then_goes_final(browser, display, bus):
    from playwright.sync_api import expect

    page = open_page(browser, display.url)
    expect(page.locator("#empty")).to_be_visible()
    t0 = time.monotonic()
    bus.publish(f"ctriage/ct-room-2/verdict/{K['pos']}", verdict("ct-room-2", K["pos"], "provisional", "positive"))
    t = tile(page, K["pos"])
    t.wait_for(state="visible", timeout=1000)
    latency = time.monotonic() - t0
    print(f"verdict → tile on screen: {latency * 1000:.0f} ms")
    expect(t.locator(".flag-word")).to_have_text("POSITIVE")
    expect(t.locator(".flag-action")).to_have_text("ISOLATE NOW")
    expect(t.locator(".strip")).to_contain_text("PROVISIONAL")
    expect(t).to_have_class(re.compile(r"\bflag-positive\b.*\bstate-provisional\b.*\bunacked\b"))
    expect(t.locator(".room")).to_have_text("ct-room-2")
    expect(t.locator(".ident")).to_have_text("Study 9f3a61")
    expect(t.locator(".where-text")).to_have_text("patient's left posterior, slices 113–132")
    expect(t.locator(".model")).to_have_text("model valid-area 1.0.0 · lesion 1.2.0")
    expect(t.locator(".age")).to_have_text("just now")
    expect(page.locator("#unseen")).to_have_text("1 POSITIVE NOT YET SEEN")
    expect(t.locator(".key-none")).to_have_text("Key image pending")

    bus.publish(f"ctriage/ct-room-2/overlay/{K['pos']}", overlay("ct-room-2", K["pos"], "provisional"))
    img = t.locator("img.key-img")
    expect(img).to_be_visible(timeout=2000)
    page.wait_for_function("el => el.complete && el.naturalWidth === 256", arg=img.element_handle(), timeout=2000)

    bus.publish(f"ctriage/ct-room-2/verdict/{K['pos']}", verdict("ct-room-2", K["pos"], "final", "positive"))
    expect(t.locator(".strip")).to_have_text("FINAL · scan complete", timeout=1000)
    expect(t).to_have_class(re.compile(r"\bstate-final\b"))
    expect(t.locator(".flag-word")).to_have_text("POSITIVE")
    assert page.locator(".tile").count() == 1
    assert page.evaluate("document.body.dataset.chimes") is None  # sound is off by default
    page.close()


def test_every_flag_renders_distinctly_and_the_newest_six_fit(browser, display, bus, mosquitto):
    from playwright.sync_api import expect
    from paho.mqtt import client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    page = open_page(browser, display.url)
    for room in ("ct-room-1", "ct-room-2"):
        bus.publish(f"ctriage/{room}/status", status(room))
    # ct-room-3 is a real MQTT client with a last will, like the appliance
    port = int(mosquitto.url.rsplit(":", 1)[1])
    dev3 = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="ct-room-3", protocol=mqtt.MQTTv5)
    dev3.will_set("ctriage/ct-room-3/status", enc(messages.offline_payload("ct-room-3")), qos=1, retain=True)
    dev3.connect("127.0.0.1", port)
    dev3.loop_start()
    dev3.publish("ctriage/ct-room-3/status", enc(status("ct-room-3")), qos=1, retain=True).wait_for_publish(5)

    studies = [  # (room, key, state, result, minutes ago, overlay)
        ("ct-room-2", K["pos"], "final", "positive", 3, "image"),
        ("ct-room-1", K["pend"], "provisional", "negative", 1, None),
        ("ct-room-1", K["neg"], "final", "negative", 12, None),
        ("ct-room-3", K["ind"], "final", "indeterminate", 25, None),
        ("ct-room-3", K["box"], "provisional", "positive", 6, "boxes"),
        ("ct-room-2", K["old"], "final", "negative", 50, None),
        ("ct-room-1", K["older"], "final", "negative", 95, None),
    ]
    focal = Evidence("lower-right", 30, 40, 11)  # ct-room-2's older negative: a single focal lesion, named
    for room, key, state, result, mins, ov in studies:
        reason = "only 12 axial slices (need 20)" if result == "indeterminate" else None
        bus.publish(f"ctriage/{room}/verdict/{key}", verdict(room, key, state, result, created=ago(mins),
                                                              reason=reason, lead_s=40,
                                                              focal=focal if key == K["old"] else None))
        if ov:
            bus.publish(f"ctriage/{room}/overlay/{key}", overlay(room, key, state, image=ov == "image"))
    expect(page.locator(".tile")).to_have_count(7)
    order = page.locator(".tile").evaluate_all("els => els.map(e => e.dataset.id.split('/')[1])")
    # unseen positives pinned first (the longest-flagged first), then the rest newest first
    assert order == [K["box"], K["pos"], K["pend"], K["neg"], K["ind"], K["old"], K["older"]]

    expected = {  # key: (class, word, action, icon)
        K["pos"]: ("flag-positive", "POSITIVE", "ISOLATE NOW", "i-positive"),
        K["box"]: ("flag-positive", "POSITIVE", "ISOLATE NOW", "i-positive"),
        K["neg"]: ("flag-negative", "NEGATIVE", "no COVID-19 pattern found", "i-negative"),
        K["ind"]: ("flag-indeterminate", "INDETERMINATE", "review the scan", "i-indeterminate"),
        K["pend"]: ("flag-pending", "ANALYSING", "no lesion run so far — wait", "i-pending"),
    }
    for key, (cls, word, action, icon) in expected.items():
        t = tile(page, key)
        expect(t).to_have_class(re.compile(rf"\b{cls}\b"))
        expect(t.locator(".flag-word")).to_have_text(word)
        expect(t.locator(".flag-word")).to_be_visible()
        expect(t.locator(".flag-action")).to_have_text(action)
        assert t.locator(f'.flag-icon use[href="#{icon}"]').count() == 1
    expect(tile(page, K["pend"]).locator(".strip")).to_contain_text("PROVISIONAL")
    expect(tile(page, K["box"]).locator(".strip")).to_contain_text("PROVISIONAL")
    expect(tile(page, K["neg"]).locator(".strip")).to_contain_text("FINAL")
    expect(tile(page, K["neg"]).locator(".key-none")).to_have_text("No lesion found")
    expect(tile(page, K["box"]).locator("canvas.key-canvas")).to_be_visible()  # boxes drawn without a key image

    # colour differs per flag (and every flag also has its own word and icon); type is large enough for 3 m
    styles = page.evaluate("""keys => keys.map(k => {
        const t = document.querySelector(`.tile[data-id$="/${k}"]`);
        const f = getComputedStyle(t.querySelector('.flag'));
        return [f.backgroundColor, parseFloat(getComputedStyle(t.querySelector('.flag-word')).fontSize),
                parseFloat(getComputedStyle(t.querySelector('.room')).fontSize)];
    })""", [K["pos"], K["neg"], K["ind"], K["pend"]])
    assert len({s[0] for s in styles}) == 4
    assert styles[0][0] == "rgb(230, 0, 126)" and styles[1][0] == "rgb(21, 101, 192)"
    assert all(s[1] >= 46 and s[2] >= 32 for s in styles)
    striped = page.evaluate("""k => getComputedStyle(document.querySelector(`.tile[data-id$="/${k}"] .strip`))
                               .backgroundImage""", K["box"])
    assert "repeating-linear-gradient" in striped  # provisional is hatched, final is solid

    expect(tile(page, K["ind"]).locator(".detail")).to_have_text("only 12 axial slices (need 20)")
    expect(tile(page, K["old"]).locator(".detail")).to_have_text("single focal lesion · 11 slices")
    expect(tile(page, K["old"]).locator(".where-text")).to_have_text("patient's left posterior, slices 31–41")
    expect(tile(page, K["old"]).locator(".flag-word")).to_have_text("NEGATIVE")
    expect(tile(page, K["old"]).locator(".flag-action")).to_have_text("radiologist to read")
    expect(tile(page, K["old"]).locator(".key-none")).to_have_text("Key image pending")  # not "No lesion found"
    amber = page.evaluate("""keys => keys.map(k => getComputedStyle(
        document.querySelector(`.tile[data-id$="/${k}"] .detail`)).color)""", [K["old"], K["neg"]])
    assert amber[0] == "rgb(255, 194, 10)" and amber[1] != amber[0]  # the note stands out from a plain negative
    assert_nothing_clipped(page)

    # the first six are fully on screen without scrolling
    boxes = page.locator(".tile").evaluate_all("els => els.map(e => e.getBoundingClientRect().bottom)")
    assert max(boxes[:6]) <= VIEW["height"] and boxes[6] > VIEW["height"]
    expect(page.locator("#unseen")).to_have_text("2 POSITIVE NOT YET SEEN")
    shot(page, "queue.png")

    # ct-room-3 drops off the network: the broker publishes its last will
    dev3.loop_stop()
    dev3.socket().close()
    chip = page.locator('#devices .dev[data-device="ct-room-3"]')
    expect(chip).to_have_attribute("data-state", "offline", timeout=5000)
    expect(chip).to_contain_text("OFFLINE")
    expect(chip.locator(".dev-seen")).to_contain_text("last seen")
    expect(tile(page, K["box"]).locator(".offline-note")).to_have_text("⚠ OFFLINE · won't update")
    expect(tile(page, K["box"])).to_have_class(re.compile(r"\bdevice-offline\b"))
    expect(tile(page, K["ind"]).locator(".offline-note")).to_have_text("⚠ SCANNER OFFLINE")
    expect(tile(page, K["pos"]).locator(".offline-note")).to_be_hidden()
    assert_nothing_clipped(page)
    expect(page.locator('#devices .dev[data-device="ct-room-1"]')).to_contain_text("ONLINE")
    shot(page, "device-offline.png")
    page.close()


def test_seen_is_published_schema_valid_and_shows_on_every_screen(browser, display, bus):
    from jsonschema import Draft202012Validator
    from playwright.sync_api import expect

    schema = json.loads((ROOT / "config/schemas/ack.schema.json").read_text())
    bus.publish("ctriage/ct-room-2/status", status("ct-room-2"))
    bus.publish(f"ctriage/ct-room-2/verdict/{K['pos']}", verdict("ct-room-2", K["pos"], "final", "positive",
                                                                   created=ago(2)))
    bus.publish(f"ctriage/ct-room-2/overlay/{K['pos']}", overlay("ct-room-2", K["pos"]))
    bus.publish(f"ctriage/ct-room-1/verdict/{K['neg']}", verdict("ct-room-1", K["neg"], "final", "negative",
                                                                   created=ago(4)))
    screen_a, screen_b = open_page(browser, display.url), open_page(browser, display.url)
    ta, tb = tile(screen_a, K["pos"]), tile(screen_b, K["pos"])
    expect(ta.locator(".ack")).to_have_text("Tap to confirm SEEN")
    ta.locator(".ack").click()
    topic, payload, retained = bus.get()
    assert topic == f"ctriage/ct-room-2/ack/{K['pos']}" and retained is False  # delivered live (retained on the broker)
    ack = json.loads(payload)
    Draft202012Validator(schema).validate(ack)
    assert ack["study_key"] == K["pos"] and ack["seen_by"] == "fever-clinic-1"
    for t in (ta, tb):  # this screen and the other one
        expect(t.locator(".ack")).to_contain_text("SEEN", timeout=2000)
        expect(t.locator(".ack")).to_contain_text("fever-clinic-1")
        expect(t).to_have_attribute("data-acked", "true")
        expect(t).not_to_have_class(re.compile(r"\bunacked\b"))
    expect(screen_a.locator("#unseen")).to_be_hidden()

    # acknowledged elsewhere (a nurse station) by MQTT
    bus.publish(f"ctriage/ct-room-1/ack/{K['neg']}", {"schema": "ctriage.ack/1", "study_key": K["neg"],
                                                      "seen_by": "nurse-station", "created": messages.now_iso()})
    for page in (screen_a, screen_b):
        expect(tile(page, K["neg"]).locator(".ack")).to_contain_text("nurse-station", timeout=2000)
    # a screen opened later shows both acknowledgements at once
    screen_c = open_page(browser, display.url)
    expect(screen_c.locator('.tile[data-acked="true"]')).to_have_count(2)
    shot(screen_a, "acknowledged.png")
    for p in (screen_a, screen_b, screen_c):
        p.close()


def test_no_patient_identifier_reaches_the_page(browser, display, bus, tmp_path):
    """A study from real DICOM headers (a synthetic phantom): the page shows the short key, time and room only."""
    import pydicom
    from playwright.sync_api import expect

    from appliance.phantom import PhantomSpec, write_phantom
    from appliance.privacy import pseudonym

    spec = PhantomSpec(slices=2, size=64, patient_name="DOE^JANE^Q", patient_id="MRN-7731942")
    files = write_phantom(tmp_path / "study", spec)
    ds = pydicom.dcmread(files[0])
    key = pseudonym(b"site-secret-for-the-test-0123456789", ds.StudyInstanceUID)
    identifiers = {str(ds.PatientName), *str(ds.PatientName).split("^"), ds.PatientID, ds.StudyInstanceUID,
                   ds.SeriesInstanceUID, ds.SOPInstanceUID}
    for tag in ("AccessionNumber", "PatientBirthDate", "StudyID"):
        if str(ds.get(tag, "") or "").strip():
            identifiers.add(str(ds.get(tag)))
    identifiers = {i for i in identifiers if len(i) >= 2}
    assert "DOE" in identifiers and "MRN-7731942" in identifiers

    page = open_page(browser, display.url)
    v = verdict("ct-room-4", key, "final", "positive", created=ago(1))
    assert "labels" not in v
    bus.publish(f"ctriage/ct-room-4/verdict/{key}", v)
    # a second study carries labels although this display's site config has not enabled them
    key2 = pseudonym(b"site-secret-for-the-test-0123456789", ds.StudyInstanceUID + ".2")
    bus.publish(f"ctriage/ct-room-4/verdict/{key2}", verdict("ct-room-4", key2, "final", "negative", created=ago(2),
                                                              labels={"name": str(ds.PatientName), "id": ds.PatientID}))
    t = tile(page, key)
    expect(t.locator(".ident")).to_have_text(f"Study {key[:6]}")
    expect(t.locator(".room")).to_have_text("ct-room-4")
    expect(t.locator(".time")).to_have_text(re.compile(r"^\d\d:\d\d$"))
    expect(tile(page, key2).locator(".ident")).to_have_text(f"Study {key2[:6]}")
    text = page.locator("body").inner_text() + page.content()
    import urllib.request

    with urllib.request.urlopen(display.url + "api/state", timeout=5) as r:
        text += r.read().decode()
    leaked = sorted(i for i in identifiers if i.lower() in text.lower())
    assert not leaked, f"identifiers on the page: {leaked}"
    page.close()


def test_labels_show_only_when_the_site_enables_them(browser, mosquitto, bus):
    from playwright.sync_api import expect

    from .display_helpers import start_display

    srv = start_display(from_dict({"privacy": {"send_patient_labels": True}}), mqtt_url=mosquitto.url, port=0)
    try:
        assert srv.wait_broker(10)
        page = open_page(browser, srv.url)
        bus.publish(f"ctriage/ct-room-4/verdict/{K['pos']}",
                    verdict("ct-room-4", K["pos"], labels={"name": "PHANTOM^SYNTHETIC", "id": "SYNTH-0001"}))
        expect(tile(page, K["pos"]).locator(".ident")).to_have_text("PHANTOM^SYNTHETIC · SYNTH-0001")
        page.close()
    finally:
        srv.stop()


def test_page_reconnects_after_server_and_broker_restarts(browser, mosquitto, bus):
    from playwright.sync_api import expect

    from .display_helpers import spawn_display

    port = free_port()
    bus.publish("ctriage/ct-room-2/status", status("ct-room-2"))
    bus.publish(f"ctriage/ct-room-2/verdict/{K['pos']}", verdict("ct-room-2", K["pos"], "final", "positive",
                                                                   created=ago(7)))
    bus.publish(f"ctriage/ct-room-2/overlay/{K['pos']}", overlay("ct-room-2", K["pos"]))
    proc = spawn_display(mqtt_url=mosquitto.url, port=port)
    try:
        page = open_page(browser, proc.url)
        expect(tile(page, K["pos"]).locator(".flag-word")).to_have_text("POSITIVE")  # retained: shown at once

        proc.proc.kill()  # the server dies (no goodbye)
        proc.stop()
        banner = page.locator("#banner")
        expect(banner).to_be_visible(timeout=5000)
        expect(banner).to_contain_text("Reconnecting")
        expect(page.locator("#live-text")).to_have_text("RECONNECTING")
        expect(tile(page, K["pos"])).to_be_visible()  # the last known state stays on screen, dimmed
        shot(page, "reconnecting.png")

        proc = spawn_display(mqtt_url=mosquitto.url, port=port)
        expect(page.locator("#live-text")).to_have_text("LIVE", timeout=10000)
        expect(banner).to_be_hidden()
        expect(tile(page, K["pos"]).locator(".flag-word")).to_have_text("POSITIVE")
        # the key image loads again (looked up afresh on each poll: a re-render may replace the element); a
        # functional wait, generous for a loaded 2-core machine, not a speed check
        page.wait_for_function("sel => { const el = document.querySelector(sel);"
                               " return !!el && el.complete && el.naturalWidth > 0; }",
                               arg=f'.tile[data-id$="/{K["pos"]}"] img.key-img', timeout=15000)

        mosquitto.stop()  # the server's broker link goes down
        expect(banner).to_be_visible(timeout=5000)
        expect(banner).to_contain_text("Broker link lost")
        shot(page, "broker-lost.png")
        mosquitto.start()
        expect(banner).to_be_hidden(timeout=15000)
        expect(page.locator("#live-text")).to_have_text("LIVE")
        page.close()
    finally:
        proc.stop()


def test_optional_chime_on_a_new_positive(browser, mosquitto, bus):
    from playwright.sync_api import expect

    from .display_helpers import start_display

    srv = start_display(from_dict({"display": {"sound": True}}), mqtt_url=mosquitto.url, port=0)
    try:
        assert srv.wait_broker(10)
        page = open_page(browser, srv.url)
        bus.publish(f"ctriage/ct-room-2/verdict/{K['neg']}", verdict("ct-room-2", K["neg"], "final", "negative"))
        expect(tile(page, K["neg"])).to_be_visible()
        assert page.evaluate("document.body.dataset.chimes") is None
        bus.publish(f"ctriage/ct-room-2/verdict/{K['pos']}", verdict("ct-room-2", K["pos"], "provisional", "positive"))
        expect(page.locator("body")).to_have_attribute("data-chimes", "1")
        bus.publish(f"ctriage/ct-room-2/verdict/{K['pos']}", verdict("ct-room-2", K["pos"], "final", "positive"))
        expect(tile(page, K["pos"])).to_have_class(re.compile(r"\bstate-final\b"))
        assert page.evaluate("document.body.dataset.chimes") == "1"  # once per positive, not per update
        page.close()
    finally:
        srv.stop()

