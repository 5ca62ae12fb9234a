"""OpenVINO runtime adapter (CPU by default; GPU/NPU where the device string asks for it)."""
from __future__ import annotations

import queue
from pathlib import Path

import numpy as np

from appliance.inference.adapter import AdapterError, InferenceAdapter


class OpenVINOAdapter(InferenceAdapter):
    backend = "openvino"

    def __init__(self, model: Path, precision: str = "int8", threads: int = 2, device: str = "CPU",
                 streams: int = 1) -> None:
        import openvino as ov

        self.precision = precision
        self.streams = streams = max(1, int(streams))
        core = ov.Core()
        # one stream per concurrent caller, the threads split between them (a stream with 1 thread on each core
        # beats 2 threads on one stream once pre/post-processing runs beside it: no thread waits for the other)
        config = {"PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
                  "INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": streams}
        if device == "CPU":
            # FP32 models would otherwise run in BF16 on AMX CPUs: keep f32 so FP32 means FP32.
            config["INFERENCE_PRECISION_HINT"] = "f32"
        try:
            net = core.read_model(str(model))
            self._compiled = core.compile_model(net, device, config)
        except Exception as e:  # openvino raises RuntimeError subclasses with long messages
            raise AdapterError(f"OpenVINO could not load {model}: {str(e).splitlines()[0]}") from None
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(streams):
            self._requests.put(self._compiled.create_infer_request())
        self._input = self._compiled.input(0)
        # One call before any concurrency: the bindings initialise function-local statics on the first call, and
        # two threads racing there deadlock (one holds the GIL and waits for the static, the other the reverse).
        shape = [d.get_length() if d.is_static else 1 for d in self._input.get_partial_shape()]
        self.infer(np.zeros(shape, np.float32))
        try:
            name = core.get_property(device, "FULL_DEVICE_NAME")
        except Exception:
            name = device
        try:
            used = self._compiled.get_property("EXECUTION_DEVICES")
            used = ",".join(used) if isinstance(used, (list, tuple)) else str(used)
        except Exception:
            used = device
        try:
            hint = self._compiled.get_property("INFERENCE_PRECISION_HINT")
            prec = getattr(hint, "type_name", None) or getattr(hint, "get_type_name", lambda: str(hint))()
        except Exception:
            prec = "?"
        where = f"{threads} threads" if streams == 1 else f"{threads} threads in {streams} streams"
        self.device = f"{used}: {name} ({prec}, {where})"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        request = self._requests.get()  # one request per stream: concurrent callers each get their own
        try:
            res = request.infer({0: batch}, share_inputs=True)
            return np.array(next(iter(res.values())), dtype=np.float32)  # a copy: the request's buffer is reused
        finally:
            self._requests.put(request)
