"""models.ensemble: several lesion networks (and mirrored views) as one graph, quantized member by member."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="onnx is in the `test` and `train` extras, not installed here")
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from models.ensemble import (PREFIX, TTA, compose, extract_member, keep_groups, member_onnx,  # noqa: E402
                             mirrored_view, split_deferred)

W = 16


def _member(seed: int, width: int = W, convs: int = 3):
    """image [N,1,H,width] → `convs` 3×3 convolutions → sigmoid → prob; asymmetric weights (a mirror changes it)."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "image"
    for i in range(convs):
        cin, cout = (1 if i == 0 else 4), (1 if i == convs - 1 else 4)
        inits.append(numpy_helper.from_array(rng.normal(size=(cout, cin, 3, 3)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"/c{i}/Conv", pads=[1, 1, 1, 1]))
        x = f"c{i}"
        if i < convs - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"/r{i}/Relu"))
            x = f"r{i}"
    nodes.append(helper.make_node("Sigmoid", [x], ["prob"], name="/sig"))
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 12, width])],
                          [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["n", 1, 12, width])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"image": x})[0]


@pytest.fixture
def x():
    return np.random.default_rng(0).random((3, 1, 12, W)).astype(np.float32)


def test_the_composed_graph_is_the_mean_of_its_members_and_their_mirrored_views(x):
    a, b = _member(1), _member(2)
    pa, pb = _run(a, x), _run(b, x)
    pa_mirror = _run(a, x[..., ::-1].copy())[..., ::-1]
    assert np.abs(pa - pa_mirror).max() > 1e-3  # the member is not mirror-symmetric: the test can tell
    got = _run(compose([a, b], flip=[True, False]), x)
    want = ((pa + pa_mirror) / 2 + pb) / 2
    assert got.shape == x.shape
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(_run(compose([a, b], flip=False), x), (pa + pb) / 2, atol=1e-6)
    np.testing.assert_allclose(_run(compose([b], flip=False), x), pb, atol=1e-6)


def test_a_member_taken_out_of_an_ensemble_is_that_member_and_recomposes_in_any_view(x):
    """BUNDLE#I: a shipped member re-used without its training run — the same map alone, and composed anew (here
    with the mirrored view it did not have, so the batch it sees doubles) the same as composing the original."""
    a, b = _member(1), _member(2)
    ens = compose([a, b], flip=[True, False])
    for i, m in enumerate((a, b)):
        got = extract_member(ens, i)
        assert [v.name for v in got.graph.input] == ["image"] and [v.name for v in got.graph.output] == ["prob"]
        np.testing.assert_allclose(_run(got, x), _run(m, x), atol=1e-7)
    again = compose([extract_member(ens, 0), extract_member(ens, 1)], flip=[False, True])
    np.testing.assert_allclose(_run(again, x), _run(compose([a, b], flip=[False, True]), x), atol=1e-6)
    with pytest.raises(ValueError, match="no member 2 in this graph \\(members: m0, m1\\)"):
        extract_member(ens, 2)
    with pytest.raises(ValueError, match="not an ensemble"):
        extract_member(a, 0)


def test_shipped_member_spec_errors_are_one_line(tmp_path):
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "models" / "bundles" / "lesion-2.0.0"
    path, about = member_onnx(f"{shipped}#1", tmp_path)
    assert about["member"] == 1 and about["bundle"] == "lesion 2.0.0" and path.is_file()
    for bad, said in (("#5", "no member 5"), ("#x", "expected BUNDLE#MEMBER_INDEX")):
        with pytest.raises(SystemExit, match=said):
            member_onnx(f"{shipped}{bad}", tmp_path)
    with pytest.raises(SystemExit, match="not an ensemble"):
        member_onnx(f"{shipped.parent / 'lesion-1.2.2'}#0", tmp_path)

def test_a_deferred_mirrored_view_and_the_rest_add_up_to_the_composed_graph(x):
    a, b = _member(1), _member(2)
    whole = _run(compose([a, b], flip=[True, True]), x)
    first, second, ceiling = split_deferred([a, b], [True, True], 0)
    assert ceiling == 0.25  # half of member 0's half of the mean
    p, q = _run(first, x), _run(second, x)
    np.testing.assert_allclose(p + q, whole, atol=1e-6)
    np.testing.assert_allclose(q, _run(a, x[..., ::-1].copy())[..., ::-1] * ceiling, atol=1e-6)
    assert q.min() >= 0 and q.max() <= ceiling
    assert {n.name for n in second.graph.node if n.op_type == "Conv"} == {PREFIX.format(0) + "/c0/Conv",
                                                                         PREFIX.format(0) + "/c1/Conv",
                                                                         PREFIX.format(0) + "/c2/Conv"}
    one, alone, c1 = split_deferred([b], [True], 0)  # a single mirrored member: its plain and mirrored halves
    assert c1 == 0.5
    np.testing.assert_allclose(_run(one, x) + _run(alone, x), _run(compose([b], flip=True), x), atol=1e-6)
    with pytest.raises(ValueError, match="no mirrored view"):
        split_deferred([a, b], [True, False], 1)
    with pytest.raises(ValueError, match="no member 2"):
        split_deferred([a, b], [True, True], 2)
    with pytest.raises(ValueError, match="scales for"):
        compose([a, b], scale=[1.0])
    with pytest.raises(ValueError, match="'prob'"):
        bad = _member(1)
        bad.graph.output[0].name = "logits"
        mirrored_view(bad, 0, 0.5)


def test_openvino_runs_the_composed_graph_as_onnx_runtime_does(x, tmp_path):
    ov = pytest.importorskip("openvino")
    m = compose([_member(1), _member(2)], flip=True)
    path = tmp_path / "ens.onnx"
    onnx.save(m, str(path))
    got = ov.Core().compile_model(ov.convert_model(str(path)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})({0: x})[0]
    np.testing.assert_allclose(got, _run(m, x), atol=1e-5)


def test_members_that_do_not_share_the_contract_are_refused():
    with pytest.raises(ValueError, match="width"):
        compose([_member(1), _member(2, width=W + 2)])
    renamed = _member(1)
    renamed.graph.output[0].name = "logits"
    renamed.graph.node[-1].output[0] = "logits"
    with pytest.raises(ValueError, match="'prob'"):
        compose([_member(2), renamed])
    with pytest.raises(ValueError, match="flip flags"):
        compose([_member(1), _member(2)], flip=[True])
    with pytest.raises(ValueError, match="at least one"):
        compose([])


def test_keep_groups_default_and_per_member():
    assert keep_groups(2, []) == [(PREFIX.format(0), 2, 3), (PREFIX.format(1), 2, 3)]
    assert keep_groups(2, ["0:2:1"])[0] == (PREFIX.format(0), 2, 1)
    with pytest.raises(SystemExit, match="no member 2"):
        keep_groups(2, ["2:1:1"])
    with pytest.raises(SystemExit, match="MEMBER:FIRST:LAST"):
        keep_groups(2, ["0:1"])


def test_int8_keeps_each_members_ends_and_the_mirror_nodes_in_fp32(x, tmp_path):
    from models.quantize import quantize_ort

    fp32 = tmp_path / "ens.onnx"
    onnx.save(compose([_member(1, convs=4), _member(2, convs=4)], flip=[True, False]), str(fp32))
    calib = np.random.default_rng(1).random((8, 1, 12, W)).astype(np.float32)
    kept = quantize_ort(fp32, tmp_path / "ens.int8.onnx", calib,
                        groups=[(PREFIX.format(0), 1, 1), (PREFIX.format(1), 2, 0)], exclude_prefix=TTA)
    assert kept == [PREFIX.format(0) + "/c0/Conv", PREFIX.format(0) + "/c3/Conv",
                    PREFIX.format(1) + "/c0/Conv", PREFIX.format(1) + "/c1/Conv"]
    q = onnx.load(str(tmp_path / "ens.int8.onnx"))
    quantized_inputs = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert "image" not in quantized_inputs  # the input and its mirror stay FP32 up to the first FP32 convolution
    convs = {n.name: n for n in q.graph.node if n.op_type == "Conv"}
    produced_by_dq = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for name, node in convs.items():  # a quantized convolution reads dequantized weights; a kept one its own
        assert (node.input[1] in produced_by_dq) == (name not in kept), name
    got = _run(q, x)
    want = _run(onnx.load(str(fp32)), x)
    assert np.abs(got - want).mean() < 0.03  # still the same function, quantized (random weights: coarse)
    with pytest.raises(ValueError, match="no convolution"):
        quantize_ort(fp32, tmp_path / "bad.onnx", calib, groups=[("m7/", 1, 1)])
