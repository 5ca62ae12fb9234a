"""Bundle signing (appliance/fleet/signing.py), announcements and transfer archives; plus the bundle helpers the
fleet tests share (test_updater.py, test_models_cli.py import them from here).

Test bundles are copies of the shipped ones (models/bundles) when both are there; otherwise (a checkout before the
models are exported) tiny real ONNX/OpenVINO models are generated with `onnx`, and without it the tests skip.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest

from appliance.fleet import announce, transfer
from appliance.fleet.signing import (SignatureError, generate_keypair, load_private_key, load_public_key, load_trust,
                                     rehash, sign_bundle, verify_bundle)
from appliance.fleet.bundle_store import REQUIRED
from appliance.inference.bundle import BundleError, default_bundle_dir, find_bundles, load_bundle, parse_version

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "config" / "schemas"


# ---- shared helpers ----------------------------------------------------------------------------------------------

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


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Two key pairs: 'fleet' (trusted by the appliances under test) and 'other' (not trusted)."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for k in ("fleet", "other"):
        key, pub = generate_keypair(d / k)
        out[k], out[f"{k}_pub"] = key, pub
    return out


def set_version(bundle: Path, version: str, **manifest_fields) -> None:
    mf = bundle / "manifest.json"
    m = json.loads(mf.read_text())
    m["version"] = version
    m.update(manifest_fields)
    mf.write_text(json.dumps(m, indent=1) + "\n")


def make_variant(src: Path, dest: Path, version: str | None = None, key: Path | None = None, mutate=None,
                 **manifest_fields) -> Path:
    """Copy a bundle, set its version (and manifest fields), apply mutate(dir), rehash, sign with `key`."""
    shutil.copytree(src, dest)
    (dest / "manifest.sig").unlink(missing_ok=True)
    if version is not None or manifest_fields:
        set_version(dest, version or json.loads((dest / "manifest.json").read_text())["version"], **manifest_fields)
    if mutate is not None:
        mutate(dest)
    rehash(dest)
    if key is not None:
        sign_bundle(dest, load_private_key(key))
    return dest


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


# ---- signing ------------------------------------------------------------------------------------------------------

@pytest.fixture
def lesion(tmp_path, source_bundles, keys) -> Path:
    return make_variant(source_bundles["lesion"], tmp_path / "lesion", key=keys["fleet"])


def test_keygen_writes_private_key_0600_and_refuses_to_overwrite(tmp_path):
    key, pub = generate_keypair(tmp_path / "k")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert load_public_key(pub).key_id == load_trust([pub])[0].key_id
    with pytest.raises(SignatureError, match="already exists"):
        generate_keypair(tmp_path / "k")


def test_sign_verify_round_trip(lesion, keys):
    b, signer = verify_bundle(lesion, load_trust([keys["fleet_pub"]]))
    assert b.name == "lesion" and signer.source == str(keys["fleet_pub"])
    assert len((lesion / "manifest.sig").read_text().strip()) == 88  # base64 of 64 bytes


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "manifest.sig").unlink(), "no manifest.sig"),
    (lambda d: set_version(d, "99.0.0"), "signature does not verify with any trusted key"),
    (lambda d: flip_byte(d / "selftest.npz"), "file selftest.npz sha256 mismatch"),
    (lambda d: (d / "notes.txt").write_text("extra"), "unlisted file notes.txt"),
    (lambda d: (d / "model.onnx").unlink(), "file model.onnx missing"),
    (lambda d: os.symlink("/etc/passwd", d / "link"), "unexpected symlink link"),
    (lambda d: (d / "manifest.sig").write_text("not base64!"), "signature is not base64"),
])
def test_verify_names_the_problem(lesion, keys, damage, reason):
    damage(lesion)
    with pytest.raises(BundleError) as e:
        verify_bundle(lesion, load_trust([keys["fleet_pub"]]))
    assert str(e.value).startswith(reason), str(e.value)


def test_unknown_key_and_no_trust_are_refused(lesion, keys):
    with pytest.raises(SignatureError, match="^signature does not verify with any trusted key$"):
        verify_bundle(lesion, load_trust([keys["other_pub"]]))
    with pytest.raises(SignatureError, match="no trusted keys configured"):
        verify_bundle(lesion, [])
    # more than one trusted key: any of them may have signed
    _, signer = verify_bundle(lesion, load_trust([keys["other_pub"], keys["fleet_pub"]]))
    assert signer.source == str(keys["fleet_pub"])


def test_unsafe_manifest_path_is_refused(lesion, keys):
    m = json.loads((lesion / "manifest.json").read_text())
    m["files"]["../outside"] = "0" * 64
    (lesion / "manifest.json").write_text(json.dumps(m))
    sign_bundle_err = pytest.raises(BundleError, match="unsafe path '../outside'")
    with sign_bundle_err:
        sign_bundle(lesion, load_private_key(keys["fleet"]))


def test_sign_refuses_a_bundle_that_does_not_match_its_manifest(lesion, keys):
    (lesion / "model.onnx").write_bytes(b"changed")
    with pytest.raises(BundleError, match="file model.onnx sha256 mismatch"):
        sign_bundle(lesion, load_private_key(keys["fleet"]))
    sign_bundle(lesion, load_private_key(keys["fleet"]), rehash_files=True)  # on purpose: rehash, then sign
    verify_bundle(lesion, load_trust([keys["fleet_pub"]]))


def test_load_private_key_rejects_other_files(tmp_path, keys):
    with pytest.raises(SignatureError, match="not an unencrypted PEM private key"):
        load_private_key(keys["fleet_pub"])
    with pytest.raises(SignatureError, match="private key not found"):
        load_private_key(tmp_path / "nope")


# ---- archive and announcement -----------------------------------------------------------------------------------

def test_archive_is_deterministic_and_unpacks_to_a_verifying_bundle(lesion, keys, tmp_path):
    a1, a2 = transfer.pack(lesion), transfer.pack(lesion)
    assert a1 == a2
    (tmp_path / "a.tar").write_bytes(a1)
    out = transfer.unpack(tmp_path / "a.tar", tmp_path / "out")
    verify_bundle(out, load_trust([keys["fleet_pub"]]))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in lesion.iterdir())


@pytest.mark.parametrize("member, reason", [
    (lambda: _ti("../evil", b"x"), "unsafe path"),
    (lambda: _ti("/abs", b"x"), "unsafe path"),
    (lambda: _ti("link", b"", tarfile.SYMTYPE, "/etc/passwd"), "not a regular file"),
])
def test_unpack_refuses_unsafe_members(tmp_path, member, reason):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ti, data = member()
        tar.addfile(ti, io.BytesIO(data) if data else None)
    (tmp_path / "a.tar").write_bytes(buf.getvalue())
    with pytest.raises(transfer.TransferError, match=reason):
        transfer.unpack(tmp_path / "a.tar", tmp_path / "out")


def _ti(name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.linkname = kind, len(data), link
    return ti, data


def test_announcement_is_schema_valid_and_verifies(lesion, keys):
    ann, archive, chunks = announce.build(lesion, load_private_key(keys["fleet"]), devices=["ct-room-2"],
                                          groups=["pilot"], chunk_size=64 * 1024, url="https://models.example/x.tar")
    schema_validator("bundle").validate(ann)
    a = announce.Announcement.parse(json.dumps(ann))
    assert b"".join(chunks) == archive and len(a.chunks) == len(chunks)
    assert a.verify(load_trust([keys["fleet_pub"]])).source == str(keys["fleet_pub"])
    assert a.targets("ct-room-2", []) and a.targets("ct-room-9", ["pilot"]) and not a.targets("ct-room-9", ["b"])
    with pytest.raises(SignatureError, match="signature does not verify"):
        a.verify(load_trust([keys["other_pub"]]))
    # widening the targets without the key breaks the targets signature
    ann["targets"] = {"devices": [], "groups": []}
    with pytest.raises(SignatureError, match="targets signature does not verify"):
        announce.Announcement.parse(json.dumps(ann)).verify(load_trust([keys["fleet_pub"]]))


@pytest.mark.parametrize("edit, reason", [
    (lambda a: a.update(sha256="0" * 64), "sha256 does not match its manifest"),
    (lambda a: a.update(name="valid-area"), "published on the topic of 'lesion'"),
    (lambda a: a["inline"].update(topic="elsewhere"), "inline topic"),
    (lambda a: a["archive"].update(size=1), "chunk sizes do not add up"),
    (lambda a: a.pop("signature"), "no 'signature'"),
    (lambda a: a.update(schema="x"), "schema 'x'"),
])
def test_malformed_announcements_say_why(lesion, keys, edit, reason):
    ann, _, _ = announce.build(lesion, load_private_key(keys["fleet"]))
    edit(ann)
    with pytest.raises(announce.AnnouncementError, match=reason):
        announce.Announcement.parse(json.dumps(ann), topic_name="lesion")


def test_topics():
    assert announce.parse_topic("ctriage", "ctriage/fleet/bundle/lesion") == ("lesion", None, None)
    assert announce.parse_topic("ctriage", "ctriage/fleet/bundle/lesion/1.2.3/chunk/7") == ("lesion", "1.2.3", 7)
    assert announce.parse_topic("ctriage", "ctriage/fleet/bundle/lesion/x/chunk/7") is None
    assert announce.parse_topic("ctriage", "ctriage/dev/update") is None


def test_publish_refuses_a_bundle_not_signed_by_the_key(lesion, keys):
    with pytest.raises(SignatureError, match="signature does not verify"):
        announce.build(lesion, load_private_key(keys["other"]))
    (lesion / "manifest.sig").unlink()
    with pytest.raises(SignatureError, match="no manifest.sig"):
        announce.build(lesion, load_private_key(keys["fleet"]))


def test_find_bundles_resolves_symlinked_bundles(lesion, tmp_path):
    d = tmp_path / "active"
    d.mkdir()
    (d / "lesion").symlink_to(lesion)
    b = find_bundles(d)["lesion"]
    assert b.path == lesion.resolve()
    assert load_bundle(b.path).sha256 == b.sha256
