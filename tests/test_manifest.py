"""The typed bundle manifest: shipped values reach the pipeline; a missing required key is a BundleError naming it."""
from __future__ import annotations

import json
import shutil

import pytest

from appliance.inference.bundle import (BundleError, LesionOutput, ValidAreaOutput, default_bundle_dir, find_bundles,
                                        load_bundle)

SHIPPED = find_bundles(default_bundle_dir())


def _copy_with(tmp_path, name: str, change):
    dst = tmp_path / SHIPPED[name].path.name
    shutil.copytree(SHIPPED[name].path, dst)
    m = json.loads((dst / "manifest.json").read_text())
    change(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_shipped_manifests_are_typed_as_they_say():
    for b in SHIPPED.values():
        raw = b.manifest
        assert b.spec.task == raw["task"] and b.input_size == tuple(raw["input"]["size"])
        assert b.spec.input.window == tuple(float(v) for v in raw["input"]["window"])
        for key, value in raw["output"].items():
            if key != "kind":
                assert getattr(b.spec.output, key) == value, (b.name, key)
    assert isinstance(SHIPPED["lesion"].spec.output, LesionOutput)
    assert isinstance(SHIPPED["valid-area"].spec.output, ValidAreaOutput)


@pytest.mark.parametrize("name,key", [("lesion", "threshold"), ("lesion", "area_scale"), ("lesion", "min_score"),
                                      ("valid-area", "box_margin")])
def test_a_missing_required_value_is_named(tmp_path, name, key):
    dst = _copy_with(tmp_path, name, lambda m: m["output"].pop(key))
    with pytest.raises(BundleError, match=rf"{dst.name}/manifest.json: missing key 'output.{key}'"):
        load_bundle(dst, verify=False)


def test_wrong_types_and_tasks_are_refused(tmp_path):
    dst = _copy_with(tmp_path, "lesion", lambda m: m["output"].update(threshold="0.3"))
    with pytest.raises(BundleError, match="'output.threshold' must be a number"):
        load_bundle(dst, verify=False)
    dst = _copy_with(tmp_path / "t", "lesion", lambda m: m.update(task="classifier"))
    with pytest.raises(BundleError, match="'task' must be one of lesion, valid-area"):
        load_bundle(dst, verify=False)


def test_documented_defaults(tmp_path):
    dst = _copy_with(tmp_path, "valid-area", lambda m: (m["output"].pop("min_total_lung_cm2"), m.pop("selftest")))
    spec = load_bundle(dst, verify=False).spec
    assert spec.output.min_total_lung_cm2 == 0.0 and spec.selftest_atol == 0.08
    assert SHIPPED["lesion"].spec.output.min_crop_mm == 120.0


def _two_graphs(m, **change):
    first = m.pop("runtime_files", None) or m.pop("graphs")["first"]
    m["schema"] = "ctriage.bundle/2"
    m["graphs"] = {"first": first, "deferred": {k: "d-" + v for k, v in first.items()}, "ceiling": 0.25, **change}


def test_a_bundle_in_two_graphs_is_typed_and_checked(tmp_path):
    ok = _copy_with(tmp_path / "ok", "lesion", _two_graphs)
    spec = load_bundle(ok, verify=False).spec
    assert dict(spec.runtime_files) == dict(SHIPPED["lesion"].spec.runtime_files)
    assert spec.deferred is not None and spec.deferred.ceiling == 0.25
    assert set(spec.deferred.runtime_files) == set(spec.runtime_files)
    cases = [("valid-area", _two_graphs, "for lesion bundles only"),
             ("lesion", lambda m: _two_graphs(m, deferred={"onnx": "d.onnx"}), "must name the same runtimes"),
             ("lesion", lambda m: _two_graphs(m, ceiling=0), "'graphs.ceiling' is out of range"),
             ("lesion", lambda m: (_two_graphs(m), m["graphs"].pop("ceiling")), "missing key 'graphs.ceiling'"),
             ("lesion", lambda m: (_two_graphs(m), m.update(runtime_files={})), "both given"),
             ("lesion", lambda m: m.pop("runtime_files", None) or m.pop("graphs"), "missing key 'runtime_files'"),
             ("lesion", lambda m: m.update(schema="ctriage.bundle/3"), "update the appliance software first")]
    for i, (name, change, msg) in enumerate(cases):
        dst = _copy_with(tmp_path / str(i), name, change)
        with pytest.raises(BundleError, match=msg):
            load_bundle(dst, verify=False)
