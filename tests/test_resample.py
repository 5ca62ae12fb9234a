"""A thick series rewritten as a thin one (for `ctriage bench --resample`): positions, pixels, headers, errors."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from appliance.ingest.dicom_reader import read_slice
from appliance.phantom import PhantomSpec, write_phantom
from appliance.resample import ResampleError, resample_series


@pytest.fixture(scope="module")
def thick(tmp_path_factory):
    d = tmp_path_factory.mktemp("thick")
    write_phantom(d, PhantomSpec(slices=6, thickness_mm=5.0, size=128))
    return d


def test_positions_pixels_and_headers(thick, tmp_path):
    n = resample_series(thick, tmp_path, 2.5)
    src = sorted((read_slice(p) for p in thick.glob("*.dcm")), key=lambda s: -s.position)
    out = sorted((read_slice(p) for p in tmp_path.glob("*.dcm")), key=lambda s: -s.position)
    assert n == len(out) == 11  # 25 mm from the first to the last slice, every 2.5 mm
    assert np.allclose(np.diff([s.position for s in out]), -2.5)
    assert out[0].position == pytest.approx(src[0].position) and out[-1].position == pytest.approx(src[-1].position)
    assert len({s.series_uid for s in out}) == 1 and out[0].series_uid != src[0].series_uid
    assert len({s.sop_uid for s in out}) == 11 and not {s.sop_uid for s in out} & {s.sop_uid for s in src}
    assert out[0].thickness == 2.5 and [s.instance for s in out] == list(range(1, 12))
    # a new slice on a source position is that slice; one half-way is the mean of its two neighbours (±1 HU)
    assert np.array_equal(out[2].hu, src[1].hu)
    assert np.abs(out[1].hu - (src[0].hu + src[1].hu) / 2).max() <= 1.0
    assert out[1].study_uid == src[0].study_uid and out[1].manufacturer == src[0].manufacturer


def test_compressed_source_is_written_uncompressed(tmp_path):
    from appliance.jpeg_lossless import JPEG_LOSSLESS_SV1

    src = tmp_path / "src"
    write_phantom(src, PhantomSpec(slices=3, thickness_mm=2.0, size=96), transfer_syntax=JPEG_LOSSLESS_SV1)
    assert resample_series(src, tmp_path / "out", 1.0) == 5
    ds = pydicom.dcmread(sorted((tmp_path / "out").glob("*.dcm"))[0])
    assert not ds.file_meta.TransferSyntaxUID.is_compressed and ds.pixel_array.shape == (96, 96)


def test_unusable_input_gives_a_clear_error(thick, tmp_path):
    with pytest.raises(ResampleError, match="outside 0.1–20 mm"):
        resample_series(thick, tmp_path / "a", 0.0)
    one = tmp_path / "one"
    one.mkdir()
    (one / "x.dcm").write_bytes(next(thick.glob("*.dcm")).read_bytes())
    with pytest.raises(ResampleError, match="a series of 1 slice"):
        resample_series(one, tmp_path / "b", 1.0)
    two = tmp_path / "two"
    two.mkdir()
    for f in sorted(thick.glob("*.dcm"))[:2]:
        ds = pydicom.dcmread(f)
        ds.Rows = ds.Rows * 2  # the header now asks for twice the pixels the file holds
        ds.save_as(two / f.name)
    with pytest.raises(ResampleError, match="pixel data could not be decoded"):
        resample_series(two, tmp_path / "d", 1.0)
    (tmp_path / "empty" / "notes.txt").parent.mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no CT here")
    with pytest.raises(ResampleError, match="no usable CT slices"):
        resample_series(tmp_path / "empty", tmp_path / "c", 1.0)


def test_bench_resample_option(thick, capsys):
    from appliance.cli import main
    from appliance.inference.factory import available_backends

    backend = available_backends()[0]
    assert main(["bench", str(thick), "--resample", "2.5", "--json", "--backend", backend]) == 0
    res = json.loads(capsys.readouterr().out)
    assert "resampled to 2.5 mm: 11 slices" in res["source"] and res["backends"][backend]["slices"] == 11
    assert main(["bench", "--resample", "1.25"]) == 2
    assert "--resample needs PATH" in capsys.readouterr().err
    assert main(["bench", str(thick), "--resample", "50"]) == 2
    assert "outside 0.1–20 mm" in capsys.readouterr().err
