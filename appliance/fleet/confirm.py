"""After a switch: the new bundle is on probation until `confirm_after` analyses with it succeeded (confirmed); the
first one that fails rolls it back to the previous bundle (or the shipped one), which an operator can also order.
The bundle left behind is blocked from automatic installs. The probation survives a restart (<state>/bundles).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from appliance.config import AnalysisConfig
from appliance.fleet.reports import InstallResult, UpdateReporter
from appliance.fleet.bundle_store import BundleState
from appliance.inference.bundle import BundleError, load_bundle

log = logging.getLogger("appliance.fleet.updater")


class Confirmation:
    """The probation of the bundle switched last: counts the analyses after a switch, confirms or rolls back."""

    def __init__(self, state: BundleState, config: AnalysisConfig, report: UpdateReporter,
                 callbacks: list[Callable[[Any], None]], confirm_after: int = 3) -> None:
        """callbacks: called with an Analyzer loaded on the bundle set after a rollback (the updater's
        on_activated list)."""
        self.state, self.config, self.report, self.callbacks = state, config, report, callbacks
        self.confirm_after = max(1, confirm_after)
        self._pending = self.state.pending()

    @property
    def pending(self) -> bool:
        """A switched bundle is waiting for its first analyses (cached: asked after every analysed batch)."""
        return bool(self._pending)

    def set_pending(self, data: dict[str, Any] | None) -> None:
        self.state.set_pending(data)
        self._pending = dict(data) if data else None

    def after_analysis(self, ok: bool, reason: str) -> None:
        """One analysis after a switch (on the updater's worker thread): ok counts toward confirmation."""
        pend = self._pending
        if not pend:
            return
        pend = dict(pend)
        ref = {"name": pend["name"], "version": pend["version"], "sha256": pend["sha256"]}
        cur = self.state.active_bundle(pend["name"])
        if cur is None or cur.sha256 != pend["sha256"]:
            self.set_pending(None)
            return
        if not ok:
            why = f"first analysis with {pend['name']} {pend['version']} failed" + (f": {reason}" if reason else "")
            try:
                with self.state.lock():
                    self.rollback_locked(pend["name"], why, automatic=True)
            except BundleError as e:
                self.set_pending(None)
                self.report("rollback", "failed", f"{why}; {e}", ref, pend.get("previous"))
            return
        pend["ok"] = int(pend.get("ok", 0)) + 1
        if pend["ok"] >= self.confirm_after:
            self.set_pending(None)
            self.report("confirm", "confirmed", None, ref, pend.get("previous"), {"analyses": pend["ok"]})
        else:
            self.set_pending(pend)

    def rollback(self, name: str, reason: str = "ordered by the operator") -> InstallResult:
        """Go back to previous/<name> (else the shipped bundle); the bundle left is blocked from automatic installs."""
        with self.state.lock():
            return self.rollback_locked(name, reason, automatic=False)

    def rollback_locked(self, name: str, reason: str, automatic: bool) -> InstallResult:
        cur = self.state.target("active", name)
        if cur is None:
            raise BundleError(f"no installed {name} bundle to roll back (the shipped one is in use)")
        bad = load_bundle(cur, verify=False)
        target = self.state.target("previous", name)
        if target is None:
            shipped = self.state.shipped().get(name)
            if shipped is None or shipped.sha256 == bad.sha256:
                raise BundleError(f"nothing to roll back {name} {bad.version} to (no previous bundle)")
            target = self.state.adopt_shipped(name)
            assert target is not None
        good = load_bundle(target, verify=True)
        self.state.set_link("active", name, target, step="rollback_link")
        self.state.remove_link("previous", name)
        self.state.block(bad.sha256, f"rolled back: {reason}")
        pend = self.state.pending()
        if pend and pend.get("name") == name:
            self.set_pending(None)
        self.state.prune()
        if self.callbacks:
            from appliance.pipeline.analyzer import Analyzer

            try:
                analyzer = Analyzer.load(dataclasses.replace(self.config, bundle_dir=""), self.state.active)
                for cb in self.callbacks:
                    cb(analyzer)
            except Exception as e:
                log.exception("the rolled-back bundle set could not be loaded")
                reason += f"; reloading failed: {e}"
        self.report("rollback", "rolled_back", reason, good.ref(), bad.ref(), {"automatic": automatic})
        return InstallResult("rolled_back", "rollback", reason, good.ref(), bad.ref())
