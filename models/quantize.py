"""INT8 quantization of an exported FP32 ONNX network, shared by models.export and models.ensemble: the ONNX
Runtime QDQ model, the OpenVINO IR of the same quantization (with the upsampling rewrite of models.graph), and
NNCF's IR for the record. Needs onnx, onnxruntime and openvino only (no torch), so requantizing or composing
shipped bundles works without the training extra."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def filter_upsampling_file(src: Path, dst: Path, inputs: np.ndarray, atol: float = 1e-5) -> dict:
    """Write `src` with its bilinear ×2 upsamplings rewritten (models.graph.filter_upsampling) to `dst`, after
    checking on `inputs` that both graphs give the same outputs (ONNX Runtime FP32, max abs difference ≤ atol).
    Returns {"replaced": n, "max_abs_diff": d}."""
    import onnx
    import onnxruntime as ort

    from models.graph import filter_upsampling

    new, n = filter_upsampling(onnx.load(str(src)))
    x = {"image": np.asarray(inputs, np.float32)}
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, x)[0]
    b = ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    diff = float(np.abs(a - b).max())
    if diff > atol:
        raise SystemExit(f"{src}: the rewritten upsampling changes the outputs by {diff:.2g} (> {atol:g}); not written")
    onnx.save(new, str(dst))
    return {"replaced": n, "max_abs_diff": diff}


def quantize_ort(fp32: Path, out: Path, calib: np.ndarray, keep_fp32_first: int = 2, keep_fp32_last: int = 3,
                 groups: list[tuple[str, int, int]] | None = None, exclude_prefix: str | None = None) -> list[str]:
    """Static INT8 QDQ quantization (ONNX Runtime quantizer); returns the convolutions kept in FP32.

    `groups` [(name prefix, first, last)] keeps the first / last convolutions of each sub-network of a composed
    graph (models.ensemble) instead of the whole graph's; nodes named with `exclude_prefix` stay in FP32 too.

    per-channel weights, uint8 activations (min-max on real slices), 7-bit weights (reduce_range: without it the
    u8s8 convolutions saturate on CPUs without VNNI, measured mask Dice vs FP32 0.43 instead of 0.94 on such a
    CPU). The first and last convolutions (full resolution, one input channel / the logits) stay in FP32: they
    cost little and carry most of the quantization error (mask Dice vs FP32 0.89 → 0.99 on the lesion model).
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"image": x}

    from models.graph import FILTER_SUFFIX, exact_filter_weights

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    convs = [n.name for n in onnx.load(str(pre)).graph.node
             if n.op_type == "Conv" and not n.name.endswith(FILTER_SUFFIX)]  # the network's own convolutions
    keep = convs[:keep_fp32_first] + convs[len(convs) - keep_fp32_last:]
    if groups is not None:
        keep = []
        for prefix, first, last in groups:
            own = [c for c in convs if c.startswith(prefix)]
            if not own:
                raise ValueError(f"no convolution is named {prefix}…")
            keep += own[:first] + own[len(own) - last:]
    extra = [n.name for n in onnx.load(str(pre)).graph.node if exclude_prefix and n.name.startswith(exclude_prefix)]
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=keep + extra)
    pre.unlink()
    q = onnx.load(str(out))
    if exact_filter_weights(q):  # upsampling filters: exact int8 weights instead of the quantizer's grid
        onnx.save(q, str(out))
    return keep


def openvino_ir_from_qdq(int8_onnx: Path, out_xml: Path) -> None:
    """The OpenVINO IR of the very same INT8 model, so both runtimes compute the same quantized network (their
    verdicts must agree); OpenVINO runs the QDQ pairs as INT8 (low-precision transformations)."""
    import openvino as ov

    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.convert_model(str(int8_onnx)), str(out_xml), compress_to_fp16=False)


def openvino_ir_filtered(fp32: Path, out_xml: Path, calib: np.ndarray, keep_fp32_first: int,
                         keep_fp32_last: int, check_inputs: np.ndarray, **quantize_kw) -> dict:
    """The OpenVINO INT8 IR of the same network with its bilinear ×2 upsamplings rewritten (models.graph): quantized
    exactly as the ONNX Runtime INT8 model (same calibration, same convolutions kept in FP32) plus the exact filter
    weights. OpenVINO runs a linear Interpolate in FP32 whatever the precision around it (a fifth of the lesion
    model's time on a 2-core x86); the rewrite runs in INT8. ONNX Runtime runs the rewrite slower than its own
    bilinear Resize, so it keeps the plain graph. Returns {"replaced", "max_abs_diff"} of the FP32 check."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        f32, q = Path(tmp) / "filtered.onnx", Path(tmp) / "filtered.int8.onnx"
        info = filter_upsampling_file(fp32, f32, check_inputs)
        quantize_ort(f32, q, calib, keep_fp32_first, keep_fp32_last, **quantize_kw)
        openvino_ir_from_qdq(q, out_xml)
    return info


def quantize_nncf(fp32: Path, out_xml: Path, calib: np.ndarray) -> None:
    """NNCF post-training INT8 for OpenVINO (mixed preset): measured for the record, not shipped (see build)."""
    import nncf
    import openvino as ov

    model = ov.convert_model(str(fp32))
    q = nncf.quantize(model, nncf.Dataset([calib[i:i + 1] for i in range(len(calib))]),
                      subset_size=len(calib), preset=nncf.QuantizationPreset.MIXED)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(q, str(out_xml), compress_to_fp16=False)
