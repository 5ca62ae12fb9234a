"""One inference interface; one implementation per runtime (OpenVINO, ONNX Runtime), built by factory.py.

An adapter takes a float32 NCHW batch in [0, 1] and returns the model's probability map with the same layout.
It says which backend, device and precision it really runs on, so verdicts can report it honestly.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod

import numpy as np


class AdapterError(RuntimeError):
    """A model could not be loaded or run."""


class InferenceAdapter(ABC):
    backend: str = ""
    device: str = ""  # what the runtime reports it runs on, e.g. "CPU: AMD EPYC (f32)"
    precision: str = ""  # "int8" or "fp32" model file; the runtime's own compute precision is in `device`
    streams: int = 1  # how many callers may run `infer` at the same time, each at full speed

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(N, 1, H, W) float32 in [0, 1] → (N, 1, H, W) float32 probabilities. Safe to call from several threads."""

    def describe(self) -> dict[str, str]:
        return {"backend": self.backend, "device": self.device, "precision": self.precision}


def cpu_name() -> str:
    """The CPU model as the OS reports it (for honest device strings)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def default_threads() -> int:
    return int(os.environ.get("CTRIAGE_THREADS", 0)) or max(1, len(os.sched_getaffinity(0)))


def default_streams(threads: int) -> int:
    """Concurrent inference streams for `threads` threads: 2 from 2 threads up (see Analyzer.workers)."""
    return 2 if threads >= 2 else 1
