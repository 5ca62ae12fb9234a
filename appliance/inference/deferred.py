"""A lesion bundle in two graphs: the full probability map is their sum, the second graph is run only where needed.

The second ("deferred") graph's map lies in [0, ceiling] (a member's mirrored view times its weight in the mean,
models.ensemble.split_deferred). A box needs a pixel at min_score or above, so on a slice whose first map peaks
below min_score − ceiling no box can be made, with or without the second graph: `infer_for_boxes` skips it there
and the boxes (and everything the verdict reads) are those of the full map. `infer` always runs both (self-test,
evaluation: the full map).
"""
from __future__ import annotations

import threading

import numpy as np

from appliance.inference.adapter import InferenceAdapter


class DeferredAdapter(InferenceAdapter):
    def __init__(self, first: InferenceAdapter, deferred: InferenceAdapter, ceiling: float) -> None:
        if not 0.0 < ceiling <= 1.0:
            raise ValueError(f"ceiling must lie in (0, 1], got {ceiling}")
        self.first, self.deferred, self.ceiling = first, deferred, float(ceiling)
        self.backend, self.device, self.precision = first.backend, first.device, first.precision
        self.streams = min(first.streams, deferred.streams)
        self._lock = threading.Lock()
        self.slices = self.deferred_runs = 0  # slices seen by infer_for_boxes / of them, run through both graphs

    def _second(self, batch: np.ndarray) -> np.ndarray:
        # clipped to the manifest's ceiling: the skip rule's bound holds whatever the runtime's rounding
        return np.clip(self.deferred.infer(batch), 0.0, self.ceiling)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """The full map: both graphs on every slice."""
        return self.first.infer(batch) + self._second(batch)

    def infer_for_boxes(self, batch: np.ndarray, min_score: float) -> np.ndarray:
        """The full map on every slice where a pixel can still reach `min_score`; elsewhere the first graph's map
        (no box on such a slice either way; its sub-threshold pixels are lower than the full map's)."""
        out = self.first.infer(batch)
        need = out.reshape(len(out), -1).max(axis=1) + self.ceiling >= min_score
        if need.any():
            out[need] += self._second(np.ascontiguousarray(batch[need]))
        with self._lock:
            self.slices += len(out)
            self.deferred_runs += int(need.sum())
        return out
