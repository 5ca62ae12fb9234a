"""Counters the data path keeps (slices analysed, rate, stage times, verdict latency, the last analysis failure)
and health reports. Written by the worker thread only; readers tolerate a value one batch old."""
from __future__ import annotations

import time
from collections import deque
from typing import Any


class Stats:
    def __init__(self) -> None:
        self.slices_total = 0
        self.rate: deque[tuple[float, int]] = deque(maxlen=600)
        self.stage_ms: deque[dict[str, float]] = deque(maxlen=200)
        self.last_latency: float | None = None  # seconds from the lead series' slices to its last published verdict
        self.analysis_error: tuple[float, str] | None = None  # (when, why) the analysis of a slice last failed

    def analysed(self, now: float, n: int, findings: list[Any]) -> None:
        """A batch is stored: n slices taken in, the findings' stage times (None: a slice that failed)."""
        self.slices_total += n
        self.rate.append((now, n))
        for f in findings:
            if f is not None:
                self.stage_ms.append(f.timings_ms)

    def rate_per_s(self, window: float) -> float:
        now = time.time()
        n = sum(k for t, k in self.rate if now - t <= window)
        return n / window if window > 0 else 0.0

    def stage_summary(self) -> dict[str, float]:
        if not self.stage_ms:
            return {}
        keys = {k for d in self.stage_ms for k in d}
        return {k: round(sum(d.get(k, 0.0) for d in self.stage_ms) / len(self.stage_ms), 3) for k in sorted(keys)}
