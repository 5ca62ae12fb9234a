"""appliance.inference.deferred: a lesion bundle in two graphs gives the same boxes whether or not its second graph
runs where no box can be made; the full map when asked for it."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="onnx is in the `test` and `train` extras, not installed here")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from appliance.inference.deferred import DeferredAdapter  # noqa: E402
from appliance.inference.onnxruntime_adapter import OnnxRuntimeAdapter  # noqa: E402
from models.ensemble import compose, split_deferred  # noqa: E402

W = 16


def _member(shift: float, tilt: float):
    """prob = sigmoid(8 · (image − shift) + tilt · column): bright pixels score high, asymmetric left to right."""
    col = (np.arange(W, dtype=np.float32) / W * tilt).reshape(1, 1, 1, W)
    inits = [numpy_helper.from_array(np.array(shift, np.float32), "shift"),
             numpy_helper.from_array(np.array(8.0, np.float32), "gain"), numpy_helper.from_array(col, "col")]
    nodes = [helper.make_node("Sub", ["image", "shift"], ["d"]), helper.make_node("Mul", ["d", "gain"], ["g"]),
             helper.make_node("Add", ["g", "col"], ["z"]), helper.make_node("Sigmoid", ["z"], ["prob"])]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 12, W])],
                          [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["n", 1, 12, W])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def graphs(tmp_path):
    members = [_member(0.6, 1.5), _member(0.5, -1.0)]
    first, second, ceiling = split_deferred(members, [True, False], 0)
    paths = []
    for name, m in (("whole", compose(members, [True, False])), ("first", first), ("second", second)):
        paths.append(tmp_path / f"{name}.onnx")
        onnx.save(m, str(paths[-1]))
    whole, a, b = (OnnxRuntimeAdapter(p, "fp32", threads=1) for p in paths)
    return whole, a, b, ceiling


@pytest.fixture
def batch():
    x = np.zeros((4, 1, 12, W), np.float32)  # slice 0 empty: no pixel can reach 0.5
    x[1, 0, 3:7, 2:6] = 1.0  # a bright patch: boxes
    x[2, 0, 5:8, 9:14] = 0.55  # a faint patch near the bound: must run the second graph
    x[3] = np.random.default_rng(0).random((1, 12, W)) * 0.3
    return x


def test_full_map_is_both_graphs(graphs, batch):
    whole, a, b, ceiling = graphs
    ad = DeferredAdapter(a, b, ceiling)
    np.testing.assert_allclose(ad.infer(batch), whole.infer(batch), atol=1e-6)
    assert ad.backend == "onnxruntime" and ad.precision == "fp32" and ad.streams == 1


def test_second_graph_skipped_only_where_no_pixel_can_reach_min_score(graphs, batch):
    whole, a, b, ceiling = graphs
    ad = DeferredAdapter(a, b, ceiling)
    full = whole.infer(batch)
    for min_score in (0.5, 0.3, 0.7):
        got = ad.infer_for_boxes(batch, min_score)
        first = a.infer(batch)
        ran = first.reshape(4, -1).max(1) + ceiling >= min_score
        assert ((got >= min_score) == (full >= min_score)).all()  # every box-making pixel as in the full map
        np.testing.assert_allclose(got[ran], full[ran], atol=1e-6)
        np.testing.assert_allclose(got[~ran], first[~ran], atol=1e-6)
        if min_score == 0.5:
            assert ran.tolist() == [False, True, True, False]  # the empty and the dim slice skip it
    assert ad.slices == 12 and 0 < ad.deferred_runs < 12


def test_second_graph_clipped_to_the_ceiling(graphs, batch):
    whole, a, b, _ = graphs
    tight = DeferredAdapter(a, b, 0.05)  # a manifest ceiling below the graph's real range: clipped, bound holds
    assert (tight.infer(batch) - a.infer(batch)).max() <= 0.05 + 1e-6
    with pytest.raises(ValueError, match="ceiling"):
        DeferredAdapter(a, b, 0.0)
