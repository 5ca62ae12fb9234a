"""The stage composition: crop geometry, batching, findings for DICOM and crop images."""
import numpy as np

from appliance.domain import Rect, SliceImage
from appliance.pipeline.analyzer import min_crop


def test_min_crop_grows_small_boxes_about_their_centre_within_the_slice():
    small = Rect(100, 200, 160, 260)  # 60 × 60 px at 0.7 mm = 42 mm
    c = min_crop(small, (512, 512), (0.7, 0.7), 120.0)
    assert (c.height, c.width) == (172, 172)
    assert abs(c.center[0] - small.center[0]) <= 1 and abs(c.center[1] - small.center[1]) <= 1
    edge = min_crop(Rect(0, 0, 40, 40), (512, 512), (0.7, 0.7), 120.0)
    assert edge.y0 == 0 and edge.x0 == 0 and edge.height == 172  # shifted inside, not cut
    big = Rect(100, 50, 400, 460)
    assert min_crop(big, (512, 512), (0.7, 0.7), 120.0) == big
    assert min_crop(small, (512, 512), (0.7, 0.7), 0.0) == small
    tiny_image = min_crop(Rect(10, 10, 20, 20), (50, 60), (3.0, 3.0), 300.0)
    assert (tiny_image.height, tiny_image.width) == (50, 60)


def test_findings_keep_order_and_geometry(analyzer, phantom_dir):
    from appliance.analyze import analyze_series, read_headers
    from appliance.ingest.series import group_series

    ser = group_series(read_headers(sorted(phantom_dir.glob("*.dcm")), 10.0)[0])[0]
    kept, found, bad, _ = analyze_series(ser, analyzer, 10.0)
    assert not bad and [s.key for s in kept] == [f.key for f in found]
    for f in found:
        if f.lung is not None:
            r = f.prob_rect
            assert r.height >= f.lung.height and r.width >= f.lung.width
            for b in f.boxes:  # every box lies in the region the model saw
                assert r.y0 <= b.rect.y0 and b.rect.y1 <= r.y1 + 1 and r.x0 <= b.rect.x0 and b.rect.x1 <= r.x1 + 1


def test_crop_images_use_the_whole_image(analyzer):
    img = np.full((200, 300), 0.3, np.float32)
    s = SliceImage(key="a.png", series_uid="f", study_uid="f", position=0.0, window01=img)
    (f,) = analyzer.findings([s])
    assert f.lung == Rect(0, 0, 200, 300) and f.crop is None and f.timings_ms["valid_area"] < 0.5
