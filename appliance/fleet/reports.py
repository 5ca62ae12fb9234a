"""What a fleet update says about itself: the retained `<prefix>/<device>/update` payload (schema
config/schemas/update.schema.json) for every step and outcome, also appended to <state>/bundles/history.jsonl and
logged, and the results an install returns."""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.fleet.bundle_store import BundleState
from appliance.inference.bundle import BundleError

log = logging.getLogger("appliance.fleet.updater")

UPDATE_SCHEMA = "ctriage.update/1"
STEPS = ("metadata", "transfer", "verify", "policy", "store", "load", "selftest", "wait_idle", "activate", "confirm",
         "rollback", "startup")
OUTCOMES = ("progress", "refused", "failed", "installed", "confirmed", "rolled_back", "repaired", "rotated", "expired")

Publish = Callable[[str, dict[str, Any], bool], None]


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def update_payload(*, device: str, step: str, outcome: str, reason: str | None = None,
                   bundle: dict[str, str] | None = None, previous: dict[str, str] | None = None,
                   detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """`<prefix>/<device>/update` (retained; schema config/schemas/update.schema.json)."""
    p: dict[str, Any] = {"schema": UPDATE_SCHEMA, "device": device, "step": step, "outcome": outcome, "reason": reason,
                         "bundle": bundle, "previous": previous, "created": now_iso()}
    if detail:
        p["detail"] = detail
    return p


class UpdateStop(BundleError):
    """An install ended before activation: `outcome` is refused (policy/verification) or failed (could not run)."""

    def __init__(self, step: str, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.step, self.outcome, self.reason = step, outcome, reason


@dataclass
class InstallResult:
    outcome: str  # installed | unchanged | refused | failed | rolled_back
    step: str
    reason: str | None = None
    bundle: dict[str, str] | None = None
    previous: dict[str, str] | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome in ("installed", "unchanged", "rolled_back")


class UpdateReporter:
    """report(step, outcome, ...): history line, log line and (retained) MQTT message; the broker being away or a
    full disk never stops an update."""

    def __init__(self, state: BundleState, device: str, topic: str, publish: Publish | None) -> None:
        self.state, self.device, self.topic, self.publish = state, device, topic, publish

    def __call__(self, step: str, outcome: str, reason: str | None = None, bundle: dict[str, str] | None = None,
                 previous: dict[str, str] | None = None, detail: dict[str, Any] | None = None) -> dict[str, Any]:
        p = update_payload(device=self.device, step=step, outcome=outcome, reason=reason, bundle=bundle,
                           previous=previous, detail=detail)
        try:
            self.state.append_history(p)
        except OSError as e:
            log.error("cannot write update history: %s", e)
        (log.info if outcome in ("progress", "installed", "confirmed") else log.warning)(
            "update %s: %s%s", step, outcome, f" ({reason})" if reason else "")
        if self.publish is not None:
            try:
                self.publish(self.topic, p, True)
            except Exception as e:  # the broker being away never stops an update
                log.warning("cannot publish update progress: %s", e)
        return p


TRUST_SCHEMA = "ctriage.trust/1"


def trust_payload(device: str, described: dict[str, Any], stale: str | None) -> dict[str, Any]:
    """`<prefix>/<device>/trust` (retained; schema config/schemas/trust.schema.json): what this appliance trusts —
    root version, keys and threshold of each role, the versions and expiries of its metadata."""
    p: dict[str, Any] = {"schema": TRUST_SCHEMA, "device": device, "ready": bool(described.get("ready")),
                         "stale": stale, "created": now_iso()}
    for k in ("root", "roles", "timestamp", "snapshot", "targets"):
        if k in described:
            p[k] = described[k]
    return p
