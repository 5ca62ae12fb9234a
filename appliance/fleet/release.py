"""A release: one model bundle as the TUF targets metadata names it.

The target file is the bundle's deterministic tar archive (appliance.fleet.transfer.pack), at the target path
`<name>-<version>.tar`, with its length and sha256 signed by the targets role. Its `custom` object says, under
the same signatures, everything else an appliance acts on:

    {"ctriage": {"name": "lesion", "version": "1.3.0", "manifest_sha256": "<sha256 of manifest.json>",
                 "devices": [], "groups": ["pilot"],          # both empty: every device
                 "rollback_from": [],                         # an older version may replace exactly these
                 "chunk_size": 524288, "chunks": ["<sha256 of chunk 0>", …],   # inline over MQTT, or empty
                 "url": null}}                                # and/or an HTTP(S) mirror of the archive
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tuf.api.metadata import TargetFile

from appliance.inference.bundle import BundleError, parse_version

NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
DEVICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_CHUNKS = 100_000


class ReleaseError(BundleError):
    """A target's custom fields are not a ctriage release."""


def target_path(name: str, version: str) -> str:
    return f"{name}-{version}.tar"


@dataclass(frozen=True)
class Release:
    name: str
    version: str
    manifest_sha256: str
    length: int
    sha256: str  # of the archive
    devices: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    rollback_from: tuple[str, ...] = ()
    chunk_size: int = 0
    chunks: tuple[str, ...] = ()
    url: str | None = None
    path: str = ""
    target: TargetFile | None = field(default=None, compare=False, repr=False)

    @property
    def ref(self) -> dict[str, str]:
        """The bundle reference of update reports: name, version, sha256 of manifest.json."""
        return {"name": self.name, "version": self.version, "sha256": self.manifest_sha256}

    def chunk_sizes(self) -> list[int]:
        """Bytes of each inline chunk (all chunk_size but the last)."""
        n = len(self.chunks)
        return [self.chunk_size] * (n - 1) + [self.length - self.chunk_size * (n - 1)] if n else []

    def for_device(self, device: str, groups: tuple[str, ...] | list[str]) -> bool:
        """Is this release for `device` (by id or by one of its groups)? Both lists empty: every device."""
        if not self.devices and not self.groups:
            return True
        return device in self.devices or bool(set(groups) & set(self.groups))

    def custom(self) -> dict[str, Any]:
        return {"ctriage": {"name": self.name, "version": self.version, "manifest_sha256": self.manifest_sha256,
                            "devices": sorted(self.devices), "groups": sorted(self.groups),
                            "rollback_from": list(self.rollback_from), "chunk_size": self.chunk_size,
                            "chunks": list(self.chunks), "url": self.url}}

    @classmethod
    def from_target(cls, t: TargetFile) -> "Release":
        """Check the custom fields (signed with the target, so only a broken publisher gets them wrong)."""
        c = t.custom.get("ctriage") if isinstance(t.custom, dict) else None
        if not isinstance(c, dict):
            raise ReleaseError(f"target {t.path} has no ctriage fields")
        name, version, msha = c.get("name"), c.get("version"), c.get("manifest_sha256")
        if not (isinstance(name, str) and NAME.match(name) and isinstance(version, str)):
            raise ReleaseError(f"target {t.path}: bad name or version")
        parse_version(version)
        if t.path != target_path(name, version):
            raise ReleaseError(f"target {t.path} does not match {name} {version}")
        if not (isinstance(msha, str) and HEX64.match(msha)):
            raise ReleaseError(f"target {t.path}: manifest_sha256 is not 64 hex digits")
        sha = t.hashes.get("sha256")
        if not isinstance(sha, str) or not HEX64.match(sha):
            raise ReleaseError(f"target {t.path} has no sha256")
        lists = {k: c.get(k) or [] for k in ("devices", "groups", "rollback_from", "chunks")}
        if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in lists.values()):
            raise ReleaseError(f"target {t.path}: devices, groups, rollback_from and chunks must be string lists")
        if not all(DEVICE.match(x) for x in lists["devices"] + lists["groups"]):
            raise ReleaseError(f"target {t.path}: a device or group name is not valid")
        chunks, size = lists["chunks"], c.get("chunk_size") or 0
        if chunks:
            if (not isinstance(size, int) or size < 1 or len(chunks) > MAX_CHUNKS
                    or not size * (len(chunks) - 1) < t.length <= size * len(chunks)
                    or not all(HEX64.match(x) for x in chunks)):
                raise ReleaseError(f"target {t.path}: inline chunks do not add up to the archive")
        url = c.get("url")
        if url is not None and not (isinstance(url, str) and url.startswith(("https://", "http://", "file://"))):
            raise ReleaseError(f"target {t.path}: url must be an http(s) URL")
        if not chunks and not url:
            raise ReleaseError(f"target {t.path} says neither inline chunks nor url")
        return cls(name, version, msha, t.length, sha, tuple(lists["devices"]), tuple(lists["groups"]),
                   tuple(lists["rollback_from"]), int(size), tuple(chunks), url, t.path, t)


def releases(targets: dict[str, TargetFile]) -> tuple[list[Release], list[str]]:
    """Every ctriage release in a targets metadata's targets{}, and the problems with those that are not."""
    out, bad = [], []
    for t in targets.values():
        try:
            out.append(Release.from_target(t))
        except BundleError as e:
            bad.append(str(e))
    return out, bad


def choose(rels: list[Release], device: str, groups: tuple[str, ...] | list[str]) -> dict[str, Release]:
    """For each bundle name, the release this device should run: the highest version addressed to it."""
    best: dict[str, Release] = {}
    for r in rels:
        if r.for_device(device, groups):
            if r.name not in best or parse_version(r.version) > parse_version(best[r.name].version):
                best[r.name] = r
    return best
