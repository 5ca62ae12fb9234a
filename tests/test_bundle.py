"""Bundle manifests: consistent, hashes pinned, versions compared numerically, self-test catches drift."""
from __future__ import annotations

import json
import shutil

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
        for rel in m["runtime_files"].values():
            assert rel in m["files"]
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


def test_shipped_bundles_are_signed_with_the_current_project_key():
    from appliance.fleet.signing import load_trust, verify_bundle
    from appliance.fleet.updater import default_trust_keys, project_keys

    keys = project_keys()
    assert [k.name for k in keys][:5] == ["ctriage-project-k1.pub", "ctriage-project-k2.pub",
                                          "ctriage-project-k3.pub", "ctriage-project-k4.pub",
                                          "ctriage-project-k5.pub"]
    assert default_trust_keys() == [str(k) for k in keys]  # every project key trusted when no site key is set
    trust = load_trust([keys[-1]])  # the newest key signs what ships; older ones stay trusted for installed bundles
    for b in find_bundles(default_bundle_dir()).values():
        assert (b.path / "manifest.sig").is_file()
        bundle, key = verify_bundle(b.path, trust)  # raises with the reason when anything does not hold
        assert bundle.sha256 == b.sha256
