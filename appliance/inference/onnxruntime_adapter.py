"""ONNX Runtime adapter: TensorRT / CUDA execution providers where present (Jetson), else CPU."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from appliance.inference.adapter import AdapterError, InferenceAdapter, cpu_name

log = logging.getLogger(__name__)
PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxRuntimeAdapter(InferenceAdapter):
    backend = "onnxruntime"

    def __init__(self, model: Path, precision: str = "int8", threads: int = 2,
                 providers: list[str] | None = None, streams: int = 1) -> None:
        import onnxruntime as ort

        self.precision = precision
        self.streams = streams = max(1, int(streams))
        opts = ort.SessionOptions()
        # concurrent run() calls are safe on one session; with several callers each runs on its own thread share
        opts.intra_op_num_threads = max(1, int(threads) // streams)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        avail = ort.get_available_providers()
        wanted = [p for p in (providers or PREFERRED) if p in avail] or ["CPUExecutionProvider"]
        try:
            self._sess = ort.InferenceSession(str(model), opts, providers=wanted)
        except Exception as e:
            raise AdapterError(f"ONNX Runtime could not load {model}: {str(e).splitlines()[0]}") from None
        used = self._sess.get_providers()
        if wanted[0] != used[0]:
            log.warning("ONNX Runtime fell back from %s to %s", wanted[0], used[0])
        first = self._sess.get_inputs()[0]
        self._input = first.name
        # first call on this thread, before concurrent callers (as the OpenVINO adapter does)
        self.infer(np.zeros([d if isinstance(d, int) else 1 for d in first.shape], np.float32))
        where = cpu_name() if used[0] == "CPUExecutionProvider" else "GPU"
        share = f"{threads} threads" if streams == 1 else f"{threads} threads in {streams} streams"
        self.device = f"{used[0].replace('ExecutionProvider', '')}: {where} ({share})"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return np.asarray(self._sess.run(None, {self._input: batch})[0], dtype=np.float32)
