"""appliance.publish.key_slices: slices with lesion best first, the slice of the finding a verdict names first."""
from appliance.domain import Box, Evidence, Rect, SeriesVerdict, SliceFinding
from appliance.publish.key_slices import key_slices, largest_box_slice, lead_run


def slice_(i: int, *boxes: tuple[Rect, float, str]) -> SliceFinding:
    return SliceFinding(f"s{i}", -5.0 * i, (512, 512), Rect(0, 0, 512, 512),
                        [Box(r, r.height * r.width, score, q) for r, score, q in boxes])


MASS = Rect(300, 330, 370, 400)
PATCH = Rect(100, 80, 130, 110)


def series() -> list[SliceFinding]:
    """A mass on slices 2–6 (largest on 4, scores 0.8–0.9) and a small brighter patch on slices 9–10 (0.99)."""
    fs = [slice_(i) for i in range(12)]
    for i, grow in zip(range(2, 7), (0, 6, 12, 6, 0)):
        fs[i] = slice_(i, (Rect(MASS.y0 - grow, MASS.x0, MASS.y1 + grow, MASS.x1), 0.8 + i / 100, "lower-right"))
    fs[9] = slice_(9, (PATCH, 0.99, "upper-left"))
    fs[10] = slice_(10, (PATCH, 0.97, "upper-left"))
    return fs


def test_best_first_without_a_lead_and_the_named_finding_first_with_one():
    fs = series()
    assert [k["index"] for k in key_slices(fs)] == [9, 10, 6, 5, 4, 3, 2]
    focal = Evidence(quadrant="lower-right", first_slice=2, last_slice=6, run=5)  # type: ignore[arg-type]
    ks = key_slices(fs, lead=focal)
    assert [k["index"] for k in ks] == [4, 9, 10, 6, 5, 3, 2], "the mass' largest section leads, the rest best first"
    assert ks[0]["boxes"][0]["quadrant"] == "lower-right" and len(key_slices(fs, limit=2, lead=focal)) == 2
    assert largest_box_slice(fs, 2, 6, "upper-left") == 4, "no box in that quadrant: the middle slice"
    assert largest_box_slice(fs, 0, 11, None) == 4


def test_lead_run_reads_a_verdict_or_its_payload():
    ev = Evidence(quadrant="upper-left", first_slice=9, last_slice=10, run=2)  # type: ignore[arg-type]
    focal = Evidence(quadrant="lower-right", first_slice=2, last_slice=6, run=5)  # type: ignore[arg-type]
    assert lead_run(SeriesVerdict("positive", "final", ev, 12, 12, 7, focal=None)) == ev
    assert lead_run(SeriesVerdict("negative", "final", None, 12, 12, 7, focal=focal)) == focal
    assert lead_run({"evidence": None, "focal": focal.as_dict()}) == focal
    assert lead_run({"evidence": None, "focal": None}) is None
    assert lead_run(SeriesVerdict("negative", "final", None, 12, 12, 0)) is None
