"""Installed bundles in the state directory, laid out so that a power cut at any instant leaves a working set:

    <state>/bundles/
      staging/                 downloads, unpacking, candidates: never used by the analyzer; emptied on start
      store/<name>-<version>/  verified, unpacked bundles (a staging dir renamed here only once fully verified)
      active/<name>            symlink → ../store/<name>-<version>: what the analyzer loads (one entry per name)
      previous/<name>          symlink → the bundle that was active before (the rollback target)
      history.jsonl            every update step and outcome, one JSON object per line
      pending.json             an activation still waiting for its first analyses to succeed
      blocked.json             bundle sha256s that failed a self-test or were rolled back (not installed again
                               automatically)

Symlinks switch with os.replace of a temporary symlink (atomic); directories are fsynced after each change.
`active/` is used by the analyzer only when it holds a valid link for every required bundle name
(active_bundle_dir); otherwise the shipped bundles are.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.durable import atomic_write, fsync_dir
from appliance.fleet.transfer import copy_durable
from appliance.inference.bundle import Bundle, BundleError, default_bundle_dir, find_bundles, load_bundle, parse_version

log = logging.getLogger(__name__)

REQUIRED = ("valid-area", "lesion")
CRASH_ENV = "CTRIAGE_UPDATE_CRASH_AT"


def crashpoint(step: str) -> None:
    """Power-cut simulation for tests: exit at once (no cleanup, no flush) when CTRIAGE_UPDATE_CRASH_AT names step."""
    if os.environ.get(CRASH_ENV) == step:
        os._exit(75)


def active_bundle_dir(state_dir: str | Path) -> Path | None:
    """<state>/bundles/active when it holds a usable link for every required bundle, else None (use shipped)."""
    s = BundleState(state_dir)
    if not s.active.is_dir():
        return None
    for name in REQUIRED:
        if s.target("active", name) is None:
            return None
    return s.active


class BundleState:
    def __init__(self, state_dir: str | Path, shipped_dir: str | Path | None = None) -> None:
        self.root = Path(state_dir).expanduser() / "bundles"
        self.staging, self.store = self.root / "staging", self.root / "store"
        self.active, self.previous = self.root / "active", self.root / "previous"
        self.history_path = self.root / "history.jsonl"
        self.pending_path, self.blocked_path = self.root / "pending.json", self.root / "blocked.json"
        self.shipped_dir = Path(shipped_dir) if shipped_dir else default_bundle_dir()

    def ensure(self) -> None:
        for d in (self.root, self.staging, self.store, self.active, self.previous):
            d.mkdir(parents=True, exist_ok=True)

    # ---- locking ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, timeout: float = 30.0) -> Iterator[None]:
        """Exclusive lock on the bundle state (daemon and CLI may both change it)."""
        self.ensure()
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise BundleError(f"{self.root} is locked by another update (try again later)") from None
                    time.sleep(0.1)
            yield
        finally:
            os.close(fd)

    # ---- links -----------------------------------------------------------------------------------------------

    def target(self, kind: str, name: str) -> Path | None:
        """The store dir that `kind`/<name> points to, when it is a symlink into store/ holding a manifest."""
        link = self.root / kind / name
        if not link.is_symlink():
            return None
        try:
            real = link.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if real.parent != self.store.resolve() or not (real / "manifest.json").is_file():
            return None
        return real

    def links(self, kind: str) -> dict[str, Path | None]:
        d = self.root / kind
        if not d.is_dir():
            return {}
        return {p.name: self.target(kind, p.name) for p in sorted(d.iterdir()) if not p.name.startswith(".")}

    def set_link(self, kind: str, name: str, store_dir: Path, step: str = "") -> None:
        """Point kind/<name> at store_dir atomically (temp symlink + os.replace), then fsync the directory."""
        d = self.root / kind
        d.mkdir(parents=True, exist_ok=True)
        if store_dir.resolve().parent != self.store.resolve():
            raise BundleError(f"refusing to link {store_dir}: not in {self.store}")
        tmp = d / f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
        os.symlink(os.path.join("..", "store", store_dir.name), tmp)
        if step:
            crashpoint(step)
        os.replace(tmp, d / name)
        fsync_dir(d)

    def remove_link(self, kind: str, name: str) -> None:
        p = self.root / kind / name
        if p.is_symlink() or p.exists():
            p.unlink()
            fsync_dir(p.parent)

    def active_bundle(self, name: str) -> Bundle | None:
        t = self.target("active", name)
        return load_bundle(t, verify=False) if t else None

    def shipped(self) -> dict[str, Bundle]:
        return find_bundles(self.shipped_dir)

    def effective(self, name: str) -> tuple[Bundle | None, str]:
        """The bundle the analyzer uses for `name` now, and where it comes from ("active" or "shipped")."""
        if active_bundle_dir(self.root.parent) is not None:
            b = self.active_bundle(name)
            if b is not None:
                return b, "active"
        return self.shipped().get(name), "shipped"

    # ---- store -----------------------------------------------------------------------------------------------

    def new_staging(self, label: str) -> Path:
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging / f"{label}.{secrets.token_hex(4)}"

    def store_dir_for(self, b: Bundle) -> Path:
        """store/<name>-<version>, or …-<version>~<sha12> when a different bundle already holds that name."""
        d = self.store / f"{b.name}-{b.version}"
        if d.exists():
            try:
                if load_bundle(d, verify=False).sha256 == b.sha256:
                    return d
            except BundleError:
                pass
            if d in self.referenced():
                return self.store / f"{b.name}-{b.version}~{b.sha256[:12]}"
        return d

    def referenced(self) -> set[Path]:
        out = set()
        for kind in ("active", "previous"):
            for t in self.links(kind).values():
                if t is not None:
                    out.add(t)
        return out

    def commit(self, staged: Path, dest: Path, step: str = "stored") -> Path:
        """Rename a fully verified staging dir into store/ (atomic; replaces an unreferenced leftover)."""
        self.store.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            if dest.resolve() in self.referenced():
                raise BundleError(f"{dest.name} is in use; not replacing it")
            shutil.rmtree(dest)
        os.rename(staged, dest)
        fsync_dir(self.store)
        fsync_dir(self.staging)
        crashpoint(step)
        return dest

    def adopt_shipped(self, name: str) -> Path | None:
        """Copy the shipped bundle `name` into store/ (verified), so active/ can point at it. None if none shipped."""
        b = self.shipped().get(name)
        if b is None:
            return None
        dest = self.store_dir_for(b)
        if dest.is_dir():
            try:
                if load_bundle(dest, verify=True).sha256 == b.sha256:
                    return dest
            except BundleError:
                pass
        staged = copy_durable(b.path, self.new_staging(f"{name}-shipped"))
        load_bundle(staged, verify=True)
        return self.commit(staged, dest, step="adopted")

    def switch(self, name: str, store_dir: Path) -> Path | None:
        """Make store_dir the active bundle `name`; the old active one becomes previous/<name>. Returns the old.

        When active/ was not in use (shipped bundles), every required name is first linked to its shipped copy,
        so active/ is complete at every instant."""
        if active_bundle_dir(self.root.parent) is None:
            for other in REQUIRED:
                if self.target("active", other) is None:
                    adopted = self.adopt_shipped(other)
                    if adopted is not None:
                        self.set_link("active", other, adopted, step="seeded")
        old = self.target("active", name)
        if old is not None and old != store_dir.resolve():
            self.set_link("previous", name, old, step="previous")
        self.set_link("active", name, store_dir, step="link_tmp")
        crashpoint("switched")
        return old if old != store_dir.resolve() else None

    def prune(self, keep: set[Path] = frozenset()) -> list[str]:
        """Remove store dirs no link points to (leftovers of failed or interrupted installs)."""
        refs = self.referenced() | {k.resolve() for k in keep}
        removed = []
        if self.store.is_dir():
            for d in sorted(self.store.iterdir()):
                if d.resolve() not in refs:
                    shutil.rmtree(d, ignore_errors=True) if d.is_dir() and not d.is_symlink() else d.unlink()
                    removed.append(d.name)
            if removed:
                fsync_dir(self.store)
        return removed

    # ---- recovery --------------------------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """At start: empty staging/, drop temp links, make every active link resolve to a verified bundle (else the
        previous one, else the shipped one), complete active/ with shipped copies for missing names, adopt a newer
        shipped bundle (software upgrade), prune unreferenced store dirs. Returns what was repaired."""
        events: list[str] = []
        with self.lock():
            self.ensure()
            for p in list(self.staging.iterdir()):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()
            for kind in ("active", "previous"):
                for p in (self.root / kind).iterdir():
                    if p.name.startswith(".tmp-"):
                        p.unlink()
                        events.append(f"removed an unfinished link switch ({kind}/{p.name})")
            for name in list(self.links("previous")):
                if self._verified("previous", name) is None:
                    self.remove_link("previous", name)
                    events.append(f"previous/{name} did not resolve to a verified bundle: dropped")
            active = self.links("active")
            for name in active:
                if self._verified("active", name) is not None:
                    continue
                prev = self.target("previous", name)
                if prev is not None:
                    self.set_link("active", name, prev)
                    self.remove_link("previous", name)
                    events.append(f"active/{name} was broken: back to previous {prev.name}")
                    continue
                adopted = self.adopt_shipped(name)
                if adopted is not None:
                    self.set_link("active", name, adopted)
                    events.append(f"active/{name} was broken: back to shipped {adopted.name}")
                else:
                    self.remove_link("active", name)
                    events.append(f"active/{name} was broken and nothing to fall back to: removed")
            if any(self.target("active", n) for n in self.links("active")):
                blocked = self.blocked()
                for name in REQUIRED:
                    cur = self.target("active", name)
                    ship = self.shipped().get(name)
                    if cur is None:
                        adopted = self.adopt_shipped(name)
                        if adopted is not None:
                            self.set_link("active", name, adopted)
                            events.append(f"active/{name} was missing: linked the shipped {adopted.name}")
                    elif ship is not None and ship.sha256 not in blocked:
                        have = load_bundle(cur, verify=False)
                        if parse_version(ship.version) > parse_version(have.version):
                            adopted = self.adopt_shipped(name)
                            if adopted is not None:
                                self.set_link("previous", name, cur)
                                self.set_link("active", name, adopted)
                                events.append(f"shipped {name} {ship.version} is newer than installed {have.version}: "
                                              "switched to it")
            for gone in self.prune():
                events.append(f"removed unused store/{gone}")
        for e in events:
            log.warning("bundle state: %s", e)
        return events

    def _verified(self, kind: str, name: str) -> Bundle | None:
        t = self.target(kind, name)
        if t is None:
            return None
        try:
            b = load_bundle(t, verify=True)
        except BundleError as e:
            log.warning("%s/%s: %s", kind, name, e)
            return None
        return b if b.name == name else None

    # ---- records ---------------------------------------------------------------------------------------------

    def append_history(self, record: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.history_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def history(self) -> list[dict[str, Any]]:
        out = []
        if self.history_path.is_file():
            for line in self.history_path.read_text(encoding="utf-8").splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line torn by a power cut
        return out

    def _read_json(self, path: Path, default: Any) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return default

    def _write_json(self, path: Path, data: Any) -> None:
        atomic_write(path, json.dumps(data))

    def blocked(self) -> dict[str, str]:
        """sha256 → reason for bundles never to be installed automatically again."""
        d = self._read_json(self.blocked_path, {})
        return d if isinstance(d, dict) else {}

    def block(self, sha256: str, reason: str) -> None:
        d = self.blocked()
        d[sha256] = reason
        self._write_json(self.blocked_path, d)

    def pending(self) -> dict[str, Any] | None:
        d = self._read_json(self.pending_path, None)
        return d if isinstance(d, dict) else None

    def set_pending(self, data: dict[str, Any] | None) -> None:
        if data is None:
            if self.pending_path.exists():
                self.pending_path.unlink()
        else:
            self._write_json(self.pending_path, data)
