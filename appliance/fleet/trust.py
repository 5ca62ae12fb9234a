"""What an appliance trusts: the TUF client side (python-tuf's ngclient) over what the broker holds.

The metadata files of the fleet repository (repository.py) are retained MQTT messages on
`<prefix>/fleet/metadata/<file>`; `RetainedFetcher` hands them to `tuf.ngclient.Updater` as if they were files
on a server (a file the broker does not hold is a 404: "not yet"), `DirFetcher` does the same for a repository
directory (`ctriage models install --repo`). The client workflow is TUF's: walk every new root version (each signed
by the previous root's threshold and its own), then timestamp → snapshot → targets, each checked against the
newest root's keys and thresholds, for expiry, and against rollback to versions older than those already trusted.
The trusted files live in <state>/trust/ (root.json and root_history/, timestamp.json, snapshot.json,
targets.json).

The first root comes from a trust anchor: the root.json shipped in config/trust/ (or fleet.trust_root). A device
configured with legacy flat keys (fleet.trust_keys) and no anchor accepts, once, a version-1 root that one of those
keys signed besides its own root keys (migration); after that only the TUF chain counts.
"""
from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from tuf.api import exceptions as tufx
from tuf.api.metadata import Metadata, Root, Targets
from tuf.ngclient import FetcherInterface, Updater

from appliance.fleet.keys import load_public, short_id
from appliance.inference.bundle import BundleError

METADATA_URL = "mqtt://fleet/metadata/"  # a name for ngclient: the fetchers map it to topics or files
PROJECT_ANCHOR = Path(__file__).resolve().parents[1] / "trust" / "root.json"
KINDS = ("rollback", "expired", "signature", "mismatch", "incomplete", "invalid")


class TrustError(BundleError):
    """Metadata was refused; `kind` is one of KINDS (incomplete: a file is not on the broker yet)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class RetainedFetcher(FetcherInterface):
    """The metadata files the broker holds (retained messages), by file name."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.last: tuple[str, bytes] | None = None
        self._lock = threading.Lock()

    def put(self, name: str, data: bytes) -> None:
        with self._lock:
            if data:
                self.files[name] = bytes(data)
            else:
                self.files.pop(name, None)  # a retained message cleared

    def get(self, name: str) -> bytes | None:
        with self._lock:
            return self.files.get(name)

    def _fetch(self, url: str) -> Iterator[bytes]:
        name = unquote(url.rsplit("/", 1)[-1])
        data = self.get(name)
        if data is None:
            raise tufx.DownloadHTTPError(f"{name} is not on the broker", 404)
        self.last = (name, data)
        return iter([data])


class DirFetcher(RetainedFetcher):
    """The metadata files of a repository directory."""

    def __init__(self, repo: str | Path) -> None:
        super().__init__()
        d = Path(repo).expanduser()
        if not (d / "root.json").is_file():
            raise TrustError("invalid", f"{d} is not a fleet repository (no root.json)")
        for p in d.glob("*.json"):
            self.files[p.name] = p.read_bytes()


def trust_anchor(trust_root: str | Path | None, legacy_keys: list | tuple) -> Path | None:
    """The root an appliance starts from: the configured one, else none when legacy keys are configured (the
    site's first root must come signed by one of them), else the project's shipped root."""
    if trust_root:
        return Path(trust_root).expanduser()
    return None if legacy_keys else PROJECT_ANCHOR


def _self_signed_root(data: bytes, where: str) -> Metadata[Root]:
    try:
        md = Metadata[Root].from_bytes(data)
        md.signed.verify_delegate("root", md.signed_bytes, md.signatures)
    except tufx.UnsignedMetadataError as e:
        raise TrustError("signature", f"{where} is not signed by its own root keys ({e})") from None
    except Exception as e:
        raise TrustError("invalid", f"{where} is not TUF root metadata ({e})") from None
    return md


class TrustStore:
    """The trusted metadata of one appliance (<state>/trust) and the TUF refresh over a fetcher."""

    def __init__(self, state_dir: str | Path, anchor: str | Path | None = PROJECT_ANCHOR,
                 legacy_keys: list[str | Path] | tuple = ()) -> None:
        self.dir = Path(state_dir).expanduser() / "trust"
        self.anchor = Path(anchor).expanduser() if anchor else None
        self.legacy = [load_public(k) for k in legacy_keys]

    @property
    def ready(self) -> bool:
        return (self.dir / "root.json").exists()

    def bootstrap(self) -> bool:
        """Start from the anchor when nothing is trusted yet. False: waiting for a first root (migration)."""
        if self.ready:
            return True
        if self.anchor is None:
            return False
        if not self.anchor.is_file():
            raise TrustError("invalid", f"trust anchor {self.anchor} not found")
        _self_signed_root(self.anchor.read_bytes(), str(self.anchor))
        self.dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.anchor, self.dir / "root.json")
        return True

    def migrate(self, fetcher: RetainedFetcher) -> int | None:
        """Accept 1.root.json from the broker when a legacy flat key signed it (once, with no root trusted yet).
        Returns its version, or None when there is none yet."""
        if self.ready or not self.legacy:
            return None
        data = fetcher.get("1.root.json")
        if data is None:
            return None
        md = _self_signed_root(data, "1.root.json")
        legacy = Root()
        for k in self.legacy:
            legacy.add_key(k, "root")
        if not legacy.get_verification_result("root", md.signed_bytes, md.signatures):
            raise TrustError("signature", "the first root (1.root.json) is not signed by a legacy key this "
                                          "appliance trusts (fleet.trust_keys)")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "root.json").write_bytes(data)
        return md.signed.version

    def refresh(self, fetcher: RetainedFetcher) -> Targets:
        """TUF's client workflow over `fetcher`; the verified top-level targets. TrustError says what was refused."""
        if not self.bootstrap():
            raise TrustError("incomplete", "no root trusted yet (waiting for a first root signed by a legacy key)")
        try:
            up = Updater(str(self.dir), METADATA_URL, fetcher=fetcher, bootstrap=None)
            up.refresh()
            # ngclient keeps no public accessor for the targets role; what it persisted is what it verified
            return Metadata[Targets].from_file(str(self.dir / "targets.json")).signed
        except tufx.DownloadHTTPError as e:
            raise TrustError("incomplete", str(e)) from None
        except tufx.EqualVersionNumberError as e:  # pragma: no cover - ngclient handles it
            raise TrustError("incomplete", str(e)) from None
        except tufx.BadVersionNumberError as e:
            raise self._version_error(str(e)) from None
        except tufx.ExpiredMetadataError as e:
            raise TrustError("expired", _expired(str(e))) from None
        except tufx.UnsignedMetadataError as e:
            raise TrustError("signature", self._unsigned(str(e), fetcher)) from None
        except (tufx.LengthOrHashMismatchError, tufx.DownloadLengthMismatchError) as e:
            raise TrustError("mismatch", f"metadata does not match what the newer metadata signed ({e}): "
                                         "mixed or altered metadata refused") from None
        except (tufx.RepositoryError, tufx.DownloadError, ValueError) as e:
            raise TrustError("invalid", f"metadata refused: {e}") from None

    @staticmethod
    def _version_error(msg: str) -> TrustError:
        if "must be >=" in msg:
            return TrustError("rollback", f"rollback refused: {msg} (older metadata than this appliance trusts)")
        return TrustError("mismatch", f"metadata of different moments refused: {msg}")

    def _unsigned(self, msg: str, fetcher: RetainedFetcher) -> str:
        """Which keys signed the refused file, and which the trusted root wants."""
        m = re.match(r"(\w+) was signed by (\d+)/(\d+) keys", msg)
        try:
            root = Metadata[Root].from_file(str(self.dir / "root.json")).signed
        except Exception:
            return f"signature refused: {msg}"
        if not m or fetcher.last is None:
            return f"signature refused: {msg}"
        role, got, need = m.group(1), m.group(2), m.group(3)
        try:
            md = Metadata.from_bytes(fetcher.last[1])
            by = [short_id(k) for k in md.signatures]
        except Exception:
            by = []
        want = [short_id(k) for k in root.roles[role].keyids] if role in root.roles else []
        return (f"signature refused: {role} metadata ({fetcher.last[0]}) is signed by {got} of the {need} required "
                f"key(s); signed by {', '.join(by) or 'no key'}, root v{root.version} trusts "
                f"{', '.join(want) or 'no key'} for {role} (a revoked or unknown key)")

    # ---- what is trusted now (local files only) ------------------------------------------------------------------

    def _local(self, role: str) -> Metadata | None:
        p = self.dir / f"{role}.json"
        try:
            return Metadata.from_file(str(p)) if p.exists() else None
        except Exception:
            return None

    def trusted_targets(self) -> Targets | None:
        md = self._local("targets")
        return md.signed if md is not None else None

    def root_version(self) -> int:
        md = self._local("root")
        return md.signed.version if md is not None else 0

    def stale(self) -> str | None:
        """Why the trusted metadata is no longer fresh (an expired timestamp: updates may be held back), or None."""
        for role in ("root", "timestamp"):
            md = self._local(role)
            if md is not None and md.signed.is_expired():
                return _expired(f"{role}.json is expired", md.signed.expires.isoformat())
        return None

    def describe(self) -> dict[str, Any]:
        """Root version, keys and thresholds per role, versions and expiries (for `ctriage models trust`)."""
        out: dict[str, Any] = {"trust_dir": str(self.dir), "ready": self.ready}
        root = self._local("root")
        if root is None:
            return out
        r = root.signed
        out["root"] = {"version": r.version, "expires": r.expires.isoformat(), "expired": r.is_expired()}
        out["roles"] = {n: {"threshold": x.threshold, "keys": [short_id(k) for k in x.keyids]}
                        for n, x in r.roles.items()}
        for role in ("timestamp", "snapshot", "targets"):
            md = self._local(role)
            if md is not None:
                out[role] = {"version": md.signed.version, "expires": md.signed.expires.isoformat(),
                             "expired": md.signed.is_expired()}
        return out


def _expired(msg: str, when: str = "") -> str:
    found = re.search(r"(root|timestamp|snapshot|targets)", msg)
    role = found.group(1) if found else "metadata"
    what = {"timestamp": "the timestamp expired: the repository stopped vouching for freshness (a freeze attack, "
                         "or the operator did not refresh it); updates wait, analysis goes on with the bundles here",
            "root": "the trusted root expired: the operator must publish a new root"}.get(
        role, f"{role} metadata expired: the operator must sign it again")
    return f"{msg}{f' (since {when})' if when else ''}: {what}"


def verify_at_rest(repo: str | Path, anchor: bytes) -> tuple[Root, Targets, list[str]]:
    """A repository directory checked from a trusted root (the chain of root versions, each signed by the one
    before and itself; timestamp → snapshot → targets by the newest root's keys, versions and hashes). Expiry does
    not make it fail — it is returned as notes — since bundles at rest do not go stale; appliances refuse stale
    metadata on the wire. Returns (newest root, targets, notes); TrustError says what does not hold."""
    d = Path(repo).expanduser()
    root = _self_signed_root(anchor, "the trust anchor").signed
    try:
        while (d / f"{root.version + 1}.root.json").is_file():
            md = Metadata[Root].from_file(str(d / f"{root.version + 1}.root.json"))
            if md.signed.version != root.version + 1:
                raise TrustError("mismatch", f"{root.version + 1}.root.json holds root version {md.signed.version}")
            root.verify_delegate("root", md.signed_bytes, md.signatures)
            md.signed.verify_delegate("root", md.signed_bytes, md.signatures)
            root = md.signed
        ts = Metadata.from_file(str(d / "timestamp.json"))
        root.verify_delegate("timestamp", ts.signed_bytes, ts.signatures)
        sm = ts.signed.snapshot_meta
        sdata = (d / f"{sm.version}.snapshot.json").read_bytes()
        sm.verify_length_and_hashes(sdata)
        snap = Metadata.from_bytes(sdata)
        root.verify_delegate("snapshot", snap.signed_bytes, snap.signatures)
        tm = snap.signed.meta["targets.json"]
        targets = Metadata[Targets].from_file(str(d / f"{tm.version}.targets.json"))
        root.verify_delegate("targets", targets.signed_bytes, targets.signatures)
        if snap.signed.version != sm.version or targets.signed.version != tm.version:
            raise TrustError("mismatch", "snapshot or targets version differs from what names it")
    except tufx.UnsignedMetadataError as e:
        raise TrustError("signature", f"{d}: {e} trusted by root v{root.version}") from None
    except tufx.LengthOrHashMismatchError as e:
        raise TrustError("mismatch", f"{d}: {e}") from None
    except (OSError, KeyError, ValueError, tufx.RepositoryError) as e:
        raise TrustError("invalid", f"{d}: incomplete or unreadable repository ({e})") from None
    notes = [f"{md.type} v{md.version} expired on {md.expires.isoformat()}"
             for md in (root, ts.signed, snap.signed, targets.signed) if md.is_expired()]
    return root, targets.signed, notes
