import numpy as np

from appliance.domain import SliceImage
from appliance.ingest.series import Series, group_series, links, median_spacing


def sl(pos, series="1.2.3", inst=None, sop=None):
    return SliceImage(key=f"f{pos}-{sop}", series_uid=series, study_uid="9", position=pos, instance=inst, sop_uid=sop)


def test_order_is_by_position_not_instance_number():
    # instance numbers deliberately reversed / scrambled
    s = group_series([sl(-10.0, inst=1, sop="a"), sl(0.0, inst=3, sop="b"), sl(-5.0, inst=2, sop="c")])[0]
    assert s.positions == [0.0, -5.0, -10.0]


def test_grouping_by_series_uid_keeps_first_seen_order():
    out = group_series([sl(0, "B", sop="1"), sl(0, "A", sop="2"), sl(1, "B", sop="3")])
    assert [x.uid for x in out] == ["B", "A"] and len(out[0].slices) == 2


def test_duplicate_sop_instance_ignored():
    s = Series("x", "y")
    assert s.add(sl(0.0, sop="same"))
    assert not s.add(sl(0.0, sop="same"))
    assert s.duplicates == 1 and len(s.slices) == 1


def test_gaps_and_spacing():
    pos = [0, -2.5, -5, -7.5, -12.5, -15]
    s = group_series([sl(float(p), sop=str(p)) for p in pos])[0]
    assert s.spacing == 2.5
    assert s.gaps == 1
    assert links(np.array(pos, float)).tolist() == [True, True, True, False, True]


def test_median_spacing_degenerate():
    assert median_spacing([1.0]) == 0.0
    assert median_spacing([]) == 0.0
    assert links([3.0, 3.0, 3.0]).all()  # coincident positions do not count as gaps
