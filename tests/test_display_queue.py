"""Triage display in a real browser (Chromium + Playwright + mosquitto, as in test_display.py), for the issue "the
display hides positives": unseen positives pinned and never off-screen at 1280×720, the where-line from the case
rule's finding in patient terms, the key image captioned in HTML and enlargeable, corrected verdicts.

The screenshot of the 10-study queue at 1280×720 goes to /tmp/display-1280.png (and test-artifacts/display/).
"""
from __future__ import annotations

import hashlib
import re
import shutil

from appliance.domain import Evidence
from appliance.publish import messages

from .test_display import ART, ago, assert_nothing_clipped, browser, bus, display, tile  # noqa: F401 - fixtures
from .test_display_server import iso, overlay, status, verdict

HD = {"width": 1280, "height": 720}
FULL_HD = {"width": 1920, "height": 1080}
WHAT = "late slices changed the result from negative to positive"


def key(name: str) -> str:
    """A study key (a keyed hash in production)."""
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def open_at(browser, url: str, viewport: dict):  # noqa: F811 - the fixture
    page = browser.new_page(viewport=viewport)
    page.goto(url)
    page.wait_for_selector("body.conn-live", timeout=5000)
    return page


def ack_payload(k: str, seen_by: str = "nurse-station") -> dict:
    return {"schema": "ctriage.ack/1", "study_key": k, "seen_by": seen_by, "created": messages.now_iso()}


def corrected(room: str, k: str, result: str, was: str, *, minutes: float = 0.0, what: str = WHAT) -> dict:
    """A corrected verdict: a final that replaces an earlier final (`was`) with another result."""
    p = verdict(room, k, "final", result, created=ago(minutes), lead_s=40)
    p["state"] = "corrected"
    p["correction"] = {"previous_result": was, "previous_state": "final", "previous_created": iso(ago(minutes + 5)),
                       "what": what}
    return p


def publish_queue(bus, studies: list[tuple[str, str, str, float]]) -> None:  # noqa: F811
    """studies: (name, kind, room, minutes ago), published in the order given (newest last).
    kind: unseen (positive), acked (positive, acknowledged), negative, focal (negative naming a focal lesion),
    indeterminate, pending (provisional negative), provisional (provisional positive). Positives get an overlay."""
    for name, kind, room, mins in studies:
        k = key(name)
        state = "provisional" if kind in ("pending", "provisional") else "final"
        result = {"unseen": "positive", "acked": "positive", "provisional": "positive", "focal": "negative",
                  "pending": "negative"}.get(kind, kind)
        focal = Evidence("lower-right", 30, 40, 11) if kind == "focal" else None
        reason = "only 12 axial slices (need 20)" if kind == "indeterminate" else None
        bus.publish(f"ctriage/{room}/verdict/{k}", verdict(room, k, state, result, created=ago(mins), lead_s=40,
                                                           focal=focal, reason=reason))
        if kind in ("unseen", "acked", "provisional"):  # key image; a provisional positive's boxes only
            bus.publish(f"ctriage/{room}/overlay/{k}", overlay(room, k, state, image=kind != "provisional"))
        if kind == "acked":
            bus.publish(f"ctriage/{room}/ack/{k}", ack_payload(k))


def unseen_layout(page) -> dict:
    """Where the unseen positive tiles are against the queue's visible area, and what the "more" pills say."""
    return page.evaluate("""() => {
        const q = document.querySelector('#queue').getBoundingClientRect();
        const tiles = [...document.querySelectorAll('#queue .tile.flag-positive.unacked')];
        const fully = (r) => r.top >= q.top - 1 && r.bottom <= Math.min(q.bottom, innerHeight) + 1
                             && r.left >= 0 && r.right <= innerWidth + 1;
        const pill = (id) => {
            const el = document.getElementById(id);
            const r = el.getBoundingClientRect();
            return {shown: !el.classList.contains('hidden') && r.height > 0, text: el.textContent,
                    count: Number(el.dataset.count || 0), top: r.top, bottom: r.bottom, right: r.right};
        };
        const rects = tiles.map((t) => [t.dataset.id.split('/')[1], t.getBoundingClientRect()]);
        return {ids: rects.map(([k]) => k),
                inView: rects.filter(([, r]) => fully(r)).map(([k]) => k),
                below: rects.filter(([, r]) => !fully(r) && r.bottom > q.bottom + 1).map(([k]) => k),
                above: rects.filter(([, r]) => !fully(r) && r.top < q.top - 1).map(([k]) => k),
                lowestInView: Math.max(0, ...[...document.querySelectorAll('#queue .tile')]
                    .map((t) => t.getBoundingClientRect()).filter(fully).map((r) => r.bottom)),
                moreBelow: pill('more-below'), moreAbove: pill('more-above'), H: innerHeight};
    }""")


def assert_unseen_shown_or_counted(page) -> dict:
    """Every unseen positive is fully on screen, or counted by a visible, correct "N more positive" pill."""
    lay = unseen_layout(page)
    assert set(lay["inView"]) | set(lay["below"]) | set(lay["above"]) == set(lay["ids"])
    for side, pill in (("below", lay["moreBelow"]), ("above", lay["moreAbove"])):
        n = len(lay[side])
        assert pill["shown"] == (n > 0), (side, lay)
        if n:
            assert pill["count"] == n and f"{n} MORE POSITIVE {side.upper()}" in pill["text"]
            assert 0 <= pill["top"] and pill["bottom"] <= lay["H"] + 0.5  # the pill itself is on screen
    if lay["moreBelow"]["shown"]:
        assert lay["moreBelow"]["top"] >= lay["lowestInView"] - 0.5  # it covers no tile in view
    return lay


def assert_fully_shown(el) -> None:
    """Nothing in the element (and its children) is cut off."""
    cut = el.evaluate("""e => [e, ...e.querySelectorAll('*')].filter(x =>
        x.scrollWidth > x.clientWidth + 1 || x.scrollHeight > x.clientHeight + 1).map(x => x.className)""")
    assert cut == [], cut


def wait_in_view(page, k: str) -> None:
    page.wait_for_function("""k => {
        const t = document.querySelector(`.tile[data-id$="/${k}"]`);
        const q = document.querySelector('#queue').getBoundingClientRect(), r = t.getBoundingClientRect();
        return r.top >= q.top - 1 && r.bottom <= q.bottom + 1;
    }""", arg=k, timeout=3000)


TEN = [  # (name, kind, room, minutes ago): newest last
    ("u1", "unseen", "ct-room-1", 40), ("a1", "acked", "ct-room-2", 35), ("n1", "negative", "ct-room-1", 30),
    ("i1", "indeterminate", "ct-room-3", 25), ("u2", "unseen", "ct-room-2", 20), ("a2", "acked", "ct-room-3", 15),
    ("n2", "focal", "ct-room-2", 12), ("i2", "indeterminate", "ct-room-1", 8), ("u3", "provisional", "ct-room-3", 3),
    ("p1", "pending", "ct-room-1", 1),
]


def test_unseen_positives_are_pinned_first_and_in_view_at_1280x720(browser, display, bus):  # noqa: F811
    from playwright.sync_api import expect

    for room in ("ct-room-1", "ct-room-2", "ct-room-3"):
        bus.publish(f"ctriage/{room}/status", status(room))
    page = open_at(browser, display.url, HD)
    publish_queue(bus, TEN)
    expect(page.locator(".tile")).to_have_count(10)
    expect(page.locator('.tile[data-acked="true"]')).to_have_count(2)
    order = page.locator(".tile").evaluate_all("els => els.map(e => e.dataset.id.split('/')[1])")
    # unseen positives first, the longest-waiting first; then everything else newest first
    assert order == [key(n) for n in ("u1", "u2", "u3", "p1", "i2", "n2", "a2", "i1", "n1", "a1")]
    expect(page.locator("#unseen")).to_have_text("3 POSITIVE NOT YET SEEN")
    lay = assert_unseen_shown_or_counted(page)
    assert lay["inView"] == [key(n) for n in ("u1", "u2", "u3")] and not lay["below"]

    page.wait_for_timeout(1300)  # the arrival highlight has settled
    page.screenshot(path="/tmp/display-1280.png")
    ART.mkdir(parents=True, exist_ok=True)
    shutil.copy("/tmp/display-1280.png", ART / "queue-1280.png")

    # all in view: the banner still steps through them, highlighting each in turn
    for name in ("u1", "u2", "u3", "u1"):
        page.locator("#unseen").click()
        expect(tile(page, key(name))).to_have_class(re.compile(r"\bflash\b"))
        expect(page.locator(".tile.flash")).to_have_count(1)

    # acknowledging one unpins it: it drops back into its place by scan time
    tile(page, key("u2")).locator(".ack").click()
    expect(tile(page, key("u2"))).to_have_attribute("data-acked", "true", timeout=3000)
    order = page.locator(".tile").evaluate_all("els => els.map(e => e.dataset.id.split('/')[1])")
    assert order[:2] == [key("u1"), key("u3")] and order.index(key("u2")) == 6
    expect(page.locator("#unseen")).to_have_text("2 POSITIVE NOT YET SEEN")
    page.close()


def test_more_positives_than_fit_are_counted_and_the_banner_cycles_through_them(browser, display, bus):  # noqa: F811
    from playwright.sync_api import expect

    page = open_at(browser, display.url, HD)
    studies = [(f"u{i}", "unseen", f"ct-room-{i % 3 + 1}", 60 - 5 * i) for i in range(8)]
    studies += [("n1", "negative", "ct-room-1", 4), ("p1", "pending", "ct-room-2", 1)]
    publish_queue(bus, studies)
    expect(page.locator(".tile")).to_have_count(10)
    expect(page.locator("#unseen")).to_have_text("8 POSITIVE NOT YET SEEN")
    lay = assert_unseen_shown_or_counted(page)
    assert len(lay["inView"]) == 6 and lay["below"] == [key("u6"), key("u7")]
    expect(page.locator("#more-below")).to_have_text("▼ 2 MORE POSITIVE BELOW")
    page.screenshot(path=str(ART / "more-below-1280.png"))

    # the banner brings the unseen positives out of view into it, one after another, then starts again at the top
    banner = page.locator("#unseen")
    banner.click()
    wait_in_view(page, key("u6"))
    wait_in_view(page, key("u7"))  # same row
    page.wait_for_timeout(300)  # the scroll has settled
    lay = assert_unseen_shown_or_counted(page)
    assert lay["above"] == [key(f"u{i}") for i in range(3)] and not lay["below"]
    expect(page.locator("#more-above")).to_have_text("▲ 3 MORE POSITIVE ABOVE")
    expect(page.locator("#more-below")).to_be_hidden()
    banner.click()
    wait_in_view(page, key("u0"))
    page.wait_for_timeout(300)
    lay = assert_unseen_shown_or_counted(page)
    assert lay["below"] == [key("u6"), key("u7")]
    page.locator("#more-below").click()  # the pill takes you to the next one below
    wait_in_view(page, key("u6"))
    page.close()


def test_where_line_is_the_rule_finding_in_patient_terms(browser, display, bus):  # noqa: F811
    from playwright.sync_api import expect

    page = open_at(browser, display.url, HD)
    pos, foc, far = key("pos"), key("focal"), key("far")
    bus.publish(f"ctriage/ct-room-2/verdict/{pos}", verdict("ct-room-2", pos, created=ago(3)))  # lower-right run
    ov = overlay("ct-room-2", pos)  # boxes on the key slices in three quadrants: they draw, they do not say where
    ks = ov["key_slices"][0]
    ks["boxes"] += [{"box": [0.2, 0.2, 0.3, 0.3], "quadrant": "upper-left", "score": 0.7},
                    {"box": [0.2, 0.7, 0.3, 0.8], "quadrant": "upper-right", "score": 0.6}]
    ks["quadrants"] = ["upper-left", "upper-right", "lower-right"]
    bus.publish(f"ctriage/ct-room-2/overlay/{pos}", ov)
    bus.publish(f"ctriage/ct-room-1/verdict/{foc}", verdict("ct-room-1", foc, "final", "negative", created=ago(5),
                                                            focal=Evidence("lower-right", 30, 40, 11)))
    far_v = verdict("ct-room-3", far, created=ago(7))  # an absurdly long series: the where-line cannot fit
    far_v["evidence"] = {"quadrant": "lower-left", "first_slice": 123456788, "last_slice": 123456899, "run": 112}
    bus.publish(f"ctriage/ct-room-3/verdict/{far}", far_v)

    for k, text, kind in ((pos, "patient's left posterior, slices 113–132", "evidence"),
                          (foc, "patient's left posterior, slices 31–41", "focal")):
        t = tile(page, k)
        expect(t.locator(".where-text")).to_have_text(text)
        expect(t.locator(".where")).to_have_attribute("title", text)
        lit = t.locator(".quad .q.on")
        expect(lit).to_have_count(1)  # one quadrant: the finding's, not every box's
        expect(lit).to_have_class(re.compile(r"\blr\b"))
        fits = t.locator(".where-text").evaluate("e => e.scrollWidth <= e.clientWidth")
        assert fits, f"{kind} where-line cut off at 1280×720"
    expect(tile(page, foc).locator(".where")).to_have_class(re.compile(r"\bfocal\b"))
    expect(tile(page, foc).locator(".detail")).to_have_text("single focal lesion · 11 slices")
    # a focal lesion the appliance named a mass (the same slices in `others`) reads as one; a mass elsewhere does not
    for name, first, detail in (("mass", 30, "solid mass · 11 slices"),
                                ("elsewhere", 60, "single focal lesion · 11 slices")):
        k = key(name)
        v = verdict("ct-room-1", k, "final", "negative", created=ago(9), focal=Evidence("lower-right", 30, 40, 11))
        v["others"] = [{"kind": "mass", "diameter_mm": 68.2, "first_slice": first, "last_slice": first + 10,
                        "quadrant": "lower-right", "zone": "upper", "mean_hu": 24, "z_mm": 45.0,
                        "text": "solid mass 68 mm, patient's left upper zone — not a COVID-19 pattern"}]
        bus.publish(f"ctriage/ct-room-1/verdict/{k}", v)
        expect(tile(page, k).locator(".detail")).to_have_text(detail)
    expect(tile(page, pos).locator(".detail")).to_have_text("lesion on 20 slices in a row")

    # too long for the tile: ellipsised by CSS (never cut mid-word without one), the whole text on tap
    t = tile(page, far)
    full = "patient's right posterior, slices 123456789–123456900"
    expect(t.locator(".where-text")).to_have_text(full)
    css = t.locator(".where-text").evaluate("""e => ({over: e.scrollWidth > e.clientWidth,
        ellipsis: getComputedStyle(e).textOverflow, ws: getComputedStyle(e).whiteSpace})""")
    assert css == {"over": True, "ellipsis": "ellipsis", "ws": "nowrap"}
    expect(t.locator(".where")).to_have_attribute("title", full)
    t.locator(".where").click()
    expect(t).to_have_class(re.compile(r"\bopen\b"))
    info = t.locator(".info")
    expect(info).to_be_visible()
    expect(info.locator(".info-where")).to_have_text(f"Where: {full}")
    assert_fully_shown(info)
    page.screenshot(path=str(ART / "where-open-1280.png"))
    info.click()  # a second tap folds it
    expect(t).not_to_have_class(re.compile(r"\bopen\b"))
    expect(info).to_be_hidden()
    page.close()


def test_key_image_is_captioned_in_html_and_enlarges_on_tap(browser, display, bus):  # noqa: F811
    from playwright.sync_api import expect

    page = open_at(browser, display.url, FULL_HD)
    k, boxes = key("img"), key("boxes")
    bus.publish(f"ctriage/ct-room-2/verdict/{k}", verdict("ct-room-2", k, created=ago(2)))
    bus.publish(f"ctriage/ct-room-2/overlay/{k}", overlay("ct-room-2", k, "provisional"))
    bus.publish(f"ctriage/ct-room-1/verdict/{boxes}", verdict("ct-room-1", boxes, "provisional", created=ago(4)))
    bus.publish(f"ctriage/ct-room-1/overlay/{boxes}", overlay("ct-room-1", boxes, "provisional", image=False))
    t = tile(page, k)
    img = t.locator("img.key-img")
    expect(img).to_be_visible(timeout=3000)
    expect(t.locator(".key-top")).to_have_text("slice 122 of 180")
    expect(t.locator(".key-state")).to_have_text("PROVISIONAL")  # the image's own state (the verdict is final)
    sizes = t.locator(".key-cap").evaluate_all("els => els.map(e => parseFloat(getComputedStyle(e).fontSize))")
    assert min(sizes) >= 18, sizes  # px at 1920×1080, as large as the tile's other small print
    expect(tile(page, boxes).locator(".key-state")).to_have_text("BOXES ONLY")
    clipped = page.locator(".key-cap").evaluate_all("els => els.filter(e => e.scrollWidth > e.clientWidth + 1).length")
    assert clipped == 0  # the captions fit the tile's key image
    page.wait_for_timeout(1300)  # the arrival highlight has settled
    page.screenshot(path=str(ART / "key-image.png"))

    t.locator(".key").click()
    box = page.locator("#lightbox")
    expect(box).to_be_visible()
    big = page.locator("#lightbox-img")
    page.wait_for_function("el => el.complete && el.naturalWidth === 256", arg=big.element_handle(), timeout=3000)
    assert big.evaluate("e => e.getBoundingClientRect().height") > 700
    expect(page.locator("#lightbox-cap")).to_contain_text("slice 122 of 180")
    page.screenshot(path=str(ART / "lightbox.png"))
    page.keyboard.press("Escape")
    expect(box).to_be_hidden()
    tile(page, boxes).locator(".key").click()  # boxes without an image enlarge too
    expect(box).to_be_visible()
    assert big.get_attribute("src").startswith("data:image/png")
    box.click()
    expect(box).to_be_hidden()
    page.close()


def test_a_corrected_verdict_shows_as_a_correction_and_asks_to_be_seen_again(browser, display, bus):  # noqa: F811
    from playwright.sync_api import expect

    page = open_at(browser, display.url, HD)
    up, down = key("up"), key("down")
    bus.publish(f"ctriage/ct-room-2/verdict/{up}", verdict("ct-room-2", up, "final", "negative", created=ago(9)))
    bus.publish(f"ctriage/ct-room-2/ack/{up}", ack_payload(up))
    bus.publish(f"ctriage/ct-room-1/verdict/{down}", verdict("ct-room-1", down, "final", "positive", created=ago(12)))
    bus.publish(f"ctriage/ct-room-1/ack/{down}", ack_payload(down))
    t = tile(page, up)
    expect(t).to_have_attribute("data-acked", "true")
    expect(page.locator("#unseen")).to_be_hidden()

    bus.publish(f"ctriage/ct-room-2/verdict/{up}", corrected("ct-room-2", up, "positive", "negative"))
    expect(t.locator(".strip-text")).to_have_text("CORRECTED — was NEGATIVE", timeout=3000)
    expect(t).to_have_class(re.compile(r"\bstate-corrected\b.*\bcorrected\b"))
    expect(t.locator(".flag-word")).to_have_text("POSITIVE")
    expect(t).to_have_attribute("data-acked", "false")  # the flag changed: it has to be seen again
    expect(t.locator(".ack")).to_have_text("RESULT CHANGED — tap when seen")
    expect(page.locator("#unseen")).to_have_text("1 POSITIVE NOT YET SEEN")
    assert page.locator(".tile").first.get_attribute("data-id").endswith(up)  # pinned like any unseen positive
    note = t.locator(".corr-note")
    expect(note).to_contain_text(WHAT)
    expect(note).to_have_attribute("title", re.compile(re.escape(WHAT)))
    note.click()
    expect(t).to_have_class(re.compile(r"\bopen\b"))
    expect(t.locator(".info-corr")).to_contain_text("CORRECTED — was NEGATIVE (earlier final ")
    expect(t.locator(".info-corr")).to_contain_text(WHAT)  # the whole text, wrapped
    page.screenshot(path=str(ART / "corrected-open-1280.png"))
    assert_fully_shown(t.locator(".info"))
    strips = page.evaluate("""keys => keys.map(k => getComputedStyle(
        document.querySelector(`.tile[data-id$="/${k}"] .strip`)).backgroundColor)""", [up, down])
    assert strips[0] != strips[1]  # corrected does not look like a plain final

    bus.publish(f"ctriage/ct-room-1/verdict/{down}", corrected("ct-room-1", down, "negative", "positive",
                                                               what="a second series changed the result"))
    d = tile(page, down)
    expect(d.locator(".strip-text")).to_have_text("CORRECTED — was POSITIVE", timeout=3000)
    expect(d.locator(".flag-word")).to_have_text("NEGATIVE")
    expect(d).to_have_attribute("data-acked", "false")
    expect(d.locator(".ack")).to_have_text("RESULT CHANGED — tap when seen")
    assert d.locator(".ack").evaluate("e => e.scrollWidth <= e.clientWidth && e.scrollHeight <= e.clientHeight")
    t.locator(".ack").click()
    expect(t).to_have_attribute("data-acked", "true", timeout=3000)
    expect(page.locator("#unseen")).to_be_hidden()
    page.screenshot(path=str(ART / "corrected-1280.png"))
    page.close()


def test_an_update_of_the_same_result_says_so_and_keeps_its_seen_mark(browser, display, bus):  # noqa: F811
    """Prone images after a positive's final go out as a correction with the same result (appliance.service.verdicts):
    the tile reads FINAL · UPDATED with what the prone images showed, and the flag did not change, so its SEEN mark
    stays."""
    from playwright.sync_api import expect

    from appliance.pipeline.case_logic import PRONE_CLEAR

    page = open_at(browser, display.url, HD)
    k = key("prone")
    bus.publish(f"ctriage/ct-room-2/verdict/{k}", verdict("ct-room-2", k, "final", "positive", created=ago(9)))
    bus.publish(f"ctriage/ct-room-2/ack/{k}", ack_payload(k))
    t = tile(page, k)
    expect(t).to_have_attribute("data-acked", "true")
    what = f"{PRONE_CLEAR} — images taken after the final verdict"
    bus.publish(f"ctriage/ct-room-2/verdict/{k}", corrected("ct-room-2", k, "positive", "positive", what=what))
    expect(t.locator(".strip-text")).to_have_text("FINAL · UPDATED", timeout=3000)
    expect(t.locator(".flag-word")).to_have_text("POSITIVE")
    expect(t.locator(".corr-note")).to_contain_text("prone images: no lesion run")  # the news leads the line
    expect(t).to_have_attribute("data-acked", "true")  # the same flag: seen stays seen
    expect(page.locator("#unseen")).to_be_hidden()
    page.wait_for_timeout(1300)  # the arrival highlight has settled
    ART.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ART / "prone-update-1280.png"))
    # the note fits the tile's facts (beside a where-line the detail line gives way to it)
    assert t.locator(".corr-note").evaluate("e => e.getBoundingClientRect().bottom"
                                            " <= e.parentElement.getBoundingClientRect().bottom + 0.5")
    page.close()
