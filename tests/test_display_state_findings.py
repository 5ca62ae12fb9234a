"""Triage display state (pure): corrected verdicts and the where-line from the case rule's finding."""
from __future__ import annotations

import datetime as dt

import pytest

from appliance.display.screen_state import Validators, flag_of, iso, where_text
from appliance.domain import Evidence

from .display_helpers import validators_over
from .test_display_server import DEV, KEY, T0, at, enc, overlay, verdict

TOPIC = f"ctriage/{DEV}/verdict/{KEY}"
WHAT = "late slices changed the result from negative to positive"


def corrected(result: str = "positive", was: str = "negative", *, created: dt.datetime | None = None) -> dict:
    p = verdict(DEV, KEY, "final", result, created=created or at(60))
    p["state"] = "corrected"
    p["correction"] = {"previous_result": was, "previous_state": "final", "previous_created": iso(T0), "what": WHAT}
    return p


@pytest.fixture(scope="module")
def v1_validators(tmp_path_factory) -> Validators:
    """The validators over a verdict schema that knows nothing of corrections (ctriage.verdict/1)."""
    def v1(v: dict) -> None:
        v["properties"]["schema"] = {"const": "ctriage.verdict/1"}
        v["properties"]["state"] = {"enum": ["provisional", "final"]}
        v["properties"].pop("correction", None)

    return validators_over(tmp_path_factory.mktemp("schemas"), v1)


@pytest.mark.parametrize("result,flag", [("positive", "positive"), ("negative", "negative"),
                                         ("indeterminate", "indeterminate")])
def test_a_corrected_verdict_flags_like_a_final_one(result, flag):
    assert flag_of(corrected(result, "negative" if result != "negative" else "positive")) == flag


def test_corrected_verdicts_pass_the_displays_checks_whatever_the_schema_file_says(validators, v1_validators):
    for v in (validators, v1_validators):
        assert v.problem("verdict", corrected()) is None
        assert v.problem("verdict", {**corrected(), "schema": "ctriage.verdict/1"}) is None
        assert v.problem("verdict", verdict(DEV, KEY)) is None
        missing = corrected()
        del missing["correction"]
        assert v.problem("verdict", missing) == "correction: required with state corrected"
        bad = corrected()
        bad["correction"]["previous_result"] = "maybe"
        assert v.problem("verdict", bad) is not None
        assert v.problem("verdict", {**corrected(), "state": "revised"}) is not None
        ov = overlay(DEV, KEY, "final")
        ov["state"] = "corrected"
        assert v.problem("overlay", ov) is None


def test_a_correction_that_changes_the_flag_asks_to_be_seen_again(st):
    st.handle(TOPIC, enc(verdict(DEV, KEY, "final", "negative", created=T0)), now=T0)
    ack = {"schema": "ctriage.ack/1", "study_key": KEY, "seen_by": "nurse-station", "created": iso(at(10))}
    assert st.handle(f"ctriage/{DEV}/ack/{KEY}", enc(ack), now=T0)[-1][1]["acked"]
    s = st.handle(TOPIC, enc(corrected(created=at(60))), now=T0)[-1][1]
    assert (s["flag"], s["state"], s["acked"]) == ("positive", "corrected", False)
    assert s["correction"] == {"previous_result": "negative", "previous_state": "final",
                               "previous_created": iso(T0), "what": WHAT}
    # the same series' provisional never replaces its correction; an older final arriving late neither
    assert st.handle(TOPIC, enc(verdict(DEV, KEY, "provisional", "negative", created=at(70))), now=T0) == []
    assert st.handle(TOPIC, enc(verdict(DEV, KEY, "final", "negative", created=at(30))), now=T0) == []
    ack["created"] = iso(at(80))
    assert st.handle(f"ctriage/{DEV}/ack/{KEY}", enc(ack), now=T0)[-1][1]["acked"]
    assert st.snapshot()["studies"][0]["flag"] == "positive"


def test_a_plain_final_has_no_correction(st):
    s = st.handle(TOPIC, enc(verdict(DEV, KEY, created=T0)), now=T0)[-1][1]
    assert s["correction"] is None and s["state"] == "final"


def test_the_where_line_is_the_rule_finding_not_every_box(st):
    st.handle(TOPIC, enc(verdict(DEV, KEY, created=T0)), now=T0)  # evidence: lower-right, slices 112..131 (0-based)
    ov = overlay(DEV, KEY)
    ov["key_slices"][0]["boxes"].append({"box": [0.1, 0.1, 0.2, 0.2], "quadrant": "upper-left", "score": 0.5})
    ov["key_slices"][0]["quadrants"] = ["upper-left", "lower-right"]
    ov["key_slices"].append({"index": 40, "quadrants": ["upper-right"],
                             "boxes": [{"box": [0.1, 0.6, 0.2, 0.7], "quadrant": "upper-right", "score": 0.4}]})
    s = st.handle(f"ctriage/{DEV}/overlay/{KEY}", enc(ov), now=T0)[-1][1]
    assert s["where"] == "patient's left posterior, slices 113–132"
    assert s["finding"] == {"kind": "evidence", "quadrant": "lower-right", "first_slice": 112, "last_slice": 131,
                            "run": 20}
    assert (s["quadrants"], s["anatomy"]) == (["lower-right"], ["left posterior"])
    assert {b["quadrant"] for b in s["boxes"]} == {"lower-right", "upper-left"}  # boxes still drawn
    assert (s["key_slice"], s["key_of"], s["key_state"]) == (121, 180, "final")


def test_a_negative_naming_a_focal_lesion_says_where_it_is(st):
    v = verdict(DEV, KEY, "final", "negative", created=T0, focal=Evidence("upper-left", 11, 20, 10), reason="focus")
    s = st.handle(TOPIC, enc(v), now=T0)[-1][1]
    assert s["finding"]["kind"] == "focal" and s["where"] == "patient's right anterior, slices 12–21"
    assert s["quadrants"] == ["upper-left"]
    plain = st.handle(TOPIC, enc(verdict(DEV, KEY, "final", "negative", created=at(5))), now=T0)[-1][1]
    assert (plain["finding"], plain["where"], plain["quadrants"]) == (None, None, [])


def test_where_text_reads_one_based_slices():
    f = {"quadrant": "lower-left", "first_slice": 0, "last_slice": 0, "run": 1}
    assert where_text(f) == "patient's right posterior, slice 1"
    assert where_text({**f, "quadrant": "upper-right", "last_slice": 5}) == "patient's left anterior, slices 1–6"
