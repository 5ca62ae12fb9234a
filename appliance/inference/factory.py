"""Which inference runtimes are installed, and the adapter for one of them.

The concrete adapters import the interface (appliance.inference.adapter); only this module imports them,
so the interface never depends on its implementations.
"""
from __future__ import annotations

from pathlib import Path

from appliance.inference.adapter import AdapterError, InferenceAdapter, default_streams, default_threads
from appliance.inference.onnxruntime_adapter import OnnxRuntimeAdapter
from appliance.inference.openvino_adapter import OpenVINOAdapter

BACKENDS = ("openvino", "onnxruntime")


def available_backends() -> list[str]:
    out = []
    try:
        import openvino  # noqa: F401

        out.append("openvino")
    except ImportError:
        pass
    try:
        import onnxruntime  # noqa: F401

        out.append("onnxruntime")
    except ImportError:
        pass
    return out


def create_adapter(backend: str, model_files: dict[str, Path], precision: str = "int8",
                   threads: int | None = None, streams: int | None = None) -> InferenceAdapter:
    """Build the adapter for `backend` ("auto" picks OpenVINO when installed, else ONNX Runtime).

    model_files: {"onnx": FP32 ONNX, "onnx_int8": INT8 QDQ ONNX, "openvino_int8": IR .xml}.
    """
    avail = available_backends()
    if backend == "auto":
        if not avail:
            raise AdapterError("no inference runtime installed: install openvino or onnxruntime")
        backend = avail[0]
    if backend not in BACKENDS:
        raise AdapterError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)} or auto")
    if backend not in avail:
        raise AdapterError(f"backend {backend} is not installed (available: {', '.join(avail) or 'none'})")
    threads = threads or default_threads()
    streams = max(1, min(streams or default_streams(threads), threads))
    if backend == "openvino":
        path = model_files["openvino_int8"] if precision == "int8" else model_files["onnx"]
        return OpenVINOAdapter(path, precision=precision, threads=threads, streams=streams)
    path = model_files["onnx_int8"] if precision == "int8" else model_files["onnx"]
    return OnnxRuntimeAdapter(path, precision=precision, threads=threads, streams=streams)
