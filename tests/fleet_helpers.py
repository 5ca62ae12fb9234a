"""Shared by the fleet tests (test_updater, test_fleet_trust, test_models_cli, test_repository, test_trust, …):
bundles to copy, variants of them, and a TUF repository with keys a test makes itself (never the project's).

Test bundles are copies of the shipped ones (models/bundles) when both are there; otherwise (a checkout before the
models are exported) tiny real ONNX/OpenVINO models are generated with `onnx`, and without it the tests skip.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance.fleet.bundle_files import rehash
from appliance.fleet.bundle_store import REQUIRED
from appliance.fleet.keys import ROLES, generate_keypair, generate_role_keys, load_public, load_signers
from appliance.fleet.repository import Repository
from appliance.inference.bundle import default_bundle_dir, find_bundles, parse_version

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "config" / "schemas"


def _tiny_bundle(out: Path, name: str, size: int) -> Path:
    """A real (untrained) model: 3×3 conv + sigmoid, as ONNX FP32, 'INT8' (the same graph) and OpenVINO IR."""
    onnx = pytest.importorskip("onnx", reason="no shipped bundles and no `onnx` to make test bundles")
    from onnx import TensorProto, helper, numpy_helper
    import openvino as ov

    from appliance.inference.bundle import sha256_file
    from appliance.inference.onnxruntime_adapter import OnnxRuntimeAdapter
    from appliance.inference.openvino_adapter import OpenVINOAdapter

    out.mkdir(parents=True)
    (out / "openvino").mkdir()
    w = np.zeros((1, 1, 3, 3), np.float32)
    w[0, 0] = [[0.5, 1, 0.5], [1, 6, 1], [0.5, 1, 0.5]]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["z"], pads=[1, 1, 1, 1]),
         helper.make_node("Sigmoid", ["z"], ["prob"])],
        f"tiny-{name}",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, size, size])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1, size, size])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-6.0], np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(out / "model.onnx"))
    shutil.copy(out / "model.onnx", out / "model.int8.onnx")
    ov.save_model(ov.convert_model(str(out / "model.onnx")), str(out / "openvino" / "model.xml"),
                  compress_to_fp16=False)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (4, 1, size, size)).astype(np.float32)
    x[:, :, size // 4: size // 2] = 1.0
    ort = OnnxRuntimeAdapter(out / "model.onnx", "fp32", threads=1).infer(x)
    ovi = OpenVINOAdapter(out / "openvino" / "model.xml", "int8", threads=1).infer(x)
    np.savez_compressed(out / "selftest.npz", inputs=x, expected_fp32=ort, expected_int8_onnxruntime=ort,
                        expected_int8_openvino=ovi)
    output = ({"kind": "probability", "threshold": 0.5, "min_area_px": 25.0, "area_scale": 512, "min_score": 0.5}
              if name == "lesion" else
              {"kind": "probability", "threshold": 0.5, "min_lung_cm2": 6.0, "box_margin": 0.03, "region_dilate_px": 3})
    manifest = {
        "schema": "ctriage.bundle/1", "name": name, "version": "1.0.0", "created": "2026-11-27T00:00:00Z",
        "task": name, "arch": {"type": "test conv3x3"},
        "input": {"size": [size, size], "window": [-1350, 150], "layout": "NCHW", "range": [0, 1]},
        "output": output,
        "runtime_files": {"onnx": "model.onnx", "onnx_int8": "model.int8.onnx", "openvino_int8": "openvino/model.xml"},
        "files": {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()},
        "selftest": {"atol": 0.08}, "licence": "test model",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out


@pytest.fixture(scope="session")
def source_bundles(tmp_path_factory) -> dict[str, Path]:
    """name → a bundle directory to copy from (never modified)."""
    shipped = find_bundles(default_bundle_dir())
    if all(n in shipped for n in REQUIRED):
        print(f"fleet tests use the shipped bundles: {', '.join(f'{n} {shipped[n].version}' for n in REQUIRED)}")
        return {n: shipped[n].path for n in REQUIRED}
    print("no shipped bundles in models/bundles: fleet tests use generated tiny models")
    d = tmp_path_factory.mktemp("tiny-bundles")
    return {n: _tiny_bundle(d / n, n, 128 if n == "valid-area" else 64) for n in REQUIRED}


class Fleet:
    """A fleet operator in a test: role keys in `keys/` (and more made on demand), a repository in `repo/`."""

    def __init__(self, tmp: Path, **init) -> None:
        self.tmp = tmp
        self.keys = tmp / "keys"
        generate_role_keys(self.keys)
        self.repo = Repository.init(tmp / "repo", {r: [load_public(self.keys / f"{r}.pub")] for r in ROLES},
                                    self.signers(), **init)

    @property
    def root_json(self) -> Path:
        """The root an appliance of this fleet starts from (its trust anchor): a copy of root v1."""
        p = self.tmp / "anchor-root.json"
        if not p.exists():
            shutil.copyfile(self.repo.dir / "1.root.json", p)
        return p

    def signers(self, *extra: Path):
        return load_signers([self.keys, *extra])

    def new_key(self, name: str) -> Path:
        """A new key pair in tmp/extra-keys/<name>/; returns the directory (key.key, key.pub)."""
        d = self.tmp / "extra-keys" / name
        generate_keypair(d, "key")
        return d

    def sign(self, bundle: Path, *extra_keys: Path, **kw):
        # many chunks, but fewer than mosquitto's default per-client queue (max_queued_messages 1000): a 22 MB
        # bundle in 16 KiB chunks is 1,400 retained messages at once, and the broker drops the rest
        kw.setdefault("chunk_size", 128 * 1024)
        return self.repo.add_bundle(bundle, self.signers(*extra_keys), **kw)


def make_variant(src: Path, dest: Path, version: str | None = None, mutate=None, **manifest_fields) -> Path:
    """Copy a bundle, set its version (and manifest fields), apply mutate(dir), rehash (unsigned: a repository
    names it when signed)."""
    shutil.copytree(src, dest)
    (dest / "manifest.sig").unlink(missing_ok=True)
    if version is not None or manifest_fields:
        set_version(dest, version or json.loads((dest / "manifest.json").read_text())["version"], **manifest_fields)
    if mutate is not None:
        mutate(dest)
    rehash(dest)
    return dest


def set_version(bundle: Path, version: str, **manifest_fields) -> None:
    mf = bundle / "manifest.json"
    m = json.loads(mf.read_text())
    m["version"] = version
    m.update(manifest_fields)
    mf.write_text(json.dumps(m, indent=1) + "\n")


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def bump(version: str, major: int = 0, minor: int = 0, patch: int = 0) -> str:
    a, b, c = parse_version(version)
    return f"{a + major}.{b + minor}.{c + patch}"


def schema_validator(name: str):
    import jsonschema

    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


@pytest.fixture
def fleet(tmp_path) -> Fleet:
    return Fleet(tmp_path / "fleet")
