"""Bundle manifests: consistent, hashes pinned, versions compared numerically, self-test catches drift."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance.inference.bundle import BundleError, default_bundle_dir, find_bundles, load_bundle, parse_version


def test_manifests_are_complete():
    for b in find_bundles(default_bundle_dir()).values():
        m = b.manifest
        assert m["name"] in ("valid-area", "lesion")
        parse_version(m["version"])
        assert m["input"]["window"] == [-1350, 150]
        assert 0 < m["output"]["threshold"] < 1
        for rel in (r for g in b.spec.graphs() for r in g.values()):  # each graph's files, an IR's weights too, are pinned
            assert rel in m["files"] and (not rel.endswith(".xml") or rel[:-4] + ".bin" in m["files"])
        assert "non-commercial" in m["licence"].lower() or "noncommercial" in m["licence"].lower()
        assert (b.path / "MODEL_CARD.md").is_file()
        assert {"fp32_vs_int8_onnxruntime_mask_dice", "fp32_vs_int8_openvino_mask_dice"} <= set(m["quantization"])


def test_versions_compare_numerically():
    assert parse_version("1.10.0") > parse_version("1.9.3")
    with pytest.raises(BundleError):
        parse_version("1.2")


def test_tampered_file_is_detected(tmp_path):
    src = find_bundles(default_bundle_dir())["valid-area"].path
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    load_bundle(dst)  # intact copy verifies
    with open(dst / "model.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="model.onnx sha256"):
        load_bundle(dst)


def test_selftest_catches_a_changed_model(tmp_path):
    src = find_bundles(default_bundle_dir())["valid-area"].path
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    st = dict(np.load(dst / "selftest.npz"))
    st["expected_fp32"] = 1.0 - st["expected_fp32"]
    np.savez_compressed(dst / "selftest.npz", **st)
    m = json.loads((dst / "manifest.json").read_text())
    from appliance.inference.bundle import sha256_file

    m["files"]["selftest.npz"] = sha256_file(dst / "selftest.npz")
    (dst / "manifest.json").write_text(json.dumps(m))
    b = load_bundle(dst)
    with pytest.raises(BundleError, match="self-test failed"):
        b.selftest(b.adapter("auto", "fp32", threads=1))


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="invalid JSON"):
        load_bundle(tmp_path)


def test_shipped_bundles_verify_with_the_tuf_chain_from_the_shipped_root():
    """Every shipped bundle is a release in the committed repository (models/repository), whose chain verifies
    from the root shipped as the appliances' trust anchor (config/trust/root.json); no flat key is trusted, no
    private key is in the tree. Expiry does not matter at rest (the committed timestamp may have expired)."""
    from appliance.fleet.bundle_files import whole_bundle
    from appliance.fleet.release import releases
    from appliance.fleet.trust import PROJECT_ANCHOR, verify_at_rest

    root_dir = Path(__file__).resolve().parents[1]
    assert PROJECT_ANCHOR.is_file() and not list((root_dir / "config" / "trust").glob("*.pub"))
    root, targets, _ = verify_at_rest(root_dir / "models" / "repository", PROJECT_ANCHOR.read_bytes())
    named = {r.manifest_sha256: r for r in releases(targets.targets)[0]}
    shipped = find_bundles(default_bundle_dir())
    assert shipped
    for b in shipped.values():
        assert not (b.path / "manifest.sig").exists()
        whole = whole_bundle(b.path)  # raises with the reason when a file does not match
        rel = named[whole.sha256]
        assert (rel.name, rel.version) == (b.name, b.version) and not rel.devices and not rel.groups
    public = (root_dir / "config" / "trust" / "root.json").read_text()
    assert "PRIVATE" not in public
    for p in list((root_dir / "models").rglob("*")) + list((root_dir / "config").rglob("*")):
        if p.is_file() and p.stat().st_size < 1_000_000:
            assert b"PRIVATE KEY-----" not in p.read_bytes(), p
