"""Installing a release that arrived (or a bundle given by hand that the trusted targets metadata names): verify
against the signed release → policy → store → load with the others + self-test → wait until idle → atomic switch →
the activation callbacks. A bundle that fails any step never becomes active; after the switch
`appliance.fleet.confirm` confirms it or rolls it back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuf.api.metadata import Targets

from appliance.config import AnalysisConfig
from appliance.fleet.bundle_files import whole_bundle
from appliance.fleet.bundle_store import REQUIRED, BundleState, crashpoint
from appliance.fleet.confirm import Confirmation
from appliance.fleet.release import Release, releases
from appliance.fleet.reports import InstallResult, UpdateReporter, UpdateStop
from appliance.fleet.transfer import copy_durable, unpack
from appliance.inference.bundle import Bundle, BundleError, parse_version

log = logging.getLogger("appliance.fleet.updater")

_SMOKE: list | None = None


def _smoke_slices() -> list:
    """Two synthetic chest slices (appliance.phantom) to run the whole pipeline once with a new bundle."""
    global _SMOKE
    if _SMOKE is None:
        from appliance.domain import SliceImage
        from appliance.phantom import PhantomSpec, phantom_series

        spec = PhantomSpec(slices=8, size=256, spacing_mm=1.4, seed=3)
        hus = phantom_series(spec)
        _SMOKE = [SliceImage(key=f"selftest-{k}", series_uid="selftest", study_uid="selftest", position=5.0 * k,
                             hu=hus[k], pixel_spacing=(1.4, 1.4)) for k in (3, 4)]
    return _SMOKE


def check_policy(state: BundleState, rel: Release, cur: Bundle | None, automatic: bool) -> None:
    """Raise UpdateStop (policy, refused) unless the release may replace `cur`: a known name, not blocked (automatic
    installs), newer than the active version or a rollback order (signed with the release) naming the active one."""
    name, version, sha256 = rel.name, rel.version, rel.manifest_sha256
    if name not in REQUIRED:
        raise UpdateStop("policy", "refused", f"unknown bundle name {name!r} (this appliance uses "
                                              f"{', '.join(REQUIRED)})")
    if automatic and sha256 in (blocked := state.blocked()):
        raise UpdateStop("policy", "refused", f"bundle {name} {version} was blocked: {blocked[sha256]}")
    if cur is None:
        return
    new, have = parse_version(version), parse_version(cur.version)
    if new > have:
        return
    rb = list(rel.rollback_from)
    if rb:
        if cur.version in rb:
            return
        raise UpdateStop("policy", "refused", f"rollback order to {version} applies to {', '.join(rb)}, "
                                              f"the active version is {cur.version}")
    if new == have:
        raise UpdateStop("policy", "refused", f"version {version} is not newer than the active {cur.version} "
                                              "(replay refused)")
    raise UpdateStop("policy", "refused", f"version {version} is older than the active {cur.version} "
                                          "(downgrade refused; a signed rollback order is needed)")


def load_and_selftest(state: BundleState, config: AnalysisConfig, b: Bundle,
                      dest: Path) -> tuple[Any, dict[str, Any]]:
    """Load an Analyzer on the candidate set (the new bundle + the others in use) and run the self-tests."""
    from appliance.inference.adapter import AdapterError
    from appliance.pipeline.analyzer import Analyzer

    cand = state.new_staging("candidate")
    cand.mkdir(parents=True)
    try:
        for name in REQUIRED:
            if name == b.name:
                src = dest
            else:
                other, _ = state.effective(name)
                if other is None:
                    raise UpdateStop("load", "failed", f"no {name} bundle to run with")
                src = other.path
            (cand / name).symlink_to(Path(src).resolve())
        cfg = dataclasses.replace(config, bundle_dir="")
        try:
            analyzer = Analyzer.load(cfg, cand)
        except (BundleError, AdapterError, OSError, RuntimeError, ValueError) as e:
            raise UpdateStop("load", "failed", f"the new bundle does not load: {e}") from None
    finally:
        shutil.rmtree(cand, ignore_errors=True)
    part = analyzer.lesion if b.name == "lesion" else analyzer.valid_area
    if part is None or part.bundle.sha256 != b.sha256:
        raise UpdateStop("load", "failed", "the analyzer did not pick up the new bundle")
    try:
        stats = part.bundle.selftest(part.adapter)
    except BundleError as e:
        raise UpdateStop("selftest", "failed", str(e)) from None
    except Exception as e:
        raise UpdateStop("selftest", "failed", f"self-test could not run: {e}") from None
    try:
        findings = analyzer.findings(_smoke_slices())
    except Exception as e:
        raise UpdateStop("selftest", "failed", f"the pipeline failed on synthetic slices: {e}") from None
    stats = {k: round(v, 6) for k, v in stats.items()}
    stats["backend"] = part.adapter.backend
    stats["precision"] = part.adapter.precision
    stats["smoke_slices"] = len(findings)
    return analyzer, stats


class Installer:
    """Runs one install at a time (the updater's worker thread calls it); reports every step."""

    def __init__(self, state: BundleState, config: AnalysisConfig, report: UpdateReporter,
                 wait_idle: Callable[[], Any] | None, callbacks: list[Callable[[Any], None]],
                 confirmation: Confirmation) -> None:
        self.state, self.config, self.report = state, config, report
        self.wait_idle, self.callbacks, self.confirmation = wait_idle, callbacks, confirmation

    def install_path(self, path: str | Path, targets: Targets | None, automatic: bool = False) -> InstallResult:
        """Install a bundle directory or tar archive that `targets` (verified) names by its manifest sha256."""
        src = Path(path)
        if src.is_dir():
            staged = copy_durable(src, self.state.new_staging(src.name))
        elif src.is_file():
            staged = unpack(src, self.state.new_staging(src.stem))
        else:
            raise BundleError(f"{src}: no such bundle directory or archive")
        try:
            b = whole_bundle(staged)
        except BundleError as e:
            shutil.rmtree(staged, ignore_errors=True)
            self.report("verify", "refused", str(e))
            return InstallResult("refused", "verify", str(e))
        match = [r for r in (releases(targets.targets)[0] if targets else []) if r.manifest_sha256 == b.sha256]
        if not match:
            shutil.rmtree(staged, ignore_errors=True)
            reason = (f"{b.name} {b.version} (manifest sha256 {b.sha256[:12]}…) is not in the trusted targets "
                      "metadata: not signed by the targets role")
            self.report("verify", "refused", reason, b.ref())
            return InstallResult("refused", "verify", reason, b.ref())
        return self.install(staged, match[0], automatic)

    def install(self, staged: Path, rel: Release, automatic: bool) -> InstallResult:
        ref = rel.ref
        cur, _ = self.state.effective(rel.name)
        previous = cur.ref() if cur is not None else None
        dest: Path | None = None
        try:
            crashpoint("staged")
            try:
                b = whole_bundle(staged)
            except BundleError as e:
                raise UpdateStop("verify", "refused", str(e)) from None
            if b.sha256 != rel.manifest_sha256 or b.name != rel.name or b.version != rel.version:
                raise UpdateStop("verify", "refused", f"the bundle is not the signed release {rel.name} {rel.version} "
                                                      "(manifest.json differs from the sha256 in the targets metadata)")
            ref = b.ref()
            cur, _ = self.state.effective(b.name)
            previous = cur.ref() if cur is not None else None
            if cur is not None and cur.sha256 == b.sha256:
                shutil.rmtree(staged, ignore_errors=True)
                return InstallResult("unchanged", "policy", f"{b.name} {b.version} is already active", ref, previous)
            check_policy(self.state, rel, cur, automatic)
            with self.state.lock():
                dest = self.state.store_dir_for(b)
                self.state.commit(staged, dest)
                self.report("selftest", "progress", None, ref, previous, {"release": rel.path})
                analyzer, stats = load_and_selftest(self.state, self.config, b, dest)
                crashpoint("selftested")
                self.report("wait_idle", "progress", None, ref, previous)
                try:
                    idle = self.wait_idle() if self.wait_idle is not None else None
                    gate = idle if isinstance(idle, contextlib.AbstractContextManager) else contextlib.nullcontext()
                    gate.__enter__()
                except TimeoutError as e:
                    raise UpdateStop("wait_idle", "failed", f"studies kept the appliance busy: {e}") from None
                try:
                    old = self.state.switch(b.name, dest)
                    self.confirmation.set_pending({"name": b.name, "sha256": b.sha256, "version": b.version,
                                                   "ok": 0, "previous": previous})
                    crashpoint("activated")
                    try:
                        for cb in self.callbacks:
                            cb(analyzer)
                    except Exception as e:
                        log.exception("activation callback failed")
                        self.report("activate", "failed", f"the appliance could not switch: {e}", ref, previous)
                        return self.confirmation.rollback_locked(b.name, f"activation failed: {e}", automatic=True)
                finally:
                    gate.__exit__(None, None, None)
                self.state.prune()
            detail = {"selftest": stats, "store": dest.name, "previous_store": old.name if old else None}
            self.report("activate", "installed", None, ref, previous, detail)
            return InstallResult("installed", "activate", None, ref, previous, detail)
        except UpdateStop as e:
            shutil.rmtree(staged, ignore_errors=True)
            if dest is not None and e.step in ("load", "selftest", "wait_idle"):
                with self.state.lock():
                    if dest.exists() and dest.resolve() not in self.state.referenced():
                        shutil.rmtree(dest, ignore_errors=True)
                if automatic and ref and e.step != "wait_idle":
                    self.state.block(ref["sha256"], f"{e.step} failed: {e.reason}")
            self.report(e.step, e.outcome, e.reason, ref, previous)
            return InstallResult(e.outcome, e.step, e.reason, ref, previous)
        except Exception as e:  # disk full, permissions…: the old set stays active
            log.exception("install failed")
            shutil.rmtree(staged, ignore_errors=True)
            reason = f"{type(e).__name__}: {e}"
            self.report("store", "failed", reason, ref, previous)
            return InstallResult("failed", "store", reason, ref, previous)
