"""MQTT topics and payloads (schemas in config/schemas/*.schema.json). Pure: builds dicts, no I/O.

Payloads never carry patient identifiers or DICOM UIDs: studies and series are named by keyed hashes. Patient
labels are added only when the site enables `privacy.send_patient_labels`.
"""
from __future__ import annotations

import base64
import datetime as dt
from typing import Any

from appliance import __version__
from appliance.domain import SeriesVerdict

VERDICT_SCHEMA = "ctriage.verdict/2"  # /2: state "corrected" with "correction"
OVERLAY_SCHEMA = "ctriage.overlay/1"
STATUS_SCHEMA = "ctriage.status/1"
STATS_SCHEMA = "ctriage.stats/1"
ACK_SCHEMA = "ctriage.ack/1"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


class Topics:
    """Topic names under a prefix for one device; `Topics.all_devices(prefix)` gives subscription filters for every
    device (e.g. `.verdict(Topics.ANY)`: every device's verdicts)."""

    ANY = "+"  # MQTT single-level wildcard: any device, any study key

    def __init__(self, prefix: str, device: str) -> None:
        self.prefix, self.device = prefix.rstrip("/"), device

    @classmethod
    def all_devices(cls, prefix: str) -> "Topics":
        return cls(prefix, cls.ANY)

    def studies(self) -> list[str]:
        """Filters for the per-study topics of every study key: verdicts, overlays, acknowledgements."""
        return [self.verdict(self.ANY), self.overlay(self.ANY), self.ack(self.ANY)]

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def stats(self) -> str:
        return f"{self.base}/stats"

    @property
    def update(self) -> str:
        return f"{self.base}/update"

    def verdict(self, study_key: str) -> str:
        return f"{self.base}/verdict/{study_key}"

    def overlay(self, study_key: str) -> str:
        return f"{self.base}/overlay/{study_key}"

    def ack(self, study_key: str) -> str:
        return f"{self.base}/ack/{study_key}"


def verdict_payload(*, device: str, study_key: str, series_key: str, verdict: SeriesVerdict,
                    bundles: list[dict[str, str]], backend: str, device_type: str,
                    complete_reason: str | None = None, timings: dict[str, Any] | None = None,
                    series: list[dict[str, Any]] | None = None, rejected: int = 0,
                    labels: dict[str, str] | None = None,
                    correction: dict[str, Any] | None = None) -> dict[str, Any]:
    """The study verdict. correction (see `correction`): this final replaces an earlier final with another result;
    the state is then "corrected"."""
    p: dict[str, Any] = {
        "schema": VERDICT_SCHEMA,
        "device": device,
        "study_key": study_key,
        "series_key": series_key,
        "state": verdict.state,
        "result": verdict.result,
        "reason": verdict.reason,
        "evidence": verdict.evidence.as_dict() if verdict.evidence else None,
        "focal": verdict.focal.as_dict() if verdict.focal else None,
        "grade": verdict.grade,  # the viral-pneumonia-pattern grade (RSNA category, extent, severity) or None
        # solid nodules/masses: whose halo explained lesion foci, or the single focal lesion named a mass
        "others": verdict.others,
        "acquisition": verdict.acquisition,  # image noise of the series; noisy: outside the validated range
        "counts": {"slices": verdict.slices, "lung_slices": verdict.lung_slices,
                   "lesion_slices": verdict.lesion_slices, "rejected": rejected, "gaps": verdict.gaps,
                   "foci": verdict.foci},
        "complete_reason": complete_reason if verdict.state == "final" else None,
        "bundles": bundles,
        "backend": backend,
        "device_type": device_type,
        "timings": timings or {},
        "created": now_iso(),
    }
    if correction is not None:
        p["state"] = "corrected"
        p["correction"] = correction
    if series:
        p["series"] = series
    if labels:
        p["labels"] = labels
    return p


def correction(previous: dict[str, Any], result: str, what: str | None = None) -> dict[str, Any]:
    """What a corrected verdict says of the final it replaces (`previous`: that verdict's payload); `what`: why,
    where it is not a changed result (the same result with something the reader must see: prone images)."""
    was = str(previous.get("result"))
    return {"previous_result": was, "previous_state": str(previous.get("state")),
            "previous_created": previous.get("created"),
            "what": what or f"slices that arrived after the final verdict changed the result from {was} to {result}"}


def overlay_payload(*, device: str, study_key: str, series_key: str, state: str, slices: int,
                    key_slices: list[dict[str, Any]], image_png: bytes | None = None, image_index: int | None = None,
                    image_size: tuple[int, int] | None = None) -> dict[str, Any]:
    img = None
    if image_png is not None:
        img = {"index": int(image_index or 0), "mime": "image/png", "data": base64.b64encode(image_png).decode()}
        if image_size:
            img["width"], img["height"] = image_size
    return {"schema": OVERLAY_SCHEMA, "device": device, "study_key": study_key, "series_key": series_key,
            "state": state, "slices": slices, "key_slices": key_slices, "image": img, "created": now_iso()}


def status_payload(*, device: str, state: str, bundles: list[dict[str, str]] | None = None, backend: str = "",
                   device_type: str = "", precision: str = "", started: str = "", detail: str | None = None) -> dict[str, Any]:
    return {"schema": STATUS_SCHEMA, "device": device, "state": state, "version": __version__,
            "bundles": bundles or [], "backend": backend, "device_type": device_type, "precision": precision,
            "started": started, "detail": detail, "created": now_iso()}


def offline_payload(device: str) -> dict[str, Any]:
    """The last will: published by the broker when the appliance disappears."""
    return {"schema": STATUS_SCHEMA, "device": device, "state": "offline", "version": __version__,
            "detail": "connection lost", "created": now_iso()}


def stats_payload(*, device: str, queue: int, slices_per_s: float, **extra: Any) -> dict[str, Any]:
    return {"schema": STATS_SCHEMA, "device": device, "queue": queue, "slices_per_s": round(slices_per_s, 3),
            **extra, "created": now_iso()}
