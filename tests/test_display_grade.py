"""Triage display: the viral-pneumonia-pattern grade and the solid nodules or masses of ctriage.verdict/2, in the
pure state and in a real browser (Chromium + Playwright + mosquitto, as in test_display.py) at 1280×720.

The screenshot of a 10-study queue with them goes to /tmp/display-grade-1280.png (and test-artifacts/display/).
"""
from __future__ import annotations

import re
import shutil

import pytest

from appliance.display.screen_state import DisplayState, Validators
from appliance.display.views import grade_view, others_view, short_reason
from appliance.domain import Evidence

from .display_helpers import validators_over
from .test_display import ART, ago, assert_nothing_clipped, browser, bus, display, tile  # noqa: F401 - fixtures
from .test_display_queue import HD, ack_payload, assert_fully_shown, key, open_at
from .test_display_server import DEV, KEY, T0, at, enc, iso, overlay, status, verdict

SHOT = "/tmp/display-grade-1280.png"
ZONE_ORDER = ["right upper", "left upper", "right middle", "left middle", "right lower", "left lower"]


def grade(category: str = "typical", severity: int = 7, zones: dict[str, float] | None = None,
          reasons: list[str] | None = None) -> dict:
    """A grade as appliance.pipeline.grading.Grade.to_dict() writes it."""
    zones = zones or {"right upper": 4.0, "right middle": 18.5, "right lower": 41.0, "left upper": 0.0,
                      "left middle": 9.0, "left lower": 27.0}
    reasons = reasons or {
        "typical": ["bilateral", "peripheral 72 %", "ground glass 86 %", "multifocal (8 foci)"],
        "atypical": ["unilateral (right)", "central 70 %", "consolidation 81 %", "single focus", "solid nodule"],
        "indeterminate": ["bilateral", "peripheral and central (52 % peripheral)", "ground glass 64 %",
                          "multifocal (3 foci)"],
    }[category]
    return {"category": category, "reasons": reasons, "severity": severity,
            "regions": {"RUL": 1, "RML": 2, "RLL": 3, "LUL": 2, "LLL": 3},
            "extent": {"right": 21.2, "left": 12.4, "total": 16.9}, "zones": zones, "lesion_ml": 412.5,
            "ground_glass_pct": 86.0, "peripheral_pct": 72.0}


MASS = {"kind": "mass", "diameter_mm": 32.4, "first_slice": 40, "last_slice": 61, "quadrant": "upper-left",
        "zone": "upper", "mean_hu": 38, "z_mm": -82.5,
        "text": "solid mass 32 mm, patient's right upper zone — not a COVID-19 pattern"}
NODULE = {"kind": "nodule", "diameter_mm": 14.0, "first_slice": 90, "last_slice": 96, "quadrant": "lower-right",
          "zone": "lower", "mean_hu": 21, "z_mm": -190.0,
          "text": "solid nodule 14 mm, patient's left lower zone — not a COVID-19 pattern"}


def v2(room: str, k: str, state: str = "final", result: str = "positive", *, minutes: float = 0.0,
       grade_: dict | None = None, others: list[dict] | None = None, **kw) -> dict:
    """A ctriage.verdict/2 payload with a grade and/or solid lesions."""
    p = verdict(room, k, state, result, created=ago(minutes), lead_s=40, **kw)
    p["schema"] = "ctriage.verdict/2"
    p["grade"] = grade_
    p["others"] = others or []
    return p


# ---- the state (pure) ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def old_validators(tmp_path_factory) -> Validators:
    """The validators over a verdict schema file that knows nothing of grade and others yet."""
    def older(v: dict) -> None:
        v["properties"].pop("grade", None)
        v["properties"].pop("others", None)

    return validators_over(tmp_path_factory.mktemp("schemas"), older)


def test_grade_and_others_pass_whatever_the_schema_file_says(validators, old_validators):
    good = v2(DEV, KEY, grade_=grade(), others=[MASS, NODULE])
    for val in (validators, old_validators):
        assert val.problem("verdict", good) is None
        assert val.problem("verdict", verdict(DEV, KEY)) is None  # without the new fields (older appliances)
        old = verdict(DEV, KEY)
        del old["grade"], old["others"]
        assert val.problem("verdict", {**old, "schema": "ctriage.verdict/1"}) is None
        bad = v2(DEV, KEY, grade_=grade())
        bad["grade"]["category"] = "confirmed"
        assert val.problem("verdict", bad) is not None
        bad = v2(DEV, KEY, grade_=grade(severity=26))
        assert val.problem("verdict", bad) is not None
        bad = v2(DEV, KEY, others=[{**MASS, "kind": "tumour"}])
        assert val.problem("verdict", bad) is not None
        assert val.problem("verdict", {**good, "others": "a mass"}) is not None


def test_the_view_gives_the_grade_and_the_zone_cells_in_drawing_order(validators):
    st = DisplayState(validators=validators)
    p = {**v2(DEV, KEY, grade_=grade(), others=[MASS]), "created": iso(T0)}
    s = st.handle(f"ctriage/{DEV}/verdict/{KEY}", enc(p), now=T0)[-1][1]
    g = s["grade"]
    assert (g["category"], g["words"], g["severity"]) == ("typical", "typical pattern", 7)
    assert g["reasons"] == ["bilateral", "peripheral 72 %", "ground glass 86 %", "multifocal (8 foci)"]
    assert g["short"] == ["bilateral", "peripheral", "ground glass", "multifocal"]
    assert [f"{z['side']} {z['level']}" for z in g["zones"]] == ZONE_ORDER  # rows; patient's right first
    assert [z["pct"] for z in g["zones"]] == [4.0, 0.0, 18.5, 9.0, 41.0, 27.0]
    assert g["extent"] == {"right": 21.2, "left": 12.4, "total": 16.9}
    assert s["others"] == [{"kind": "mass", "diameter_mm": 32.4, "zone": "upper", "text": MASS["text"],
                            "where": "patient's right anterior, slices 41–62"}]
    plain = st.handle(f"ctriage/{DEV}/verdict/{KEY}", enc(verdict(DEV, KEY, created=at(1))), now=T0)[-1][1]
    assert plain["grade"] is None and plain["others"] == []


def test_views_take_what_older_or_partial_payloads_have():
    assert grade_view({}) is None and grade_view({"grade": None}) is None and others_view({}) == []
    g = grade_view({"grade": {"category": "atypical", "reasons": ["solid mass"]}})
    assert g["severity"] is None and all(z["pct"] is None for z in g["zones"]) and g["short"] == ["solid mass"]
    o = others_view({"others": [{"kind": "nodule", "diameter_mm": 9.6, "quadrant": "lower-right", "zone": "lower",
                                 "text": ""}]})
    assert o[0]["text"] == "solid nodule 10 mm, patient's left lower zone — not a COVID-19 pattern"
    assert o[0]["where"] == "patient's left posterior"
    assert short_reason("unilateral (right)") == "unilateral"
    assert short_reason("peripheral and central (52 % peripheral)") == "peripheral and central"
    assert short_reason("consolidation 81 %") == "consolidation"
    # the prone-images advice (appliance.pipeline.grading) reads "posterior" on the tile, whole on tap
    from appliance.pipeline.grading import DEPENDENT_ADVICE
    assert short_reason(f"posterior 82 % ({DEPENDENT_ADVICE})") == "posterior"
    # a positive whose boxes were mostly left out as texture (appliance.pipeline.case_logic.texture_note)
    from appliance.pipeline.case_logic import texture_note
    assert short_reason(texture_note(776, 84)) == "mostly on normal lung"
    # a positive only on noisy series beside a smoother negative one (appliance.pipeline.case_logic.noise_note)
    from appliance.domain import SeriesVerdict
    from appliance.pipeline.case_logic import NOISY_ONLY, SeriesSummary, noise_note

    def series(result: str, noise: float, noisy: bool) -> SeriesSummary:
        return SeriesSummary("k", SeriesVerdict(result, "final", None, 30, 30, 0, acquisition={  # type: ignore[arg-type]
            "noise": noise, "noisy": noisy}, patient_position="HFS"))
    assert short_reason(noise_note([series("positive", 0.034, True), series("negative", 0.005, False)])) == NOISY_ONLY


# ---- in the browser ------------------------------------------------------------------------------------------------

def luminance(css: str) -> float:
    """Relative luminance of a computed colour over the tile's panel (#171c24), for the shading order."""
    nums = [float(x) for x in re.findall(r"[\d.]+", css)]
    r, g, b = nums[:3]
    a = nums[3] if len(nums) > 3 else 1.0
    panel = (0x17, 0x1C, 0x24)
    rgb = [a * c + (1 - a) * p for c, p in zip((r, g, b), panel)]
    lin = [(c / 255 / 12.92) if c / 255 <= 0.04045 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


GRADE_CLIPPED = """() => [...document.querySelectorAll('.tile')].flatMap(t =>
    [...t.querySelectorAll('.grade-cat, .grade-why, .others-text, .others-more, .extent, .sev, .body')]
      .filter(e => e.offsetParent !== null)
      .filter(e => e.scrollWidth > e.clientWidth + 1 || e.scrollHeight > e.clientHeight + 1)
      .map(e => t.dataset.id + ' ' + e.className))"""


def assert_no_grade_text_clipped(page) -> None:
    """The existing check (flag, strip, facts, where-line, captions, button) and the grade's and others' lines."""
    assert_nothing_clipped(page)
    clipped = page.evaluate(GRADE_CLIPPED)
    assert clipped == [], f"grade text does not fit: {clipped}"


def zone_cells(t) -> list[dict]:
    """The zone figure's cells as drawn: zone, % (data), fill luminance, centre."""
    cells = t.locator(".extent .z").evaluate_all("""els => els.map(e => {
        const r = e.getBoundingClientRect();
        return {zone: e.dataset.zone, pct: e.dataset.pct, fill: getComputedStyle(e).backgroundColor,
                x: r.left + r.width / 2, y: r.top + r.height / 2, w: r.width, h: r.height};
    })""")
    for c in cells:
        c["lum"] = luminance(c["fill"])
    return cells


def publish_ten(bus) -> dict[str, str]:  # noqa: F811 - the fixture
    """Ten studies: the new fields on some, none on the others. Returns name → study key."""
    k = {n: key(n) for n in ("typ", "atyp", "plain", "negmass", "indet", "neg", "focal", "ind", "pend", "prov")}
    rooms = ("ct-room-1", "ct-room-2", "ct-room-3")
    for room in rooms:
        bus.publish(f"ctriage/{room}/status", status(room))
    pubs = [  # (name, room, payload, overlay?, acked?)
        ("typ", "ct-room-1", v2("ct-room-1", k["typ"], minutes=30, grade_=grade()), True, False),
        ("atyp", "ct-room-2", v2("ct-room-2", k["atyp"], minutes=25, others=[NODULE, MASS],
                                 grade_=grade("atypical", 5, {"right upper": 2.0, "right middle": 31.0,
                                                              "right lower": 12.0, "left upper": 0.0,
                                                              "left middle": 0.0, "left lower": 0.0})), True, False),
        ("plain", "ct-room-3", verdict("ct-room-3", k["plain"], created=ago(20), lead_s=40), True, False),
        ("neg", "ct-room-1", v2("ct-room-1", k["neg"], "final", "negative", minutes=40), False, False),
        ("ind", "ct-room-2", v2("ct-room-2", k["ind"], "final", "indeterminate", minutes=35,
                                reason="only 12 axial slices (need 20)"), False, False),
        ("focal", "ct-room-3", v2("ct-room-3", k["focal"], "final", "negative", minutes=18,
                                  focal=Evidence("lower-right", 30, 40, 11)), False, False),
        ("indet", "ct-room-3", v2("ct-room-3", k["indet"], minutes=10, grade_=grade("indeterminate", 11)), True, True),
        ("negmass", "ct-room-1", v2("ct-room-1", k["negmass"], "final", "negative", minutes=6, others=[MASS],
                                    reason="lesion seen around " + MASS["text"]), False, False),
        ("prov", "ct-room-2", v2("ct-room-2", k["prov"], "provisional", "positive", minutes=3,
                                 grade_=grade(severity=3)), False, True),
        ("pend", "ct-room-1", v2("ct-room-1", k["pend"], "provisional", "negative", minutes=1), False, False),
    ]
    for name, room, payload, ov, acked in pubs:
        bus.publish(f"ctriage/{room}/verdict/{k[name]}", payload)
        if ov:
            bus.publish(f"ctriage/{room}/overlay/{k[name]}", overlay(room, k[name]))
        if acked:
            bus.publish(f"ctriage/{room}/ack/{k[name]}", ack_payload(k[name]))
    return k


def test_grade_and_solid_lesions_on_the_tiles_at_1280x720(browser, display, bus):  # noqa: F811
    from playwright.sync_api import expect

    page = open_at(browser, display.url, HD)
    k = publish_ten(bus)
    expect(page.locator(".tile")).to_have_count(10)
    expect(page.locator('.tile[data-acked="true"]')).to_have_count(2)
    order = page.locator(".tile").evaluate_all("els => els.map(e => e.dataset.id.split('/')[1])")
    # unseen positives first, as before; then the rest newest first
    assert order[:6] == [k[n] for n in ("typ", "atyp", "plain", "pend", "prov", "negmass")]
    page.wait_for_timeout(1300)  # the arrival highlight has settled
    page.screenshot(path=SHOT)
    ART.mkdir(parents=True, exist_ok=True)
    shutil.copy(SHOT, ART / "grade-1280.png")
    text = page.locator("#queue").inner_text()
    assert "confirmed" not in text.lower()

    # a typical positive: the pattern wording, its category and reasons, severity and the zone figure
    t = tile(page, k["typ"])
    expect(t).to_have_class(re.compile(r"^(?=.*\bflag-positive\b)(?=.*\bgraded\b)"))
    expect(t.locator(".flag-word")).to_have_text("POSITIVE")
    expect(t.locator(".flag-action")).to_have_text("COVID-19 pattern — isolate pending PCR")
    expect(t.locator(".grade-cat")).to_have_text("typical pattern")
    expect(t.locator(".grade-why")).to_have_text("bilateral, peripheral, ground glass, multifocal")
    expect(t.locator(".sev-num")).to_have_text("7/25")
    expect(t.locator(".sev-label")).to_have_text("severity")
    expect(t.locator(".detail")).to_have_text("16.9 % of lung")
    expect(t.locator(".where")).to_be_hidden()  # the zone figure says where; the rule's run is on tap
    cells = zone_cells(t)
    assert [c["zone"] for c in cells] == ZONE_ORDER
    by = {c["zone"]: c for c in cells}
    for level in ("upper", "middle", "lower"):  # patient's right on the image left, as on the quadrant icon
        assert by[f"right {level}"]["x"] < by[f"left {level}"]["x"]
        assert abs(by[f"right {level}"]["y"] - by[f"left {level}"]["y"]) < 1
    assert by["right upper"]["y"] < by["right middle"]["y"] < by["right lower"]["y"]
    assert min(min(c["w"], c["h"]) for c in cells) >= 12  # px at 1280×720: a figure, not a speck
    pcts = {z: p for z, p in grade()["zones"].items()}
    assert {c["zone"]: float(c["pct"]) for c in cells} == pcts
    ranked = sorted(cells, key=lambda c: pcts[c["zone"]])
    assert [c["zone"] for c in sorted(cells, key=lambda c: c["lum"])] == [c["zone"] for c in ranked]
    assert all(a["lum"] < b["lum"] for a, b in zip(ranked, ranked[1:]))  # more involved: lighter, strictly
    assert by["left upper"]["fill"] == "rgb(38, 45, 56)"  # 0 %: unfilled
    sides = t.locator(".zones .side").evaluate_all("els => els.map(e => [e.textContent, "
                                                    "e.getBoundingClientRect().left])")
    assert [s for s, _ in sorted(sides, key=lambda x: x[1])] == ["R", "L"]
    expect(t.locator(".extent")).to_have_attribute("title", re.compile(r"patient's right lower 41 %"))

    # an atypical positive: still a positive to isolate, amber with the reason, for a radiologist
    a = tile(page, k["atyp"])
    expect(a).to_have_class(re.compile(r"^(?=.*\bflag-positive\b)(?=.*\bgrade-atypical\b)"))
    expect(a.locator(".flag-action")).to_have_text("COVID-19 pattern — isolate pending PCR")
    expect(a.locator(".grade-cat")).to_have_text("atypical pattern — radiologist to read")
    expect(a.locator(".grade-why")).to_have_text("unilateral, central, consolidation, single focus, solid nodule")
    expect(a.locator(".sev-num")).to_have_text("5/25")
    colours = a.evaluate("""t => ({pill: getComputedStyle(t.querySelector('.grade-cat')).backgroundColor,
        why: getComputedStyle(t.querySelector('.grade-why')).color,
        flag: getComputedStyle(t.querySelector('.flag')).backgroundColor,
        typical: getComputedStyle(document.querySelector('.tile.graded:not(.grade-atypical) .grade-cat'))
                 .backgroundColor})""")
    assert colours["pill"] == colours["why"] == "rgb(255, 194, 10)"
    assert colours["flag"] == "rgb(230, 0, 126)" and colours["typical"] != colours["pill"]
    # ... with the solid lesions that explained runs: the first named, the rest counted, all on tap
    expect(a.locator(".others-text")).to_have_text("⚠ " + NODULE["text"])
    expect(a.locator(".others-more")).to_have_text("+1 more")
    assert a.locator(".others").evaluate("e => getComputedStyle(e).color") == "rgb(255, 194, 10)"

    # a negative whose runs a mass explained says so
    n = tile(page, k["negmass"])
    expect(n.locator(".flag-word")).to_have_text("NEGATIVE")
    expect(n.locator(".flag-action")).to_have_text("radiologist to read")
    expect(n.locator(".others-text")).to_have_text("⚠ " + MASS["text"])
    expect(n.locator(".others-more")).to_be_hidden()
    expect(n.locator(".detail")).to_have_text("lesion explained by a solid mass")
    expect(n.locator(".key-none")).to_have_text("No key image")  # not "No lesion found"
    expect(n.locator(".extent")).to_be_hidden()  # a negative is not graded on the tile

    # a payload without the new fields renders as before
    p = tile(page, k["plain"])
    expect(p).not_to_have_class(re.compile(r"\b(graded|has-others)\b"))
    expect(p.locator(".flag-action")).to_have_text("ISOLATE NOW")
    expect(p.locator(".where-text")).to_have_text("patient's left posterior, slices 113–132")
    expect(p.locator(".detail")).to_have_text("lesion on 20 slices in a row")
    expect(p.locator(".model")).to_have_text("model valid-area 1.0.0 · lesion 1.2.0")
    expect(p.locator(".key-top")).to_have_text("slice 122 of 180")
    for sel in (".grade", ".extent", ".others"):
        expect(p.locator(sel)).to_be_hidden()
    expect(tile(page, k["focal"]).locator(".where-text")).to_have_text("patient's left posterior, slices 31–41")
    expect(tile(page, k["indet"]).locator(".grade-cat")).to_have_text("indeterminate pattern")
    expect(tile(page, k["prov"]).locator(".strip")).to_contain_text("PROVISIONAL")
    assert_no_grade_text_clipped(page)

    # the whole list on tap (the tile's detail panel), with the grade whole and the rule's run
    a.locator(".others").click()
    expect(a).to_have_class(re.compile(r"\bopen\b"))
    info = a.locator(".info")
    expect(info.locator(".info-grade")).to_have_text(
        "Atypical pattern · severity 5/25 · 16.9 % of lung (right 21.2 %, left 12.4 %): unilateral (right), "
        "central 70 %, consolidation 81 %, single focus, solid nodule")
    expect(info.locator(".info-others")).to_have_text([f"Not counted: {NODULE['text']} (slices 91–97)",
                                                       f"Not counted: {MASS['text']} (slices 41–62)"])
    expect(info.locator(".info-where")).to_have_text("Where: patient's left posterior, slices 113–132")
    # the tile hides its model line for room: every verdict's model versions are still one tap away
    expect(a.locator(".model")).to_be_hidden()
    expect(info.locator(".info-hint")).to_have_text("model valid-area 1.0.0 · lesion 1.2.0 · tap to close")
    assert_fully_shown(info)
    page.screenshot(path=str(ART / "grade-open-1280.png"))
    info.click()
    expect(info).to_be_hidden()
    n.locator(".others").click()
    expect(n.locator(".info .info-others")).to_have_text(f"Not counted: {MASS['text']} (slices 41–62)")
    expect(n.locator(".info .info-hint")).to_have_text("model valid-area 1.0.0 · lesion 1.2.0 · tap to close")
    assert_fully_shown(n.locator(".info"))
    n.locator(".info").click()

    page.set_viewport_size({"width": 1920, "height": 1080})  # the clinic's big screen: the same, larger
    page.wait_for_timeout(300)
    assert_no_grade_text_clipped(page)
    page.screenshot(path=str(ART / "grade-1920.png"))
    for w, h in ((1680, 1050), (1280, 800), (1280, 1024)):  # 16:10, 5:4: taller tiles must not widen the key image
        page.set_viewport_size({"width": w, "height": h})
        page.wait_for_timeout(300)
        assert_no_grade_text_clipped(page)
        page.screenshot(path=str(ART / f"grade-{w}x{h}.png"))
    page.close()


def test_solid_lesions_beside_a_where_line_still_fit(browser, display, bus):  # noqa: F811
    """A positive without a grade but with a solid lesion, and a focal negative with three: where-line and the
    amber line both, nothing cut."""
    from playwright.sync_api import expect

    page = open_at(browser, display.url, HD)
    pos, foc = key("pos-others"), key("focal-others")
    bus.publish(f"ctriage/ct-room-1/verdict/{pos}", v2("ct-room-1", pos, minutes=4, others=[NODULE]))
    bus.publish(f"ctriage/ct-room-1/overlay/{pos}", overlay("ct-room-1", pos))
    bus.publish(f"ctriage/ct-room-2/verdict/{foc}", v2("ct-room-2", foc, "final", "negative", minutes=6,
                                                       others=[MASS, NODULE, NODULE],
                                                       focal=Evidence("upper-left", 11, 20, 10)))
    t, f = tile(page, pos), tile(page, foc)
    expect(t.locator(".flag-action")).to_have_text("ISOLATE NOW")  # no grade: the words of today
    expect(t.locator(".where-text")).to_have_text("patient's left posterior, slices 113–132")
    expect(t.locator(".others-text")).to_have_text("⚠ " + NODULE["text"])
    expect(f.locator(".where-text")).to_have_text("patient's right anterior, slices 12–21")
    expect(f.locator(".others-more")).to_have_text("+2 more")
    for x in (t, f):  # the detail line gives way to the where-line (its run again) and the amber line
        expect(x.locator(".detail")).to_be_hidden()
    page.wait_for_timeout(1300)
    assert_no_grade_text_clipped(page)
    page.screenshot(path=str(ART / "others-where-1280.png"))
    page.close()


# ---- a noisy scan (ctriage.verdict/2 `acquisition`) ------------------------------------------------------------------

NOISY_SCAN = {"noise": 0.0205, "noisy": True, "limit": 0.016, "smoothed_slices": 49, "slices_measured": 49}


def test_a_noisy_scan_is_worded_and_a_clean_one_says_nothing(validators, old_validators):
    from appliance.display.views import acquisition_view

    noisy = v2(DEV, KEY, grade_=grade())
    noisy["acquisition"] = NOISY_SCAN
    for val in (validators, old_validators):  # a screen whose schema file predates the field takes it too
        assert val.problem("verdict", noisy) is None
        assert val.problem("verdict", {**noisy, "acquisition": {"noisy": "yes"}}) is not None
    a = acquisition_view(noisy)
    assert a["text"] == ("Noisy scan (noise 0.021, validated up to 0.016): lesion boxes are less reliable — "
                         "read with care; 49 slices smoothed before analysis")
    assert acquisition_view({**noisy, "acquisition": {**NOISY_SCAN, "noisy": False}}) is None
    assert acquisition_view({**noisy, "acquisition": None}) is None and acquisition_view(verdict(DEV, KEY)) is None
    assert acquisition_view({"acquisition": {"noisy": True}})["text"].startswith("Noisy scan: lesion boxes")


def test_a_noisy_scan_is_marked_on_the_tile_and_explained_on_tap(browser, display, bus):  # noqa: F811
    from playwright.sync_api import expect

    page = open_at(browser, display.url, HD)
    pos, neg, clean = key("noisy-pos"), key("noisy-neg"), key("clean-neg")
    p = v2("ct-room-1", pos, minutes=3, grade_=grade())
    p["acquisition"] = NOISY_SCAN
    n = v2("ct-room-2", neg, "final", "negative", minutes=5)
    n["acquisition"] = {**NOISY_SCAN, "smoothed_slices": 0}
    c = v2("ct-room-3", clean, "final", "negative", minutes=6)
    c["acquisition"] = {**NOISY_SCAN, "noise": 0.008, "noisy": False, "smoothed_slices": 0}
    prov = key("noisy-prov")
    pv = v2("ct-room-3", prov, "provisional", "positive", minutes=1, grade_=grade(severity=3))
    pv["acquisition"] = NOISY_SCAN  # the longest strip text beside the mark
    for room, k_, payload in (("ct-room-1", pos, p), ("ct-room-2", neg, n), ("ct-room-3", clean, c),
                              ("ct-room-3", prov, pv)):
        bus.publish(f"ctriage/{room}/verdict/{k_}", payload)
    bus.publish(f"ctriage/ct-room-1/overlay/{pos}", overlay("ct-room-1", pos))
    tp, tn, tc = tile(page, pos), tile(page, neg), tile(page, clean)
    for t_ in (tp, tn, tile(page, prov)):
        expect(t_.locator(".strip-noisy")).to_have_text("⚠ NOISY")
        assert t_.locator(".strip-noisy").evaluate("e => getComputedStyle(e).color") == "rgb(255, 194, 10)"
    expect(tc.locator(".strip-noisy")).to_be_hidden()
    expect(tp.locator(".detail")).to_have_text("16.9 % of lung")  # the rest of the tile as before
    page.screenshot(path=str(ART / "noisy-1280.png"))
    assert_no_grade_text_clipped(page)
    tp.locator(".strip-noisy").click()
    expect(tp.locator(".info .info-acquisition")).to_have_text(
        "Noisy scan (noise 0.021, validated up to 0.016): lesion boxes are less reliable — read with care; "
        "49 slices smoothed before analysis")
    assert tp.locator(".info .info-acquisition").evaluate("e => getComputedStyle(e).color") == "rgb(255, 194, 10)"
    assert_fully_shown(tp.locator(".info"))
    page.screenshot(path=str(ART / "noisy-open-1280.png"))
    page.close()


# ---- a positive whose boxes were mostly left out as texture (appliance.pipeline.case_logic.texture_note) ----------

def test_a_positive_mostly_on_normal_density_lung_says_so_on_the_tile_and_whole_on_tap(browser, display, bus):  # noqa: F811
    from playwright.sync_api import expect

    from appliance.pipeline.case_logic import texture_note

    page = open_at(browser, display.url, HD)
    k_ = key("texture-pos")
    reasons = [texture_note(776, 84), "bilateral", "peripheral and central (41 % peripheral)", "ground glass 97 %",
               "multifocal (4 foci)"]  # as decide() writes them: the caution first
    p = v2("ct-room-1", k_, minutes=2, grade_=grade("indeterminate", severity=5, reasons=reasons))
    p["acquisition"] = {"noise": 0.007, "noisy": False, "limit": 0.016, "smoothed_slices": 0,
                        "slices_measured": 103, "flat_boxes": 776}
    bus.publish(f"ctriage/ct-room-1/verdict/{k_}", p)
    bus.publish(f"ctriage/ct-room-1/overlay/{k_}", overlay("ct-room-1", k_))
    t = tile(page, k_)
    why = t.locator(".grade-why")
    expect(why).to_have_text("mostly on normal lung, bilateral, peripheral and central, ground glass, multifocal")
    expect(t.locator(".strip-noisy")).to_be_hidden()  # not a noisy scan: the count alone adds no mark
    page.screenshot(path=str(ART / "texture-1280.png"))
    assert_nothing_clipped(page)  # flag, strip, facts, button; the reason line is cut at the tile's width ...
    shown = why.evaluate("e => e.offsetWidth / e.scrollWidth")  # ... and the caution, first, is within what shows
    assert shown * len("mostly on normal lung, bilateral, peripheral and central, ground glass, multifocal") > len(
        "mostly on normal lung, ")
    t.locator(".grade-why").click()
    expect(t.locator(".info .info-grade")).to_contain_text(
        "mostly on normal lung (776 of 860 lesion boxes left out as no denser than the lung: emphysema or noise "
        "texture — read with care)")
    assert_fully_shown(t.locator(".info"))
    page.screenshot(path=str(ART / "texture-open-1280.png"))
    page.close()


# ---- a positive only on noisy series beside a smoother negative one (appliance.pipeline.case_logic.noise_note) ---

def test_a_positive_only_on_the_noisy_series_says_so_first_on_the_tile(browser, display, bus):  # noqa: F811
    from playwright.sync_api import expect

    from appliance.domain import SeriesVerdict
    from appliance.pipeline.case_logic import SeriesSummary, noise_note

    def series(result: str, noise: float, noisy: bool) -> SeriesSummary:
        return SeriesSummary("k", SeriesVerdict(result, "final", None, 112, 104, 0, acquisition={  # type: ignore[arg-type]
            "noise": noise, "noisy": noisy}, patient_position="HFS"))

    note = noise_note([series("positive", 0.034, True), series("negative", 0.005, False)])
    page = open_at(browser, display.url, HD)
    k_ = key("noisy-only")
    reasons = [note, "bilateral", "peripheral and central (54 % peripheral)", "ground glass 51 %",
               "multifocal (7 foci)"]  # as study_verdict writes them: the caution first
    p = v2("ct-room-1", k_, minutes=2, grade_=grade("indeterminate", severity=12, reasons=reasons))
    p["acquisition"] = {**NOISY_SCAN, "noise": 0.034, "smoothed_slices": 104, "slices_measured": 104}
    bus.publish(f"ctriage/ct-room-1/verdict/{k_}", p)
    bus.publish(f"ctriage/ct-room-1/overlay/{k_}", overlay("ct-room-1", k_))
    t = tile(page, k_)
    why = t.locator(".grade-why")
    line = "only the noisy series is positive, bilateral, peripheral and central, ground glass, multifocal"
    expect(why).to_have_text(line)
    expect(t.locator(".strip-noisy")).to_have_text("⚠ NOISY")
    page.screenshot(path=str(ART / "noisy-only-1280.png"))
    assert_nothing_clipped(page)
    shown = why.evaluate("e => e.offsetWidth / e.scrollWidth")  # the caution, first, is within what shows
    assert shown * len(line) > len("only the noisy series is positive, ")
    why.click()
    expect(t.locator(".info .info-grade")).to_contain_text(
        "only the noisy series is positive (the study's smoother series, noise 0.005, is negative: the boxes may be "
        "noise — read with care)")
    page.screenshot(path=str(ART / "noisy-only-open-1280.png"))
    # a grade's detail with a noisy-scan note is more than the panel holds: the grade, with the caution, shows whole
    # at the top, and the panel scrolls to the rest (the where-line last)
    info = t.locator(".info")
    fit = info.evaluate("""e => { const g = e.querySelector('.info-grade');
        return {grade: g.offsetTop + g.offsetHeight, view: e.clientHeight, all: e.scrollHeight,
                scrolls: getComputedStyle(e).overflowY}; }""")
    assert fit["grade"] <= fit["view"] + 1 and fit["scrolls"] == "auto", fit
    info.evaluate("e => { e.scrollTop = e.scrollHeight; }")
    last = info.evaluate("e => { const l = e.lastElementChild; return l.offsetTop + l.offsetHeight - e.scrollTop <= "
                         "e.clientHeight + 1; }")
    assert last, "the panel scrolls to its last line"
    page.screenshot(path=str(ART / "noisy-only-open-scrolled-1280.png"))
    page.close()
