"""Model bundles: a directory with manifest.json, the model files it lists (with sha256), a self-test.

    <name>-<version>/
      manifest.json   name, version, arch, input, output (thresholds), files {path: sha256}, metrics, licence
      model.onnx · model.int8.onnx · openvino/model.xml + model.bin · selftest.npz
      manifest.sig    Ed25519 signature of manifest.json (checked by the fleet updater)

The bundle's identity hash is the sha256 of manifest.json, which itself pins every file's hash.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.inference.adapter import InferenceAdapter, create_adapter

SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


class BundleError(Exception):
    """A bundle is missing, malformed or does not match its manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_version(v: str) -> tuple[int, int, int]:
    m = SEMVER.match(str(v))
    if not m:
        raise BundleError(f"version {v!r} is not MAJOR.MINOR.PATCH")
    return int(m[1]), int(m[2]), int(m[3])


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    sha256: str

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def input_size(self) -> tuple[int, int]:
        s = self.manifest["input"]["size"]
        return int(s[0]), int(s[1])

    @property
    def output(self) -> dict[str, Any]:
        return dict(self.manifest.get("output", {}))

    def ref(self) -> dict[str, str]:
        """What a verdict names: {name, version, sha256}."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    def model_files(self) -> dict[str, Path]:
        f = self.manifest.get("runtime_files", {})
        return {k: self.path / v for k, v in f.items()}

    def adapter(self, backend: str = "auto", precision: str = "int8", threads: int | None = None,
                streams: int | None = None) -> InferenceAdapter:
        return create_adapter(backend, self.model_files(), precision=precision, threads=threads, streams=streams)

    def verify_files(self) -> None:
        """Raise BundleError unless every listed file exists with its recorded sha256."""
        for rel, digest in self.manifest.get("files", {}).items():
            p = self.path / rel
            if not p.is_file():
                raise BundleError(f"{self.name}-{self.version}: missing file {rel}")
            got = sha256_file(p)
            if got != digest:
                raise BundleError(f"{self.name}-{self.version}: {rel} sha256 {got[:12]}… does not match manifest {digest[:12]}…")

    def selftest(self, adapter: InferenceAdapter, atol: float | None = None) -> dict[str, float]:
        """Run the golden inputs; raise BundleError when outputs drift beyond tolerance. Returns the stats."""
        st = self.path / "selftest.npz"
        if not st.is_file():
            raise BundleError(f"{self.name}-{self.version}: no selftest.npz")
        d = np.load(st)
        key = f"expected_int8_{adapter.backend}" if adapter.precision == "int8" else "expected_fp32"
        if key not in d:
            raise BundleError(f"{self.name}-{self.version}: selftest.npz has no {key}")
        x, want = d["inputs"], d[key]
        got = adapter.infer(x)
        diff = np.abs(got - want)
        tol = float(atol if atol is not None else self.manifest.get("selftest", {}).get("atol", 0.08))
        agree = float(((got >= 0.5) == (want >= 0.5)).mean())
        stats = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "mask_agreement": agree}
        if diff.mean() > tol / 4 or agree < 0.99:
            raise BundleError(f"{self.name}-{self.version}: self-test failed on {adapter.backend} "
                              f"(mean |diff| {diff.mean():.4f}, mask agreement {agree:.4f})")
        return stats


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    p = Path(path)
    mf = p / "manifest.json"
    if not mf.is_file():
        raise BundleError(f"{p}: no manifest.json (not a model bundle)")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf}: invalid JSON ({e})") from None
    for key in ("name", "version", "input", "output", "files", "runtime_files"):
        if key not in manifest:
            raise BundleError(f"{mf}: missing key {key!r}")
    parse_version(manifest["version"])
    b = Bundle(p, manifest, sha256_file(mf))
    if verify:
        b.verify_files()
    return b


def default_bundle_dir() -> Path:
    """The bundles shipped with the package (models/bundles)."""
    return Path(__file__).resolve().parents[2] / "models" / "bundles"


def find_bundles(root: Path) -> dict[str, Bundle]:
    """Highest version of each bundle name under `root` (unverified; call verify_files before use).

    Entries may be symlinks to bundle directories (the fleet updater's active/ set); a bundle's path is then the
    resolved target, so it stays valid when the link is switched later."""
    best: dict[str, Bundle] = {}
    if not root.is_dir():
        return best
    for d in sorted(root.iterdir()):
        if not (d / "manifest.json").is_file():
            continue
        if d.is_symlink():  # <state>/bundles/active/<name> → store/<name>-<version>: keep the real path
            d = d.resolve()
        try:
            b = load_bundle(d, verify=False)
        except BundleError:
            continue
        cur = best.get(b.name)
        if cur is None or parse_version(b.version) > parse_version(cur.version):
            best[b.name] = b
    return best
