"""Exact rewrites of exported ONNX graphs that let the INT8 runtimes run more of the network in INT8.

Bilinear ×2 upsampling (`Resize`, mode linear, half-pixel) is the same linear map as nearest ×2 followed by an
edge-padded 3×3 filter [1 2 1]ᵀ[1 2 1] / 16 on each channel: an output pixel at 2i sits a quarter pixel before
source pixel i, so it is ¾·x[i] + ¼·x[i-1]; nearest ×2 makes u[2i] = u[2i+1] = x[i], and ¼·u[2i-1] + ½·u[2i] +
¼·u[2i+1] gives exactly that (and the mirror image at 2i+1); edge padding reproduces the clamping at the border.
OpenVINO runs a linear Interpolate in FP32 between a dequantize and a quantize whatever the model's precision,
while nearest upsampling, padding and a depthwise convolution all run in INT8.

After quantization the filter's weights are set to their exact values (int8 4·[1 2 1]ᵀ[1 2 1] with scale 1/64)
instead of the quantizer's max/63 grid, so INT8 filters exactly as FP32 does.
"""
from __future__ import annotations

import numpy as np

FILTER_SUFFIX = "/upfilter"  # names of the filter convolutions this rewrite adds
_TAPS = np.array([1.0, 2.0, 1.0])


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _scales(model, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(_attrs(n)["value"])
    return None


def is_bilinear_x2(model, node) -> bool:
    """A Resize that doubles H and W bilinearly with half-pixel centres (PyTorch's align_corners=False)."""
    if node.op_type != "Resize" or len(node.input) < 3 or not node.input[2] or (len(node.input) > 3 and node.input[3]):
        return False
    a = _attrs(node)
    half_pixel = a.get("coordinate_transformation_mode") in (b"half_pixel", b"pytorch_half_pixel")
    if a.get("mode", b"nearest") != b"linear" or not half_pixel:
        return False
    s = _scales(model, node.input[2])
    return s is not None and s.shape == (4,) and np.array_equal(s, [1.0, 1.0, 2.0, 2.0])


def filter_upsampling(model):
    """A copy of `model` with every bilinear ×2 Resize replaced by nearest ×2 + edge pad + the 3×3 filter.

    Returns (new model, number of Resize nodes replaced). Channel counts come from ONNX shape inference; a Resize
    whose channel count is unknown is left as it is.
    """
    import onnx
    from onnx import helper, numpy_helper, shape_inference

    m = shape_inference.infer_shapes(model)
    known = list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)
    channels = {v.name: v.type.tensor_type.shape.dim[1].dim_value for v in known
                if len(v.type.tensor_type.shape.dim) == 4}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    nodes, n_done = [], 0
    kernel = (np.outer(_TAPS, _TAPS) / 16.0).astype(np.float32)
    for node in g.node:
        c = channels.get(node.input[0], 0) if node.op_type == "Resize" else 0
        if not c or not is_bilinear_x2(model, node):
            nodes.append(node)
            continue
        p = node.name or node.output[0]
        g.initializer.append(numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), p + "/edge_pads"))
        g.initializer.append(numpy_helper.from_array(np.tile(kernel, (c, 1, 1, 1)), p + "/upfilter_w"))
        nodes += [
            helper.make_node("Resize", [node.input[0], "", node.input[2]], [p + "/nearest"], name=p + "/nearest",
                             mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
            helper.make_node("Pad", [p + "/nearest", p + "/edge_pads"], [p + "/padded"], name=p + "/pad",
                             mode="edge"),
            helper.make_node("Conv", [p + "/padded", p + "/upfilter_w"], list(node.output), name=p + FILTER_SUFFIX,
                             group=c, kernel_shape=[3, 3], pads=[0, 0, 0, 0]),
        ]
        n_done += 1
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    onnx.checker.check_model(out)
    return out, n_done


def exact_filter_weights(qdq_model) -> int:
    """In a QDQ model, give each upsampling filter its exact int8 weights (4·[1 2 1]ᵀ[1 2 1], scale 1/64).

    Modifies the model in place; returns the number of filters set. A filter left in FP32 is skipped.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in qdq_model.graph.initializer}
    producer = {o: n for n in qdq_model.graph.node for o in n.output}
    k = (np.outer(_TAPS, _TAPS) * 4).astype(np.int8)
    n_set = 0
    for node in qdq_model.graph.node:
        if node.op_type != "Conv" or not node.name.endswith(FILTER_SUFFIX):
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q, scale = inits[dq.input[0]], inits[dq.input[1]]
        zp = inits.get(dq.input[2]) if len(dq.input) > 2 else None
        c = numpy_helper.to_array(q).shape[0]
        q.CopyFrom(numpy_helper.from_array(np.tile(k, (c, 1, 1, 1)), q.name))
        s = numpy_helper.to_array(scale)
        scale.CopyFrom(numpy_helper.from_array(np.full(s.shape, 1.0 / 64.0, s.dtype), scale.name))
        if zp is not None:
            z = numpy_helper.to_array(zp)
            zp.CopyFrom(numpy_helper.from_array(np.zeros(z.shape, z.dtype), zp.name))
        n_set += 1
    return n_set
