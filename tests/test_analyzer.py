"""The stage composition: crop geometry, batching, findings for DICOM and crop images."""
from pathlib import Path

import numpy as np
import pytest

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
    from appliance.oneshot import analyze_files

    (a,) = analyze_files(sorted(phantom_dir.glob("*.dcm")), analyzer, 10.0).series
    kept, found = a.kept, a.findings
    assert not a.rejected and [s.key for s in kept] == [f.key for f in found]
    for f in found:
        if f.lung is not None:
            r = f.prob_rect
            assert r.height >= f.lung.height and r.width >= f.lung.width
            for b in f.boxes:  # every box lies in the region the model saw
                assert r.y0 <= b.rect.y0 and b.rect.y1 <= r.y1 + 1 and r.x0 <= b.rect.x0 and b.rect.x1 <= r.x1 + 1


def test_analyze_files_overlaps_the_header_pass_and_matches_the_two_pass_analysis(analyzer, phantom_dir, tmp_path,
                                                                                monkeypatch):
    import random
    import shutil

    import appliance.oneshot as an
    from appliance.oneshot import analyze_files
    from appliance.ingest.dicom_reader import read_slice
    from appliance.phantom import PhantomSpec, write_phantom

    # two series in one folder, their files interleaved in no particular order, plus a duplicate copy
    other = write_phantom(tmp_path / "b", PhantomSpec(slices=9, seed=3, lesion_side="left"))
    files = sorted(phantom_dir.glob("*.dcm")) + other
    random.Random(0).shuffle(files)
    dup = tmp_path / "copy.dcm"
    shutil.copy(files[5], dup)
    files.append(dup)

    expected: dict[str, dict] = {}  # reference: every distinct file read whole and analysed on its own
    for f in files[:-1]:
        s = read_slice(f, 10.0)
        (found,) = analyzer.findings([s])
        expected.setdefault(s.series_uid, {})[found.key] = (found.lung, [(b.rect, b.quadrant) for b in found.boxes])

    events = []
    read, batch = an.read_slice, analyzer.batch
    monkeypatch.setattr(an, "read_slice", lambda *a, **k: events.append("header") or read(*a, **k))
    monkeypatch.setattr(analyzer, "batch", lambda *a, **k: events.append("batch") or batch(*a, **k))
    counted = []
    done = analyze_files(files, analyzer, 10.0, progress=counted.append)

    assert sum(counted) == len(files) and done.duplicates == 1 and not done.rejected
    last_header = len(events) - 1 - events[::-1].index("header")
    assert events.index("batch") < last_header  # the analysis began before the last header was read
    assert {a.series.uid for a in done.series} == set(expected)
    for a in done.series:
        assert not a.rejected and len(a.kept) == len(a.findings) == len(a.series.slices) == len(expected[a.series.uid])
        got = {f.key: (f.lung, [(b.rect, b.quadrant) for b in f.boxes]) for f in a.findings}
        assert got == expected[a.series.uid]
        assert all(s.source is None and s.hu is None for s in a.kept)  # headers and pixels released
    assert sum(bool(v[1]) for e in expected.values() for v in e.values()) > 0  # lesions found: a real check


def test_analyze_files_routes_decode_failures_to_their_series(analyzer, phantom_dir, tmp_path, monkeypatch):
    import shutil

    import appliance.oneshot as an
    from appliance.oneshot import analyze_files

    for f in sorted(phantom_dir.glob("*.dcm"))[:6]:
        shutil.copy(f, tmp_path / f.name)
    files = sorted(tmp_path.glob("*.dcm"))
    victim = files[2]
    read = an.read_slice

    def read_then_vanish(path, *a, **k):  # the file goes away after its header was read, before its pixels
        s = read(path, *a, **k)
        if Path(path) == victim:
            victim.unlink()
        return s

    monkeypatch.setattr(an, "read_slice", read_then_vanish)
    done = analyze_files(files, analyzer, 10.0)
    (a,) = done.series
    assert not done.rejected and len(a.kept) == 5 and victim.name not in {Path(s.key).name for s in a.kept}
    assert a.rejected == [{"file": str(victim), "reason": a.rejected[0]["reason"]}]  # no UID leaks into reports
    assert a.rejected[0]["reason"].startswith("cannot read file")


def test_crop_images_use_the_whole_image(analyzer):
    img = np.full((200, 300), 0.3, np.float32)
    s = SliceImage(key="a.png", series_uid="f", study_uid="f", position=0.0, window01=img)
    (f,) = analyzer.findings([s])
    assert f.lung == Rect(0, 0, 200, 300) and f.crop is None and f.timings_ms["valid_area"] < 0.5


def test_ordered_map_keeps_input_order_and_bounds_work_in_flight():
    import threading
    import time

    from appliance.pipeline.analyzer import ordered_map

    running, peak, lock = [0], [0], threading.Lock()

    def slow(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02 if i % 3 == 0 else 0.001)  # later items finish first
        with lock:
            running[0] -= 1
        return i * i

    assert list(ordered_map(slow, range(20), 3)) == [i * i for i in range(20)]
    assert 2 <= peak[0] <= 3
    assert list(ordered_map(slow, range(5), 1)) == [0, 1, 4, 9, 16]
    with pytest.raises(ZeroDivisionError):  # a failing batch fails the call, as it does with one worker
        list(ordered_map(lambda i: 1 // (i - 4), range(8), 2))


def test_two_workers_give_the_findings_of_one(phantom_dir):
    from appliance.oneshot import analyze_files
    from appliance.config import AnalysisConfig
    from appliance.pipeline.analyzer import Analyzer

    def run(workers: int):
        a = Analyzer.load(AnalysisConfig(backend="auto", threads=2, workers=workers, batch=4))
        (res,) = analyze_files(sorted(phantom_dir.glob("*.dcm")), a, 10.0).series
        return a, (res.kept, res.findings)

    a1, (kept1, f1) = run(1)
    a2, (kept2, f2) = run(2)
    assert (a1.workers, a2.workers) == (1, 2)
    assert [s.key for s in kept2] == [f.key for f in f2] == [s.key for s in kept1]
    assert sum(bool(f.boxes) for f in f1) > 0  # the phantom has lesions: the comparison means something
    for x, y in zip(f1, f2):
        assert x.lung == y.lung and [(b.rect, b.quadrant) for b in x.boxes] == [(b.rect, b.quadrant) for b in y.boxes]
        assert abs(x.max_prob - y.max_prob) < 1e-4
    # a batch smaller than workers × batch is split so that every worker gets a share
    assert [len(c) for c in a2.chunks(list(range(8)))] == [4, 4]
    assert [len(c) for c in a2.chunks(list(range(3)))] == [2, 1]
    assert [len(c) for c in a1.chunks(list(range(9)))] == [4, 4, 1]


def test_lung_region_is_the_dilated_hole_filled_lung():
    from scipy import ndimage as ndi

    from appliance.pipeline.valid_area import LungArea

    lung = np.zeros((96, 96), bool)
    lung[20:70, 10:40] = True
    lung[40:45, 20:25] = False  # a hole (a vessel the model left out)
    a = LungArea(Rect(0, 0, 512, 512), lung, (0, 0), 512 / 96, dilate=3)
    assert "region" not in a.__dict__  # not computed until a lesion needs placing
    want = ndi.binary_fill_holes(ndi.binary_dilation(lung, iterations=3))
    assert a.contains(42 * a.scale, 22 * a.scale) and a.contains(18 * a.scale, 25 * a.scale)  # hole, margin
    assert not a.contains(42 * a.scale, 60 * a.scale) and not a.contains(-5, 10)
    assert np.array_equal(a.region, want)


def test_stage_timings_are_ms_per_slice_and_add_up_to_no_more_than_the_batch(analyzer, phantom_dir):
    import time

    from appliance.ingest.dicom_reader import read_slice

    files = sorted(phantom_dir.glob("*.dcm"))
    mid = len(files) // 2
    slices = [read_slice(f, 10.0) for f in files[mid - 2: mid + 2]]
    t0 = time.perf_counter()
    found = analyzer.batch(slices)
    wall_ms = (time.perf_counter() - t0) * 1000.0 / len(slices)
    assert any(f.noise is not None for f in found)  # the noise stage ran on these lung slices
    for f in found:
        assert set(f.timings_ms) >= {"valid_area", "lesion_pre", "lesion_infer", "boxes"}
        assert all(v >= 0.0 for v in f.timings_ms.values())
        assert sum(f.timings_ms.values()) <= wall_ms * 1.05 + 0.5, (f.timings_ms, wall_ms)


def test_a_lung_slice_without_enough_parenchyma_for_a_noise_figure_still_analyses(analyzer, phantom_dir):
    from appliance.ingest.dicom_reader import read_slice
    from appliance.pipeline.noise import crop_noise

    files = sorted(phantom_dir.glob("*.dcm"))
    s = read_slice(files[len(files) // 2], 10.0)
    flat = SliceImage(key="flat", series_uid=s.series_uid, study_uid=s.study_uid, position=s.position + 1,
                      hu=np.where(s.hu < -400, -650.0, s.hu).astype(np.float32), pixel_spacing=s.pixel_spacing)
    found = analyzer.batch([s, flat])  # the slice with no noise figure last: it sets no divisor
    assert crop_noise(np.full((224, 224), 0.9, np.float32)) is None
    assert found[0].noise is not None and found[1].lung is not None and found[1].noise is None  # uniform: no figure
    assert all(0.0 <= v < 60_000.0 for f in found for v in f.timings_ms.values())


def test_boxes_are_the_full_maps_where_a_deferred_graph_is_skipped(analyzer, phantom_dir):
    """A lesion bundle in two graphs (appliance/inference/deferred.py): the verdict path skips the second graph where
    no box can be made; every finding the verdict reads is the full map's."""
    from appliance.ingest.dicom_reader import read_slice
    from appliance.inference.deferred import DeferredAdapter

    ad = analyzer.lesion.adapter
    if not isinstance(ad, DeferredAdapter):
        pytest.skip(f"the shipped lesion bundle {analyzer.lesion.bundle.version} is one graph")
    slices = [read_slice(p) for p in sorted(phantom_dir.glob("*.dcm"))]
    runs0, seen0 = ad.deferred_runs, ad.slices
    quick = analyzer.findings(slices)
    full = analyzer.findings(slices, keep_prob=True)
    assert ad.slices - seen0 == sum(f.lung is not None for f in quick)
    assert 0 < ad.deferred_runs - runs0 < ad.slices - seen0  # skipped on some slices, run on the others
    assert any(f.boxes for f in full)
    for q, f in zip(quick, full):
        where = lambda fi: [(b.rect, b.area_512, b.quadrant) for b in fi.boxes]  # noqa: E731
        assert where(q) == where(f)
        assert [b.score for b in q.boxes] == pytest.approx([b.score for b in f.boxes], abs=1e-6)
        assert q.measures == f.measures and q.solids == f.solids and q.cores == f.cores
    v_quick, _ = analyzer.verdict(slices, quick)
    v_full, _ = analyzer.verdict(slices, full)
    assert v_quick == v_full
