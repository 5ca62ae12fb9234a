"""Both runtimes, real committed models: same outputs (within quantization tolerance), honest device strings."""
from __future__ import annotations

import numpy as np
import pytest

from appliance.inference.adapter import AdapterError
from appliance.inference.factory import available_backends, create_adapter
from appliance.inference.bundle import default_bundle_dir, find_bundles

BUNDLES = find_bundles(default_bundle_dir())
needs_both = pytest.mark.skipif(set(available_backends()) != {"openvino", "onnxruntime"},
                                reason="needs both OpenVINO and ONNX Runtime installed")


@pytest.fixture(scope="module", params=sorted(BUNDLES))
def bundle(request):
    return BUNDLES[request.param]


def test_shipped_bundles_present_and_hashes_hold():
    assert {"valid-area", "lesion"} <= set(BUNDLES)
    for b in BUNDLES.values():
        b.verify_files()
        assert len(b.sha256) == 64


@needs_both
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_backends_agree(bundle, precision):
    x = np.load(bundle.path / "selftest.npz")["inputs"]
    ov = bundle.adapter("openvino", precision, threads=1).infer(x)
    ort = bundle.adapter("onnxruntime", precision, threads=1).infer(x)
    assert ov.shape == ort.shape == x.shape
    if precision == "fp32":
        assert float(np.abs(ov - ort).max()) < 1e-3
    agree = float(((ov >= 0.5) == (ort >= 0.5)).mean())
    assert agree > 0.99


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_selftest_passes_and_device_is_reported(bundle, backend, precision):
    ad = bundle.adapter(backend, precision, threads=1)
    stats = bundle.selftest(ad)
    assert stats["mask_agreement"] >= 0.99
    d = ad.describe()
    assert d["backend"] == backend and d["precision"] == precision
    assert "CPU" in d["device"] or "GPU" in d["device"] or "Tensorrt" in d["device"]


def test_batch_of_one_equals_batch_of_many(bundle):
    x = np.load(bundle.path / "selftest.npz")["inputs"]
    ad = bundle.adapter("auto", "fp32", threads=1)
    many = ad.infer(x)
    one = np.concatenate([ad.infer(x[i:i + 1]) for i in range(len(x))])
    assert float(np.abs(many - one).max()) < 1e-4


def test_unknown_backend_and_missing_model_are_clear_errors(bundle, tmp_path):
    with pytest.raises(AdapterError, match="unknown backend"):
        create_adapter("tensorflow", bundle.model_files())
    files = dict(bundle.model_files())
    files["onnx"] = tmp_path / "missing.onnx"
    for be in available_backends():
        with pytest.raises(AdapterError, match="could not load"):
            create_adapter(be, files, precision="fp32")


@pytest.mark.parametrize("backend", available_backends())
def test_int8_close_to_fp32_on_fixed_inputs(bundle, backend):
    """The quantized model gives the FP32 model's masks on the golden inputs (mask Dice per input)."""
    x = np.load(bundle.path / "selftest.npz")["inputs"]
    f = bundle.adapter(backend, "fp32", threads=1).infer(x) >= 0.5
    q = bundle.adapter(backend, "int8", threads=1).infer(x) >= 0.5
    dices = []
    for a, b in zip(f, q):
        s = a.sum() + b.sum()
        dices.append(1.0 if s == 0 else 2 * np.logical_and(a, b).sum() / s)
    assert float(np.mean(dices)) >= 0.9, dices


@pytest.mark.parametrize("backend", available_backends())
def test_streams_serve_concurrent_callers_with_the_same_outputs(bundle, backend):
    from concurrent.futures import ThreadPoolExecutor

    x = np.load(bundle.path / "selftest.npz")["inputs"]
    one = bundle.adapter(backend, "int8", threads=2, streams=1)
    two = bundle.adapter(backend, "int8", threads=2, streams=2)
    assert (one.streams, two.streams) == (1, 2) and "2 streams" in two.describe()["device"]
    want = one.infer(x)
    parts = [x[i:i + 1] for i in range(len(x))] * 3
    with ThreadPoolExecutor(4) as pool:  # more callers than streams: they queue for a free one
        got = list(pool.map(two.infer, parts))
    for i, g in enumerate(got):
        assert float(np.abs(g - want[i % len(x)][None]).max()) < 1e-4
