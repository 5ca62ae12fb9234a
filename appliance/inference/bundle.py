"""Model bundles: a directory with manifest.json, the model files it lists (with sha256), a self-test.

    <name>-<version>/
      manifest.json   name, version, arch, input, output (thresholds), files {path: sha256}, metrics, licence
      model.onnx · model.int8.onnx · openvino/model.xml + model.bin · selftest.npz
      deferred.onnx · deferred.int8.onnx · openvino/deferred.xml + .bin   (lesion bundles in two graphs only)

A lesion bundle may come in two graphs (schema ctriage.bundle/2): `graphs` {first, deferred: runtime files; ceiling:
the most the deferred map adds} replaces `runtime_files`, so software that knows one graph only cannot load it (its
self-test alone would not tell: the first graph is close to the full map). The full probability map is the two
maps' sum; the appliance runs the second only where a box can still be made (appliance/inference/deferred.py). The
self-test and the manifest's agreement figures are of the full map.

The bundle's identity hash is the sha256 of manifest.json, which itself pins every file's hash; the fleet's TUF
targets metadata names a bundle by it (appliance/fleet/release.py, docs/FLEET.md). `Bundle.spec` is the
manifest typed and validated at load (`Manifest`): the values the pipeline uses come from there, never from a
second default in code; a manifest that lacks a required one is a BundleError naming the file and the key.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from appliance.inference.adapter import InferenceAdapter
from appliance.inference.deferred import DeferredAdapter
from appliance.inference.factory import create_adapter

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


# ---- the typed manifest ------------------------------------------------------------------------------------------
# A field without a default is required; the few defaults below are the only ones (documented where they are).


@dataclass(frozen=True)
class InputSpec:
    size: tuple[int, int]  # model input, rows × columns
    window: tuple[float, float]  # HU window mapped to [0, 1]


@dataclass(frozen=True)
class LesionOutput:
    """A lesion box: a component with probability ≥ threshold, larger than min_area_px measured at
    area_scale × area_scale slice pixels, peaking at ≥ min_score."""

    threshold: float
    min_area_px: float
    area_scale: int
    min_score: float
    min_crop_mm: float = 120.0  # smallest lesion-crop side on DICOM slices; no shipped manifest sets it


@dataclass(frozen=True)
class ValidAreaOutput:
    """Lung: components with probability ≥ threshold of ≥ min_lung_cm2 each; the lung box grows by box_margin."""

    threshold: float
    min_lung_cm2: float
    box_margin: float
    region_dilate_px: int
    min_total_lung_cm2: float = 0.0  # lung in all for a slice to count; valid-area bundles before 1.3.1: none


@dataclass(frozen=True)
class DeferredSpec:
    """A second graph whose map, in [0, ceiling], adds to the first's (appliance.inference.deferred)."""

    runtime_files: Mapping[str, str]
    ceiling: float


OUTPUTS: dict[str, type] = {"lesion": LesionOutput, "valid-area": ValidAreaOutput}  # task → its output's type
PROBABILITIES = ("threshold", "min_score")
SCHEMAS = ("ctriage.bundle/1", "ctriage.bundle/2")  # 2: a lesion bundle in two graphs (`graphs`)


@dataclass(frozen=True)
class Manifest:
    """The manifest values the appliance uses, typed and checked (`Manifest.parse`)."""

    name: str
    version: str
    task: str  # "lesion" or "valid-area": says what `output` holds
    input: InputSpec
    output: LesionOutput | ValidAreaOutput
    runtime_files: Mapping[str, str]  # {"onnx", "onnx_int8", "openvino_int8"} → path (two graphs: the first's)
    files: Mapping[str, str]  # path → sha256
    selftest_atol: float = 0.08  # selftest.atol: the self-test's tolerance when the manifest names none
    deferred: DeferredSpec | None = None  # the second graph of a lesion bundle in two (`graphs`); None: one graph

    def graphs(self) -> list[Mapping[str, str]]:
        """Each graph's runtime files (path in the bundle): the first, then the deferred one if there is one."""
        return [self.runtime_files] + ([self.deferred.runtime_files] if self.deferred else [])

    @classmethod
    def parse(cls, raw: Any, where: str) -> "Manifest":
        """Check and type a manifest.json's content; `where` (its path) starts every error message."""
        if not isinstance(raw, dict):
            raise BundleError(f"{where}: not a JSON object")
        for key in ("name", "version", "input", "output", "files"):
            if key not in raw:
                raise BundleError(f"{where}: missing key {key!r}")
        version = _value(raw, "version", where, str)
        parse_version(version)
        task = _value(raw, "task", where, str)
        if task not in OUTPUTS:
            raise BundleError(f"{where}: 'task' must be one of {', '.join(OUTPUTS)}, got {task!r}")
        size = _value(raw, "input.size", where, list)
        window = _value(raw, "input.window", where, list)
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
            raise BundleError(f"{where}: 'input.size' must be [rows, columns] in pixels, got {size!r}")
        if len(window) != 2 or not all(_is_number(v) for v in window) or not window[0] < window[1]:
            raise BundleError(f"{where}: 'input.window' must be [low, high] in HU, got {window!r}")
        out_type = OUTPUTS[task]
        out = {}
        for f in fields(out_type):
            key = f"output.{f.name}"
            kind = int if f.type in ("int", int) else float
            default = f.default if f.default is not MISSING else _REQUIRED
            v = _value(raw, key, where, kind, default)
            if v < 0 or (f.name in PROBABILITIES and v > 1) or (f.name == "area_scale" and v == 0):
                raise BundleError(f"{where}: {key!r} is out of range: {v!r}")
            out[f.name] = v
        schema = raw.get("schema", SCHEMAS[0])
        if schema not in SCHEMAS:
            raise BundleError(f"{where}: bundle schema {schema!r} is not one this software runs "
                              f"({', '.join(SCHEMAS)}): update the appliance software first")
        files = {"files": _names(raw, "files", where)}
        deferred = None
        if "graphs" in raw:  # two graphs (schema 2); no `runtime_files`, so software before it cannot load it
            if "runtime_files" in raw:
                raise BundleError(f"{where}: 'graphs' and 'runtime_files' both given: a bundle has one or the other")
            if task != "lesion":
                raise BundleError(f"{where}: 'graphs' is for lesion bundles only")
            files["runtime_files"] = _names(raw, "graphs.first", where)
            second = _names(raw, "graphs.deferred", where)
            if set(second) != set(files["runtime_files"]):
                raise BundleError(f"{where}: 'graphs.deferred' must name the same runtimes as 'graphs.first' "
                                  f"({', '.join(sorted(files['runtime_files']))})")
            ceiling = _value(raw, "graphs.ceiling", where, float)
            if not 0 < ceiling <= 1:
                raise BundleError(f"{where}: 'graphs.ceiling' is out of range: {ceiling!r}")
            deferred = DeferredSpec(second, ceiling)
        else:
            if "runtime_files" not in raw:
                raise BundleError(f"{where}: missing key 'runtime_files'")
            files["runtime_files"] = _names(raw, "runtime_files", where)
        return cls(name=_value(raw, "name", where, str), version=version, task=task,
                   input=InputSpec((size[0], size[1]), (float(window[0]), float(window[1]))),
                   output=out_type(**out), runtime_files=files["runtime_files"], files=files["files"],
                   selftest_atol=_value(raw, "selftest.atol", where, float, cls.selftest_atol), deferred=deferred)


_REQUIRED = object()
_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _value(raw: dict, dotted: str, where: str, kind: type, default: Any = _REQUIRED) -> Any:
    """raw["a"]["b"] for "a.b", of type `kind` (float accepts integers); missing: default, else BundleError."""
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _REQUIRED:
                raise BundleError(f"{where}: missing key {dotted!r}")
            return default
        node = node[part]
    ok = _is_number(node) if kind is float else (isinstance(node, kind) and not isinstance(node, bool))
    if not ok:
        raise BundleError(f"{where}: {dotted!r} must be {_KIND_NAMES[kind]}, got {node!r}")
    return float(node) if kind is float else node


def _names(raw: dict, dotted: str, where: str) -> Mapping[str, str]:
    """A {name: string} object of the manifest, read-only."""
    d = _value(raw, dotted, where, dict)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
        raise BundleError(f"{where}: {dotted!r} must map names to strings")
    return MappingProxyType(dict(d))


# ---- bundles ------------------------------------------------------------------------------------------------------


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]  # manifest.json as signed (the fleet code checks and re-writes it as it is)
    sha256: str
    spec: Manifest  # the same, typed and validated: what the pipeline reads

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def input_size(self) -> tuple[int, int]:
        return self.spec.input.size

    def output_of(self, kind: type, what: str) -> Any:
        """The typed output section when this bundle is a `what` model (`kind`: its output class), else BundleError."""
        out = self.spec.output
        if not isinstance(out, kind):
            raise BundleError(f"{self.name}-{self.version}: a {self.spec.task} bundle, not a {what} model")
        return out

    def ref(self) -> dict[str, str]:
        """What a verdict names: {name, version, sha256}."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    def model_files(self) -> dict[str, Path]:
        """The (first) graph's runtime files."""
        return self.graph_files()[0]

    def graph_files(self) -> list[dict[str, Path]]:
        """Every graph's runtime files (`Manifest.graphs`) as paths."""
        return [{k: self.path / v for k, v in g.items()} for g in self.spec.graphs()]

    def adapter(self, backend: str = "auto", precision: str = "int8", threads: int | None = None,
                streams: int | None = None) -> InferenceAdapter:
        """The bundle's model on `backend`; a bundle in two graphs (`deferred`) gets a DeferredAdapter over both."""
        first, *rest = self.graph_files()
        adapter = create_adapter(backend, first, precision=precision, threads=threads, streams=streams)
        if self.spec.deferred is None:
            return adapter
        second = create_adapter(adapter.backend, rest[0], precision=precision, threads=threads, streams=streams)
        return DeferredAdapter(adapter, second, self.spec.deferred.ceiling)

    def verify_files(self) -> None:
        """Raise BundleError unless every listed file exists with its recorded sha256."""
        for rel, digest in self.spec.files.items():
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
        tol = float(atol if atol is not None else self.spec.selftest_atol)
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
    b = Bundle(p, manifest, sha256_file(mf), Manifest.parse(manifest, str(mf)))
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
