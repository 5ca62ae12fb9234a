"""models.graph: the exact rewrite of bilinear ×2 upsampling, and the shipped bundles that carry it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="onnx is in the `test` and `train` extras, not installed here")
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from models.graph import FILTER_SUFFIX, exact_filter_weights, filter_upsampling, is_bilinear_x2  # noqa: E402


def _resize_model(c: int, scales=(1.0, 1.0, 2.0, 2.0), mode="linear", ctm="half_pixel", conv_after=False):
    """image (N, c, H, W) → Resize [→ 3×3 conv] → out; H and W dynamic."""
    nodes = [helper.make_node("Resize", ["image", "", "scales"], ["up"], name="/up/Resize", mode=mode,
                              coordinate_transformation_mode=ctm)]
    inits = [numpy_helper.from_array(np.array(scales, np.float32), "scales")]
    out_c = c
    if conv_after:
        rng = np.random.default_rng(1)
        inits.append(numpy_helper.from_array(rng.normal(size=(4, c, 3, 3)).astype(np.float32), "w"))
        nodes.append(helper.make_node("Conv", ["up", "w"], ["out"], name="/x/Conv", pads=[1, 1, 1, 1]))
        out_c = 4
    else:
        nodes[0].output[0] = "out"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", c, "h", "w"])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", out_c, None, None])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"image": x})[0]


@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (1, 8, 16, 16), (1, 1, 1, 1)])
def test_bilinear_x2_becomes_nearest_pad_and_filter_with_the_same_outputs(shape):
    model = _resize_model(shape[1])
    new, n = filter_upsampling(model)
    assert n == 1
    ops = [(nd.op_type, {a.name: helper.get_attribute_value(a) for a in nd.attribute}.get("mode"))
           for nd in new.graph.node]
    assert ops == [("Resize", b"nearest"), ("Pad", b"edge"), ("Conv", None)]
    assert new.graph.node[-1].name.endswith(FILTER_SUFFIX)
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32) * 10
    a, b = _run(model, x), _run(new, x)
    assert a.shape == b.shape == shape[:2] + (2 * shape[2], 2 * shape[3])
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, float(np.abs(a).max()))  # borders included
    # the original model is left as it was
    assert [nd.op_type for nd in model.graph.node] == ["Resize"]


@pytest.mark.parametrize("kw", [dict(mode="nearest"), dict(scales=(1.0, 1.0, 3.0, 3.0)),
                                dict(ctm="align_corners"), dict(scales=(1.0, 2.0, 2.0, 2.0))])
def test_other_resizes_are_left_alone(kw):
    new, n = filter_upsampling(_resize_model(4, **kw))
    assert n == 0 and [nd.op_type for nd in new.graph.node] == ["Resize"]


def test_quantized_filter_gets_exact_weights(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(2)
    fp32, _ = filter_upsampling(_resize_model(4, conv_after=True))
    onnx.save(fp32, str(tmp_path / "f.onnx"))
    calib = [rng.random((1, 4, 8, 8), np.float32) for _ in range(8)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"image": x}

    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert exact_filter_weights(q) == 1
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    producer = {o: nd for nd in q.graph.node for o in nd.output}
    filt = next(nd for nd in q.graph.node if nd.name.endswith(FILTER_SUFFIX))
    dq = producer[filt.input[1]]
    w = inits[dq.input[0]].astype(np.float32) * inits[dq.input[1]].reshape(-1, 1, 1, 1)
    ref = np.tile(np.outer([1, 2, 1], [1, 2, 1])[None, None] / 16.0, (4, 1, 1, 1))
    assert np.array_equal(w, ref)  # INT8 filters exactly as FP32 (scale 1/64 is a power of two)
    other = next(nd for nd in q.graph.node if nd.op_type == "Conv" and nd is not filt)
    assert not np.all(inits[producer[other.input[1]].input[1]] == 1 / 64)  # the network's own weights untouched
    x = rng.random((1, 4, 8, 8), np.float32)
    assert np.abs(_run(q, x) - _run(fp32, x)).max() < 0.1 * np.abs(_run(fp32, x)).max()


def interpolate_modes(xml: Path) -> list[str]:
    import xml.etree.ElementTree as ET

    return [layer.find("data").get("mode") for layer in ET.parse(xml).getroot().iter("layer")
            if layer.get("type") == "Interpolate"]


def test_shipped_openvino_models_upsample_by_nearest_and_filter():
    """The shipped OpenVINO IRs carry the rewrite (no FP32 bilinear Interpolate); the ONNX models keep the network's
    own bilinear Resize, and their FP32 outputs are still those the self-test was made with."""
    from appliance.inference.bundle import default_bundle_dir, find_bundles

    for name, b in find_bundles(default_bundle_dir()).items():
        st = np.load(b.path / "selftest.npz")
        out = 0.0  # a bundle in two graphs: the self-test's full map is their sum
        for g in b.spec.graphs():
            modes = interpolate_modes(b.path / g["openvino_int8"])
            assert modes and set(modes) == {"nearest"}, (name, modes)
            for f in (g["onnx"], g["onnx_int8"]):
                m = onnx.load(str(b.path / f))
                resize = [nd for nd in m.graph.node if nd.op_type == "Resize"]
                assert len(resize) == len(modes) and all(is_bilinear_x2(m, nd) for nd in resize), (name, f)
            sess = ort.InferenceSession(str(b.path / g["onnx"]), providers=["CPUExecutionProvider"])
            out = out + sess.run(None, {"image": st["inputs"].astype(np.float32)})[0]
        assert np.abs(out - st["expected_fp32"]).max() < 1e-4, name
