"""Fleet updates: announcement → transfer → verify → policy → store → load + self-test → wait until idle →
atomic switch → first analyses → confirmed (or rolled back).

A bad, forged, older or damaged bundle never becomes active: the signature (manifest.sig by a trusted key) and
every file hash are checked before anything is stored; a version not newer than the active one is refused unless
a signed rollback order names the active version (manifest "rollback": {"from": [...]}); the new bundle must load
with the others and reproduce its selftest.npz on the configured backend before the switch; when the first
analyses with it fail, the previous bundle comes back by itself. Every step and outcome is published (retained)
on `<prefix>/<device>/update` and appended to <state>/bundles/history.jsonl.

This module takes the announcements and transfers in and runs the installs on its worker thread; the install
itself is appliance.fleet.install, the probation after a switch appliance.fleet.confirm, the reports
appliance.fleet.reports. The daemon wires it with three calls (see `Updater.__init__`, `handle_message`,
`on_activated`) and reports each analysis after a switch through `report_first_analysis(ok)`. Messages are handled
without blocking: transfers are written to disk as they arrive, installs run on one worker thread.
"""
from __future__ import annotations

import hashlib
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
from appliance.fleet.announce import Announcement, chunk_base, parse_topic
from appliance.fleet.confirm import Confirmation
from appliance.fleet.install import Installer, check_policy
from appliance.fleet.reports import InstallResult, Publish, UpdateReporter, UpdateStop
from appliance.fleet.signing import TrustedKey, load_trust
from appliance.fleet.bundle_store import BundleState
from appliance.fleet.transfer import (MAX_BUNDLE_BYTES, TransferError, assemble, check_chunk, copy_durable, fetch_url,
                                      unpack)
from appliance.inference.bundle import BundleError

log = logging.getLogger(__name__)

# the project's public keys: appliance/trust (a link to config/trust in the source tree, a copy in a wheel).
# Every ctriage-project-*.pub there is trusted, so a key can be rotated without orphaning bundles signed before.
PROJECT_TRUST_DIR = Path(__file__).resolve().parents[1] / "trust"


def project_keys() -> list[Path]:
    """The shipped project public keys, oldest first (k1, k2, ...)."""
    return sorted(PROJECT_TRUST_DIR.glob("ctriage-project-*.pub"))


def default_trust_keys(configured: list[str] | tuple[str, ...] = (),
                       extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """fleet.trust_keys when set (a site's own keys replace the project keys), else the shipped project keys;
    plus keys given on the command line (`ctriage run --trust-key`)."""
    base = [str(k) for k in configured] or [str(k) for k in project_keys()]
    return base + [str(k) for k in extra if str(k) not in base]


@dataclass
class _Download:
    ann: Announcement
    key: str  # hash of the announcement payload
    dir: Path
    deadline: float
    got: set[int] = field(default_factory=set)
    queued: bool = False

    @property
    def complete(self) -> bool:
        return len(self.got) == len(self.ann.chunks)


class Updater:
    def __init__(self, state_dir: str | Path, trust_keys: list[str | Path | TrustedKey],
                 analysis_config: AnalysisConfig | None = None, publish: Publish | None = None,
                 wait_idle: Callable[[], Any] | None = None, *, device: str = "ct-room-1", prefix: str = "ctriage",
                 groups: list[str] | tuple[str, ...] = (), auto_install: bool = True,
                 shipped_dir: str | Path | None = None, confirm_after: int = 3, transfer_timeout_s: float = 600.0,
                 url_ca_file: str = "", recover: bool = True) -> None:
        """state_dir: the appliance state directory; trust_keys: public key files (or TrustedKeys);
        publish(topic, payload, retain): the daemon's MQTT publish; wait_idle(): returns when no study is in flight
        (it may return a context manager that keeps new studies out until the swap is done)."""
        self.state = BundleState(state_dir, shipped_dir)
        self.trust = load_trust(list(trust_keys))
        self.config = analysis_config or AnalysisConfig()
        self.wait_idle = wait_idle
        self.device, self.prefix, self.groups = device, prefix.rstrip("/"), tuple(groups)
        self.auto_install = auto_install
        self.transfer_timeout_s, self.url_ca_file = transfer_timeout_s, url_ca_file
        self._callbacks: list[Callable[[Any], None]] = []
        self._lock = threading.RLock()
        self._downloads: dict[str, _Download] = {}
        self._early_bytes: dict[tuple[str, str], int] = {}
        self._handled: dict[str, str] = {}  # announcement payload hash → outcome, so redelivery is quiet
        self._jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        self._busy = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._report = UpdateReporter(self.state, device, self.update_topic, publish)
        self.confirmation = Confirmation(self.state, self.config, self._report, self._callbacks, confirm_after)
        self.installer = Installer(self.state, self.trust, self.config, self._report, wait_idle, self._callbacks,
                                   self.confirmation)
        if recover:
            events = self.state.recover()
            if events:
                self._report("startup", "repaired", "; ".join(events))

    @classmethod
    def from_config(cls, cfg: Config, publish: Publish | None = None, wait_idle: Callable[[], Any] | None = None,
                    extra_trust: list[str] | tuple[str, ...] = (), **kw: Any) -> "Updater":
        keys = default_trust_keys(cfg.fleet.trust_keys, extra_trust)
        return cls(cfg.state_path, keys, cfg.analysis, publish, wait_idle, device=cfg.device_id,
                   prefix=cfg.mqtt.prefix, groups=cfg.fleet.groups, auto_install=cfg.fleet.auto_install, **kw)

    @property
    def update_topic(self) -> str:
        return f"{self.prefix}/{self.device}/update"

    @property
    def subscription(self) -> str:
        """The topic filter the daemon routes to handle_message."""
        return f"{self.prefix}/fleet/bundle/#"

    def on_activated(self, callback: Callable[[Any], None]) -> None:
        """callback(analyzer) after each switch or rollback, with an Analyzer already loaded on the new set."""
        self._callbacks.append(callback)

    # ---- messages (called on the MQTT network thread: never blocks long, never raises) -----------------------

    def handle_message(self, topic: str, payload: bytes) -> None:
        try:
            parsed = parse_topic(self.prefix, topic)
            if parsed is None or not payload:
                return  # not ours, or a retained message being cleared
            name, version, index = parsed
            if version is None:
                self._on_announcement(name, bytes(payload))
            else:
                self._on_chunk(name, version, int(index or 0), bytes(payload))
        except Exception:
            log.exception("fleet message on %s could not be handled", topic)

    def _on_announcement(self, topic_name: str, payload: bytes) -> None:
        key = hashlib.sha256(payload).hexdigest()
        with self._lock:
            if key in self._handled:
                return
            dl = self._downloads.get(topic_name)
            if dl is not None and dl.key == key:
                return
        try:
            ann = Announcement.parse(payload, self.prefix, topic_name)
        except BundleError as e:
            self._finish(key, topic_name, None)
            self._report("announce", "refused", str(e), {"name": topic_name, "version": "", "sha256": ""})
            return
        ref = {"name": ann.name, "version": ann.version, "sha256": ann.sha256}
        if not ann.targets(self.device, self.groups):
            log.debug("bundle %s %s is not for this device", ann.name, ann.version)
            self._finish(key, ann.name, ann.version)
            return
        cur, _ = self.state.effective(ann.name)
        if cur is not None and cur.sha256 == ann.sha256:
            log.debug("bundle %s %s is already active", ann.name, ann.version)
            self._finish(key, ann.name, ann.version)
            return
        previous = cur.ref() if cur is not None else None
        try:
            if not self.auto_install:
                raise UpdateStop("policy", "refused", "automatic installs are off (fleet.auto_install = false)")
            if self.config.bundle_dir:
                raise UpdateStop("policy", "refused", "analysis.bundle_dir pins the bundles; fleet updates are off")
            signer = ann.verify(self.trust)
            check_policy(self.state, ann.name, ann.version, ann.sha256, ann.manifest, cur, automatic=True)
        except UpdateStop as e:
            self._finish(key, ann.name, ann.version)
            self._report(e.step, e.outcome, e.reason, ref, previous)
            return
        except BundleError as e:
            self._finish(key, ann.name, ann.version)
            self._report("verify", "refused", str(e), ref, previous)
            return
        detail = {"signer": signer.key_id, "bytes": ann.archive_size,
                  "via": "mqtt" if ann.chunks else "url", "chunks": len(ann.chunks)}
        if ann.rollback_from:
            detail["rollback_from"] = ann.rollback_from
        self._report("transfer", "progress", None, ref, previous, detail)
        if not ann.chunks:
            self._submit(lambda: self._install_from(ann, None, key))
            return
        d = self.state.staging / f"chunks-{ann.name}-{ann.version}"
        dl = _Download(ann, key, d, time.monotonic() + self.transfer_timeout_s)
        with self._lock:
            old = self._downloads.pop(ann.name, None)
            if old is not None and old.dir != d:
                shutil.rmtree(old.dir, ignore_errors=True)
            self._downloads[ann.name] = dl
        self._ensure_worker()  # it also watches the transfer's deadline
        if d.is_dir():  # chunks that arrived before the announcement
            for f in sorted(d.iterdir()):
                if not f.name.isdigit():
                    continue
                try:
                    check_chunk(int(f.name), f.read_bytes(), ann.chunks)
                except TransferError as e:
                    self._fail_download(dl, str(e))
                    return
                dl.got.add(int(f.name))
        self._maybe_complete(dl)

    def _on_chunk(self, name: str, version: str, index: int, data: bytes) -> None:
        with self._lock:
            dl = self._downloads.get(name)
        if dl is not None and dl.ann.version == version:
            if dl.queued or index in dl.got:
                return  # redelivered (reconnect) while we have it: never rewrite a chunk being assembled
            try:
                check_chunk(index, data, dl.ann.chunks)
            except TransferError as e:
                self._fail_download(dl, str(e))
                return
            dl.dir.mkdir(parents=True, exist_ok=True)
            (dl.dir / str(index)).write_bytes(data)  # transient: the assembled archive is what gets fsynced
            dl.got.add(index)
            self._maybe_complete(dl)
            return
        # a chunk before its announcement: keep it (bounded) unless it is of the version already active
        cur, _ = self.state.effective(name)
        if cur is not None and cur.version == version:
            return
        with self._lock:
            used = self._early_bytes.get((name, version), 0) + len(data)
            if used > MAX_BUNDLE_BYTES or sum(self._early_bytes.values()) + len(data) > 2 * MAX_BUNDLE_BYTES:
                log.warning("dropping chunk %s/%s/%d: too much unannounced data", name, version, index)
                return
            self._early_bytes[(name, version)] = used
        d = self.state.staging / f"chunks-{name}-{version}"
        d.mkdir(parents=True, exist_ok=True)
        (d / str(index)).write_bytes(data)

    def _maybe_complete(self, dl: _Download) -> None:
        with self._lock:
            if not dl.complete or dl.queued or self._downloads.get(dl.ann.name) is not dl:
                return
            dl.queued = True
        self._submit(lambda: self._install_from(dl.ann, dl, dl.key))

    def _fail_download(self, dl: _Download, reason: str) -> None:
        with self._lock:
            if self._downloads.get(dl.ann.name) is not dl:
                return
            del self._downloads[dl.ann.name]
        shutil.rmtree(dl.dir, ignore_errors=True)
        if dl.ann.url:
            log.warning("inline transfer of %s %s failed (%s); trying %s", dl.ann.name, dl.ann.version, reason,
                        dl.ann.url)
            self._submit(lambda: self._install_from(dl.ann, None, dl.key))
            return
        self._finish(dl.key, dl.ann.name, dl.ann.version)
        cur, _ = self.state.effective(dl.ann.name)
        self._report("transfer", "failed", reason, {"name": dl.ann.name, "version": dl.ann.version,
                                                    "sha256": dl.ann.sha256}, cur.ref() if cur else None)

    def _finish(self, key: str, name: str, version: str | None) -> None:
        """Remember an announcement as handled; drop chunks kept for it."""
        with self._lock:
            self._handled[key] = name
            if len(self._handled) > 1000:
                self._handled.pop(next(iter(self._handled)))
            if version is not None:
                self._early_bytes.pop((name, version), None)
        if version is not None:
            shutil.rmtree(self.state.staging / f"chunks-{name}-{version}", ignore_errors=True)

    def check_timeouts(self) -> None:
        """Fail transfers that did not complete in time (called by the worker every half second)."""
        now = time.monotonic()
        with self._lock:
            late = [dl for dl in self._downloads.values() if not dl.queued and now > dl.deadline]
        for dl in late:
            missing = len(dl.ann.chunks) - len(dl.got)
            where = chunk_base(self.prefix, dl.ann.name, dl.ann.version)
            self._fail_download(dl, f"transfer incomplete: {missing} of {len(dl.ann.chunks)} chunks missing after "
                                    f"{self.transfer_timeout_s:g} s (topic {where}/…)")

    # ---- worker ----------------------------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="ctriage-updater", daemon=True)
                self._thread.start()

    def _submit(self, job: Callable[[], None]) -> None:
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

    def _install_from(self, ann: Announcement, dl: _Download | None, key: str) -> None:
        ref = {"name": ann.name, "version": ann.version, "sha256": ann.sha256}
        archive = self.state.new_staging(f"{ann.name}-{ann.version}").with_suffix(".tar")
        try:
            if dl is not None:
                assemble(dl.dir, len(ann.chunks), archive, ann.archive_size, ann.archive_sha256)
            else:
                fetch_url(str(ann.url), archive, ann.archive_size, ann.archive_sha256, ca_file=self.url_ca_file)
            staged = unpack(archive, self.state.new_staging(f"{ann.name}-{ann.version}"))
        except BundleError as e:
            cur, _ = self.state.effective(ann.name)
            self._report("transfer", "failed", str(e), ref, cur.ref() if cur else None)
            return
        finally:
            archive.unlink(missing_ok=True)
            with self._lock:
                if self._downloads.get(ann.name) is dl and dl is not None:
                    del self._downloads[ann.name]
            self._finish(key, ann.name, ann.version)
        self.installer.install(staged, ann, automatic=True)

    def install_path(self, path: str | Path, automatic: bool = False) -> InstallResult:
        """Install a bundle directory or a tar archive (as `ctriage models publish --archive-out` writes)."""
        src = Path(path)
        if src.is_dir():
            staged = copy_durable(src, self.state.new_staging(src.name))
        elif src.is_file():
            staged = unpack(src, self.state.new_staging(src.stem))
        else:
            raise BundleError(f"{src}: no such bundle directory or archive")
        return self.installer.install(staged, None, automatic=automatic)

    # ---- after activation ------------------------------------------------------------------------------------

    def report_first_analysis(self, ok: bool, reason: str = "") -> None:
        """The daemon calls this after each analysis; the first ones after a switch confirm it or roll it back."""
        if self.confirmation.pending:  # cached: this runs after every analysed batch
            self._submit(lambda: self.confirmation.after_analysis(ok, reason))

    def rollback(self, name: str, reason: str = "ordered by the operator") -> InstallResult:
        """Go back to previous/<name> (else the shipped bundle); the bundle left is blocked from automatic installs."""
        return self.confirmation.rollback(name, reason)
