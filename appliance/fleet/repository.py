"""The fleet operator's TUF repository: one directory of metadata that says which keys are trusted for what (root),
which bundles exist (targets), and that nothing was held back or mixed (snapshot, timestamp).

    REPO/1.root.json 2.root.json …   every root version: an appliance walks them one by one (rotation)
    REPO/root.json                   a copy of the newest root
    REPO/<n>.targets.json            the newest targets metadata: one target per bundle release (release.py)
    REPO/<n>.snapshot.json           the newest snapshot: the version of targets.json
    REPO/timestamp.json              the newest timestamp: the version (and hash) of the snapshot

Consistent snapshots are on: an appliance fetches exactly the targets and snapshot versions the timestamp and
snapshot name, so metadata of different moments cannot be mixed. Signing follows each role's keys and threshold in
the newest root; a new root is signed by the threshold of the old root's root keys and of its own.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (TOP_LEVEL_ROLE_NAMES, MetaFile, Metadata, Role, Root, Snapshot, TargetFile, Targets,
                              Timestamp)
from tuf.api.serialization.json import JSONSerializer

from appliance.durable import atomic_write
from appliance.fleet.bundle_files import whole_bundle
from appliance.fleet.keys import ROLES, short_id
from appliance.fleet.release import Release, target_path
from appliance.fleet.transfer import DEFAULT_CHUNK, pack, split
from appliance.inference.bundle import BundleError

EXPIRY_DAYS = {"root": 365, "targets": 365, "snapshot": 30, "timestamp": 7}


class RepositoryError(BundleError):
    """An operator step cannot be done (missing keys, threshold not met, no such repository or release)."""


def expires_in(days: float) -> dt.datetime:
    return (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days)).replace(microsecond=0)


def to_bytes(md: Metadata) -> bytes:
    return md.to_bytes(JSONSerializer(compact=False)) + b"\n"


def sign_role(md: Metadata, role: str, root: Root, signers: list[Signer], append: bool = False) -> int:
    """Sign `md` with every signer whose key `root` lists for `role`; RepositoryError below the threshold."""
    if not append:
        md.signatures.clear()
    r = root.roles[role]
    for s in signers:
        if s.public_key.keyid in r.keyids and s.public_key.keyid not in md.signatures:
            md.sign(s, append=True)
    have = len(set(md.signatures) & set(r.keyids))
    if have < r.threshold:
        ids = ", ".join(short_id(k) for k in r.keyids)
        raise RepositoryError(f"{role} metadata needs {r.threshold} signature(s) by its keys ({ids}); the keys given "
                              f"provide {have} (pass --keys with the {role} private key)")
    return have


@dataclass
class Change:
    """One root rotation: keys to add to and remove from a role, and its new threshold."""

    role: str
    add: tuple[Key, ...] = ()
    remove: tuple[str, ...] = ()  # key ids (or unique prefixes)
    threshold: int | None = None


class Repository:
    def __init__(self, path: str | Path) -> None:
        self.dir = Path(path).expanduser()

    # ---- reading ---------------------------------------------------------------------------------------------

    def exists(self) -> bool:
        return (self.dir / "root.json").is_file()

    def _need(self) -> None:
        if not self.exists():
            raise RepositoryError(f"{self.dir} is not a fleet repository (no root.json; see `ctriage models init`)")

    def root(self) -> Metadata[Root]:
        self._need()
        return Metadata[Root].from_file(str(self.dir / "root.json"))

    def _newest(self, role: str) -> Path | None:
        found = sorted(((int(p.name.split(".")[0]), p) for p in self.dir.glob(f"*.{role}.json")
                        if p.name.split(".")[0].isdigit()), key=lambda x: x[0])
        return found[-1][1] if found else None

    def load(self, role: str) -> Metadata:
        """The newest metadata of a top-level role."""
        self._need()
        if role == "root":
            return self.root()
        p = self.dir / "timestamp.json" if role == "timestamp" else self._newest(role)
        if p is None or not p.is_file():
            raise RepositoryError(f"{self.dir} has no {role} metadata")
        return Metadata.from_file(str(p))

    def releases(self) -> list[Release]:
        return [Release.from_target(t) for t in self.load("targets").signed.targets.values()]

    def files(self) -> dict[str, bytes]:
        """What the broker (or a mirror) should hold: every root version and the newest of the others."""
        self._need()
        out = {p.name: p.read_bytes() for p in sorted(self.dir.glob("*.root.json"))}
        for role in ("targets", "snapshot"):
            p = self._newest(role)
            if p is not None:
                out[p.name] = p.read_bytes()
        out["timestamp.json"] = (self.dir / "timestamp.json").read_bytes()
        return out

    # ---- writing ---------------------------------------------------------------------------------------------

    def _write(self, name: str, md: Metadata) -> None:
        atomic_write(self.dir / name, to_bytes(md))

    def _drop_older(self, role: str, keep: int) -> None:
        for p in self.dir.glob(f"*.{role}.json"):
            n = p.name.split(".")[0]
            if n.isdigit() and int(n) < keep:
                p.unlink()

    @classmethod
    def init(cls, path: str | Path, keys: dict[str, list[Key]], signers: list[Signer],
             thresholds: dict[str, int] | None = None, days: dict[str, float] | None = None,
             legacy_signers: list[Signer] = ()) -> "Repository":
        """A new repository: root v1 with the given keys per role, empty targets, snapshot, timestamp.
        legacy_signers (the flat Ed25519 keys deployed appliances trust) also sign root v1, so those appliances
        accept it once as their first root (migration)."""
        repo = cls(path)
        if repo.exists() or (repo.dir.is_dir() and any(repo.dir.glob("*.json"))):
            raise RepositoryError(f"{repo.dir} already holds a repository (refusing to overwrite it)")
        days = {**EXPIRY_DAYS, **(days or {})}
        root = Root(expires=expires_in(days["root"]), consistent_snapshot=True)
        for role in ROLES:
            if not keys.get(role):
                raise RepositoryError(f"no key for the {role} role (a key directory holds {role}.pub)")
            for k in keys[role]:
                root.add_key(k, role)
            root.roles[role].threshold = (thresholds or {}).get(role, 1)
            if root.roles[role].threshold > len(root.roles[role].keyids):
                raise RepositoryError(f"{role} threshold {root.roles[role].threshold} is more than its "
                                      f"{len(root.roles[role].keyids)} key(s)")
        md_root = Metadata(root)
        sign_role(md_root, "root", root, signers)
        for s in legacy_signers:
            md_root.sign(s, append=True)
        targets = Metadata(Targets(expires=expires_in(days["targets"])))
        sign_role(targets, "targets", root, signers)
        repo.dir.mkdir(parents=True, exist_ok=True)
        repo._write("1.root.json", md_root)
        repo._write("root.json", md_root)
        repo._write("1.targets.json", targets)
        repo._freshen(root, targets.signed, signers, days, new_snapshot=True)
        return repo

    def _freshen(self, root: Root, targets: Targets, signers: list[Signer], days: dict[str, float],
                 new_snapshot: bool) -> tuple[int, int]:
        """A new snapshot (naming the newest targets) when asked, and always a new timestamp."""
        snap_md = self.load("snapshot") if (self._newest("snapshot") and not new_snapshot) else None
        if snap_md is None:
            new_snapshot = True
            old = self._newest("snapshot")
            version = Metadata.from_file(str(old)).signed.version + 1 if old else 1
            snap = Snapshot(version=version, expires=expires_in(days["snapshot"]))
            snap.meta["targets.json"] = MetaFile(version=targets.version)
            snap_md = Metadata(snap)
            sign_role(snap_md, "snapshot", root, signers)
            self._write(f"{snap.version}.snapshot.json", snap_md)
            self._drop_older("snapshot", snap.version)
        data = to_bytes(snap_md) if new_snapshot else self._newest("snapshot").read_bytes()
        ts_path = self.dir / "timestamp.json"
        ts_version = Metadata.from_file(str(ts_path)).signed.version + 1 if ts_path.is_file() else 1
        ts = Timestamp(version=ts_version, expires=expires_in(days["timestamp"]),
                       snapshot_meta=MetaFile(version=snap_md.signed.version, length=len(data),
                                              hashes={"sha256": hashlib.sha256(data).hexdigest()}))
        ts_md = Metadata(ts)
        sign_role(ts_md, "timestamp", root, signers)
        self._write("timestamp.json", ts_md)
        return snap_md.signed.version, ts_version

    def refresh(self, signers: list[Signer], days: dict[str, float] | None = None,
                snapshot: bool = False) -> tuple[int, int]:
        """The routine freshness step: a new timestamp (and with `snapshot`, a new snapshot). Returns versions."""
        days = {**EXPIRY_DAYS, **(days or {})}
        return self._freshen(self.root().signed, self.load("targets").signed, signers, days, new_snapshot=snapshot)

    def _new_targets(self, signers: list[Signer], days: dict[str, float], edit) -> Metadata[Targets]:
        root = self.root().signed
        md = self.load("targets")
        md.signed.version += 1
        md.signed.expires = expires_in(days["targets"])
        edit(md.signed.targets)
        sign_role(md, "targets", root, signers)
        self._write(f"{md.signed.version}.targets.json", md)
        self._freshen(root, md.signed, signers, days, new_snapshot=True)
        self._drop_older("targets", md.signed.version)
        return md

    def add_bundle(self, bundle_dir: str | Path, signers: list[Signer], *, devices: list[str] = (),
                   groups: list[str] = (), rollback_from: list[str] | None = None, url: str | None = None,
                   inline: bool = True, chunk_size: int = DEFAULT_CHUNK,
                   days: dict[str, float] | None = None) -> tuple[Release, bytes]:
        """Name a whole bundle as a release in new targets metadata (replacing a release of the same name and
        version), then new snapshot and timestamp. Returns the release and its archive."""
        days = {**EXPIRY_DAYS, **(days or {})}
        self._need()
        b = whole_bundle(bundle_dir)
        if not inline and not url:
            raise RepositoryError("nothing to send: give --url when the files do not travel inline")
        archive = pack(bundle_dir)
        chunks = split(archive, chunk_size) if inline else []
        rb = rollback_from if rollback_from is not None else _manifest_rollback(b.manifest)
        rel = Release(b.name, b.version, b.sha256, len(archive), hashlib.sha256(archive).hexdigest(),
                      tuple(sorted(set(devices))), tuple(sorted(set(groups))), tuple(rb),
                      chunk_size if inline else 0, tuple(hashlib.sha256(c).hexdigest() for c in chunks), url)
        path = target_path(b.name, b.version)
        tf = TargetFile(len(archive), {"sha256": rel.sha256}, path, unrecognized_fields={"custom": rel.custom()})
        Release.from_target(tf)  # the fields say what an appliance accepts

        def edit(targets: dict[str, TargetFile]) -> None:
            targets[path] = tf

        self._new_targets(signers, days, edit)
        return Release.from_target(tf), archive

    def remove_release(self, name: str, version: str, signers: list[Signer],
                       days: dict[str, float] | None = None) -> None:
        path = target_path(name, version)
        if path not in self.load("targets").signed.targets:
            raise RepositoryError(f"no release {name} {version} in {self.dir}")
        self._new_targets(signers, {**EXPIRY_DAYS, **(days or {})}, lambda t: t.pop(path))

    def rotate(self, changes: list[Change], signers: list[Signer], days: dict[str, float] | None = None) -> int:
        """A new root version with the changes, signed by the old root keys' threshold and the new ones'; targets,
        snapshot and timestamp are signed again by the keys the new root names. Returns the new root version."""
        days = {**EXPIRY_DAYS, **(days or {})}
        old_md = self.root()
        old = old_md.signed
        new_md = Metadata[Root].from_bytes(old_md.to_bytes())
        new = new_md.signed
        new.version += 1
        new.expires = expires_in(days["root"])
        for c in changes:
            if c.role not in TOP_LEVEL_ROLE_NAMES:
                raise RepositoryError(f"unknown role {c.role!r} (root, targets, snapshot or timestamp)")
            for ref in c.remove:
                new.revoke_key(_match(ref, new.roles[c.role]), c.role)
            for k in c.add:
                new.add_key(k, c.role)
            if c.threshold is not None:
                new.roles[c.role].threshold = c.threshold
        if new.roles == old.roles:
            raise RepositoryError("nothing changes: the root already trusts exactly these keys and thresholds")
        for role, r in new.roles.items():
            if not r.keyids:
                raise RepositoryError(f"the {role} role would have no key left (add one with --add)")
            if r.threshold < 1 or r.threshold > len(r.keyids):
                raise RepositoryError(f"{role} threshold {r.threshold} must be between 1 and its {len(r.keyids)} keys")
        new_md.signatures.clear()
        try:
            sign_role(new_md, "root", old, signers, append=True)
        except RepositoryError as e:
            raise RepositoryError(f"the old root must sign the new one: {e}") from None
        sign_role(new_md, "root", new, signers, append=True)
        try:
            old.verify_delegate("root", new_md.signed_bytes, new_md.signatures)
            new.verify_delegate("root", new_md.signed_bytes, new_md.signatures)
        except UnsignedMetadataError as e:
            raise RepositoryError(f"new root does not verify: {e}") from None
        targets = self.load("targets")
        resign = set(new.roles["targets"].keyids) != set(old.roles["targets"].keyids) \
            or new.roles["targets"].threshold != old.roles["targets"].threshold
        if resign:
            targets.signed.version += 1
            sign_role(targets, "targets", new, signers)
        self._write(f"{new.version}.root.json", new_md)
        self._write("root.json", new_md)
        if resign:
            self._write(f"{targets.signed.version}.targets.json", targets)
        self._freshen(new, targets.signed, signers, days, new_snapshot=True)
        self._drop_older("targets", targets.signed.version)
        return new.version

    def describe(self) -> dict[str, Any]:
        """Roles, keys, thresholds, versions, expiries and releases (for `ctriage models show`)."""
        root = self.root().signed
        out: dict[str, Any] = {"repository": str(self.dir), "root": {"version": root.version,
                                                                     "expires": root.expires.isoformat(),
                                                                     "expired": root.is_expired()}}
        out["roles"] = {role: {"threshold": r.threshold, "keys": [short_id(k) for k in r.keyids]}
                        for role, r in root.roles.items()}
        for role in ("targets", "snapshot", "timestamp"):
            s = self.load(role).signed
            out[role] = {"version": s.version, "expires": s.expires.isoformat(), "expired": s.is_expired()}
        out["releases"] = [{"name": r.name, "version": r.version, "manifest_sha256": r.manifest_sha256,
                            "devices": list(r.devices), "groups": list(r.groups), "bytes": r.length,
                            "inline_chunks": len(r.chunks), "url": r.url} for r in self.releases()]
        return out


def _match(ref: str, role: Role) -> str:
    found = [k for k in role.keyids if k.startswith(ref.lower())]
    if len(found) != 1:
        raise RepositoryError(f"key {ref!r} is {'not a key of' if not found else 'ambiguous in'} that role "
                              f"({', '.join(short_id(k) for k in role.keyids)})")
    return found[0]


def _manifest_rollback(manifest: dict[str, Any]) -> list[str]:
    """A rollback order in the manifest ({"rollback": {"from": [...]}}) when sign is not given one."""
    rb = manifest.get("rollback")
    return [str(v) for v in rb["from"]] if isinstance(rb, dict) and isinstance(rb.get("from"), list) else []

