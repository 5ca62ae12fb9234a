"""Fleet updates: TUF metadata → the release this device should run → transfer → verify → policy → store →
load + self-test → wait until idle → atomic switch → first analyses → confirmed (or rolled back).

What to install comes only from targets metadata that TUF verified (appliance.fleet.trust). A release's archive
must have the signed length and sha256 before it is unpacked, and manifest.json the signed sha256. A version not
newer than the active one is refused unless the release's rollback order names the active version; the bundle must
load and pass its self-test before the switch, and the first analyses after it (else it is rolled back). Steps and
outcomes go (retained) to `<prefix>/<device>/update` and <state>/bundles/history.jsonl, what the appliance trusts
to `<prefix>/<device>/trust`. Refused metadata never stops the analysis: the bundles in use stay.

The daemon wires it with `handle_message`, `on_activated` and `report_first_analysis(ok)`. Messages never block:
metadata is checked on the worker thread, chunks are written to disk as they arrive.
"""
from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import AnalysisConfig, Config
from appliance.fleet.bundle_store import BundleState
from appliance.fleet.confirm import Confirmation
from appliance.fleet.distribution import chunk_base, parse_topic
from appliance.fleet.install import Installer, check_policy
from appliance.fleet.release import Release, choose, releases
from appliance.fleet.reports import InstallResult, Publish, UpdateReporter, UpdateStop, trust_payload
from appliance.fleet.transfer import (MAX_BUNDLE_BYTES, ChunkSpec, TransferError, assemble, check_chunk,
                                      fetch_url, unpack)
from appliance.fleet.trust import PROJECT_ANCHOR, DirFetcher, RetainedFetcher, TrustError, TrustStore, trust_anchor
from appliance.inference.bundle import BundleError

log = logging.getLogger(__name__)


@dataclass
class _Download:
    rel: Release
    dir: Path
    deadline: float
    got: set[int] = field(default_factory=set)
    queued: bool = False

    @property
    def specs(self) -> list[ChunkSpec]:
        return [ChunkSpec(s, h) for s, h in zip(self.rel.chunk_sizes(), self.rel.chunks)]

    complete = property(lambda self: len(self.got) == len(self.rel.chunks))


class Updater:
    def __init__(self, state_dir: str | Path, trust_root: str | Path | None = PROJECT_ANCHOR,
                 analysis_config: AnalysisConfig | None = None, publish: Publish | None = None,
                 wait_idle: Callable[[], Any] | None = None, *, legacy_keys: list | tuple = (),
                 device: str = "ct-room-1", prefix: str = "ctriage", groups: list[str] | tuple[str, ...] = (),
                 auto_install: bool = True, shipped_dir: str | Path | None = None, confirm_after: int = 3,
                 transfer_timeout_s: float = 600.0, url_ca_file: str = "", recover: bool = True,
                 settle_s: float = 0.3) -> None:
        """state_dir: the appliance state directory; trust_root: the root.json to start from when <state>/trust
        holds none (None: wait for a first root signed by one of `legacy_keys`); publish(topic, payload, retain):
        the daemon's MQTT publish; wait_idle(): returns when no study is in flight (it may return a context
        manager that keeps new studies out until the swap is done)."""
        self.state = BundleState(state_dir, shipped_dir)
        self.trust = TrustStore(state_dir, trust_root, legacy_keys)
        self.fetcher = RetainedFetcher()
        self.config = analysis_config or AnalysisConfig()
        self.device, self.prefix, self.groups = device, prefix.rstrip("/"), tuple(groups)
        self.auto_install = auto_install
        self.transfer_timeout_s, self.url_ca_file, self.settle_s = transfer_timeout_s, url_ca_file, settle_s
        self._callbacks: list[Callable[[Any], None]] = []
        self._lock = threading.RLock()
        self._downloads: dict[str, _Download] = {}
        self._early_bytes: dict[tuple[str, str], int] = {}
        self._handled: set[tuple[str, str]] = set()  # (target path, archive sha256) acted on: redelivery is quiet
        self._said: dict[str, str] = {}  # what was last reported about metadata, by subject: said once
        self._refresh_queued = False
        self._next_stale_check = 0.0
        self._jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        self._busy = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._report = UpdateReporter(self.state, device, self.update_topic, publish)
        self._publish, self._trust_said = publish, ""
        self.confirmation = Confirmation(self.state, self.config, self._report, self._callbacks, confirm_after)
        self.installer = Installer(self.state, self.config, self._report, wait_idle, self._callbacks,
                                   self.confirmation)
        if recover:
            events = self.state.recover()
            if events:
                self._report("startup", "repaired", "; ".join(events))
        try:
            self.trust.bootstrap()
        except TrustError as e:
            self._report("metadata", "refused", e.reason)

    @classmethod
    def from_config(cls, cfg: Config, publish: Publish | None = None, wait_idle: Callable[[], Any] | None = None,
                    extra_trust: list[str] | tuple[str, ...] = (), trust_root: str = "", **kw: Any) -> "Updater":
        legacy = [*cfg.fleet.trust_keys, *(k for k in extra_trust if k not in cfg.fleet.trust_keys)]
        anchor = trust_anchor(trust_root or cfg.fleet.trust_root, legacy)
        return cls(cfg.state_path, anchor, cfg.analysis, publish, wait_idle, legacy_keys=legacy,
                   device=cfg.device_id, prefix=cfg.mqtt.prefix, groups=cfg.fleet.groups,
                   auto_install=cfg.fleet.auto_install, **kw)

    @property
    def update_topic(self) -> str:
        return f"{self.prefix}/{self.device}/update"

    @property
    def subscription(self) -> str:
        """The topic filter the daemon routes to handle_message."""
        return f"{self.prefix}/fleet/#"

    def on_activated(self, callback: Callable[[Any], None]) -> None:
        """callback(analyzer) after each switch or rollback, with an Analyzer already loaded on the new set."""
        self._callbacks.append(callback)

    # ---- messages (called on the MQTT network thread: never blocks long, never raises) -----------------------

    def handle_message(self, topic: str, payload: bytes) -> None:
        try:
            parsed = parse_topic(self.prefix, topic)
            if parsed is None:
                return
            kind, name, version, index = parsed
            if kind == "metadata":
                self.fetcher.put(name, bytes(payload))
                if payload:
                    self._schedule_refresh()
            elif payload:
                self._on_chunk(name, str(version), int(index or 0), bytes(payload))
        except Exception:
            log.exception("fleet message on %s could not be handled", topic)

    def _schedule_refresh(self) -> None:
        with self._lock:
            if self._refresh_queued:
                return
            self._refresh_queued = True
        self._submit(self._refresh)

    def _say(self, subject: str, step: str, outcome: str, reason: str, detail: dict | None = None) -> None:
        """Report about metadata once per distinct reason (retained metadata is redelivered at every reconnect)."""
        if self._said.get(subject) == reason:
            return
        self._said[subject] = reason
        self._report(step, outcome, reason, None, None, detail)

    def _refresh(self) -> list[Release]:
        """TUF refresh over what the broker holds, then act on the releases for this device (worker thread)."""
        time.sleep(self.settle_s)  # let a burst of retained messages land first
        with self._lock:
            self._refresh_queued = False
        fetcher = self.fetcher
        before = self.trust.root_version()
        try:
            first = self.trust.migrate(fetcher)
            if first is not None:
                self._say("root", "metadata", "rotated", f"first root v{first} accepted: signed by a legacy key "
                          "this appliance trusted (migration); from now on only the TUF chain counts",
                          {"root_version": first})
            targets = self.trust.refresh(fetcher)
        except TrustError as e:
            if e.kind == "incomplete":
                log.debug("fleet metadata incomplete: %s", e.reason)
                return []
            self._say("metadata", "metadata", "expired" if e.kind == "expired" else "refused", e.reason,
                      {"kind": e.kind, "root_version": self.trust.root_version()})
            self.publish_trust()
            return []
        self._said.pop("metadata", None)
        after = self.trust.root_version()
        if after != before and before:
            roles = self.trust.describe().get("roles", {})
            self._say("root", "metadata", "rotated", f"root v{before} → v{after}: keys and thresholds "
                      + "; ".join(f"{r} {x['threshold']} of {', '.join(x['keys'])}" for r, x in roles.items()),
                      {"root_version": after, "roles": roles})
        self.publish_trust()
        rels, bad = releases(targets.targets)
        for b in bad:
            log.warning("targets metadata v%d: %s", targets.version, b)
        chosen = choose(rels, self.device, self.groups)
        for rel in chosen.values():
            self._consider(rel, targets.version)
        return list(chosen.values())

    def _consider(self, rel: Release, targets_version: int) -> None:
        key = (rel.path, rel.sha256)
        with self._lock:
            if key in self._handled or (rel.name in self._downloads
                                        and self._downloads[rel.name].rel.sha256 == rel.sha256):
                return
            self._handled.add(key)
        cur, _ = self.state.effective(rel.name)
        if cur is not None and cur.sha256 == rel.manifest_sha256:
            log.debug("bundle %s %s is already active", rel.name, rel.version)
            return
        previous = cur.ref() if cur is not None else None
        try:
            if not self.auto_install:
                raise UpdateStop("policy", "refused", "automatic installs are off (fleet.auto_install = false)")
            if self.config.bundle_dir:
                raise UpdateStop("policy", "refused", "analysis.bundle_dir pins the bundles; fleet updates are off")
            check_policy(self.state, rel, cur, automatic=True)
        except UpdateStop as e:
            self._forget_chunks(rel.name, rel.version)
            self._report(e.step, e.outcome, e.reason, rel.ref, previous)
            return
        detail = {"targets_version": targets_version, "root_version": self.trust.root_version(),
                  "bytes": rel.length, "via": "mqtt" if rel.chunks else "url", "chunks": len(rel.chunks)}
        if rel.rollback_from:
            detail["rollback_from"] = list(rel.rollback_from)
        self._report("transfer", "progress", None, rel.ref, previous, detail)
        if not rel.chunks:
            self._submit(lambda: self._install_from(rel, None))
            return
        d = self.state.staging / f"chunks-{rel.name}-{rel.version}"
        dl = _Download(rel, d, time.monotonic() + self.transfer_timeout_s)
        with self._lock:
            old = self._downloads.pop(rel.name, None)
            if old is not None and old.dir != d:
                shutil.rmtree(old.dir, ignore_errors=True)
            self._downloads[rel.name] = dl
        self._ensure_worker()  # it also watches the transfer's deadline
        if d.is_dir():  # chunks that arrived before the metadata
            for f in sorted(d.iterdir()):
                if f.name.isdigit():
                    try:
                        check_chunk(int(f.name), f.read_bytes(), dl.specs)
                    except TransferError as e:
                        self._fail_download(dl, str(e))
                        return
                    dl.got.add(int(f.name))
        self._maybe_complete(dl)

    def _on_chunk(self, name: str, version: str, index: int, data: bytes) -> None:
        with self._lock:
            dl = self._downloads.get(name)
        if dl is not None and dl.rel.version == version:
            if dl.queued or index in dl.got:
                return  # redelivered (reconnect) while we have it: never rewrite a chunk being assembled
            try:
                check_chunk(index, data, dl.specs)
            except TransferError as e:
                self._fail_download(dl, str(e))
                return
            dl.dir.mkdir(parents=True, exist_ok=True)
            (dl.dir / str(index)).write_bytes(data)  # transient: the assembled archive is what gets fsynced
            dl.got.add(index)
            self._maybe_complete(dl)
            return
        # a chunk before its metadata: keep it (bounded) unless it is of the version already active
        cur, _ = self.state.effective(name)
        if cur is not None and cur.version == version:
            return
        with self._lock:
            used = self._early_bytes.get((name, version), 0) + len(data)
            if used > MAX_BUNDLE_BYTES or sum(self._early_bytes.values()) + len(data) > 2 * MAX_BUNDLE_BYTES:
                log.warning("dropping chunk %s/%s/%d: too much data no release names", name, version, index)
                return
            self._early_bytes[(name, version)] = used
        d = self.state.staging / f"chunks-{name}-{version}"
        d.mkdir(parents=True, exist_ok=True)
        (d / str(index)).write_bytes(data)

    def _maybe_complete(self, dl: _Download) -> None:
        with self._lock:
            if not dl.complete or dl.queued or self._downloads.get(dl.rel.name) is not dl:
                return
            dl.queued = True
        self._submit(lambda: self._install_from(dl.rel, dl))

    def _fail_download(self, dl: _Download, reason: str) -> None:
        with self._lock:
            if self._downloads.get(dl.rel.name) is not dl:
                return
            del self._downloads[dl.rel.name]
        shutil.rmtree(dl.dir, ignore_errors=True)
        if dl.rel.url:
            log.warning("inline transfer of %s %s failed (%s); trying %s", dl.rel.name, dl.rel.version, reason,
                        dl.rel.url)
            self._submit(lambda: self._install_from(dl.rel, None))
            return
        self._forget_chunks(dl.rel.name, dl.rel.version)
        cur, _ = self.state.effective(dl.rel.name)
        self._report("transfer", "failed", reason, dl.rel.ref, cur.ref() if cur else None)

    def _forget_chunks(self, name: str, version: str) -> None:
        with self._lock:
            self._early_bytes.pop((name, version), None)
        shutil.rmtree(self.state.staging / f"chunks-{name}-{version}", ignore_errors=True)

    def check_timeouts(self) -> None:
        """Fail transfers that did not complete in time; say once when the trusted metadata went stale (worker
        every half second, daemon every few seconds)."""
        now = time.monotonic()
        with self._lock:
            late = [dl for dl in self._downloads.values() if not dl.queued and now > dl.deadline]
        for dl in late:
            missing = len(dl.rel.chunks) - len(dl.got)
            where = chunk_base(self.prefix, dl.rel.name, dl.rel.version)
            self._fail_download(dl, f"transfer incomplete: {missing} of {len(dl.rel.chunks)} chunks missing after "
                                    f"{self.transfer_timeout_s:g} s (topic {where}/…)")
        if now >= self._next_stale_check:
            self._next_stale_check = now + 30.0
            self.check_freshness()

    def check_freshness(self) -> str | None:
        """Report (once) that the trusted timestamp or root expired: a freeze, or an operator who forgot."""
        why = self.trust.stale()
        if why is not None:
            self._say("metadata", "metadata", "expired", why, {"kind": "expired",
                                                                "root_version": self.trust.root_version()})
        self.publish_trust(why)
        return why

    def publish_trust(self, stale: str | None = None) -> dict[str, Any]:
        """Publish (retained, when it changed) what this appliance trusts on `<prefix>/<device>/trust`."""
        p = trust_payload(self.device, self.trust.describe(), stale or self.trust.stale())
        key = repr({k: v for k, v in p.items() if k != "created"})
        if self._publish is not None and key != self._trust_said:
            try:
                self._publish(f"{self.prefix}/{self.device}/trust", p, True)
                self._trust_said = key
            except Exception as e:  # the broker being away never stops an update
                log.warning("cannot publish trust state: %s", e)
        return p

    # ---- worker ----------------------------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="ctriage-updater", daemon=True)
                self._thread.start()

    def _submit(self, job: Callable[[], Any]) -> None:
        with self._lock:
            self._busy += 1
        self._ensure_worker()
        self._jobs.put(job)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.5)
            except queue.Empty:
                self.check_timeouts()
                continue
            try:
                job()
            except Exception:
                log.exception("update job failed")
            finally:
                with self._lock:
                    self._busy -= 1

    def drain(self, timeout: float = 60.0) -> bool:
        """Wait until no job is queued or running (tests, shutdown). True when idle."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._busy == 0:
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    # ---- install ---------------------------------------------------------------------------------------------

    def _install_from(self, rel: Release, dl: _Download | None) -> None:
        archive = self.state.new_staging(f"{rel.name}-{rel.version}").with_suffix(".tar")
        try:
            if dl is not None:
                assemble(dl.dir, len(rel.chunks), archive, rel.length, rel.sha256)
            else:
                fetch_url(str(rel.url), archive, rel.length, rel.sha256, ca_file=self.url_ca_file)
            staged = unpack(archive, self.state.new_staging(f"{rel.name}-{rel.version}"))
        except BundleError as e:
            cur, _ = self.state.effective(rel.name)
            self._report("transfer", "failed", str(e), rel.ref, cur.ref() if cur else None)
            return
        finally:
            archive.unlink(missing_ok=True)
            with self._lock:
                if dl is not None and self._downloads.get(rel.name) is dl:
                    del self._downloads[rel.name]
            self._forget_chunks(rel.name, rel.version)
        self.installer.install(staged, rel, automatic=True)

    def refresh_from(self, repo: str | Path) -> list[Release]:
        """TUF refresh from a repository directory (`models install --repo`): the releases named; TrustError."""
        fetcher = DirFetcher(repo)
        self.trust.migrate(fetcher)  # a device with legacy keys only: its first root, once
        return releases(self.trust.refresh(fetcher).targets)[0]

    def install_path(self, path: str | Path, automatic: bool = False) -> InstallResult:
        """Install a bundle directory or a tar archive that the trusted targets metadata names."""
        return self.installer.install_path(path, self.trust.trusted_targets(), automatic)

    # ---- after activation ------------------------------------------------------------------------------------

    def report_first_analysis(self, ok: bool, reason: str = "") -> None:
        """The daemon calls this after each analysis; the first ones after a switch confirm it or roll it back."""
        if self.confirmation.pending:  # cached: this runs after every analysed batch
            self._submit(lambda: self.confirmation.after_analysis(ok, reason))

    def rollback(self, name: str, reason: str = "ordered by the operator") -> InstallResult:
        """Go back to previous/<name> (else the shipped bundle); the bundle left is blocked from automatic installs."""
        return self.confirmation.rollback(name, reason)
