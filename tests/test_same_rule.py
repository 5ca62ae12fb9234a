"""One case rule for every caller: `analyze`, `evaluate`, `bench` and the daemon (over a real mosquitto) give the
same verdict — result, the run that fired, the focal lesion named — on the same series, with the shipped bundles."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest

from appliance.config import AnalysisConfig, Config
from appliance.phantom import PhantomSpec, write_phantom
from appliance.privacy import pseudonym

from .test_daemon import PHANTOM, drop
from .test_mqtt import Collector


def _core(result: str, evidence: dict | None, focal: dict | None) -> str:
    return json.dumps({"result": result, "evidence": evidence, "focal": focal}, sort_keys=True)


@pytest.fixture(scope="module")
def shipped():
    from appliance.inference.bundle import BundleError
    from appliance.pipeline.analyzer import Analyzer

    try:
        return Analyzer.load(AnalysisConfig(backend="onnxruntime"))
    except BundleError as e:
        print(f"SKIP: no shipped bundles: {e}")
        pytest.skip(f"no shipped bundles: {e}")


@pytest.mark.slow
def test_analyze_evaluate_bench_and_the_daemon_agree(tmp_path, mosquitto, shipped):
    from appliance.oneshot import analyze_path
    from appliance.bench import bench_backend
    from appliance.daemon import Daemon
    from appliance.evaluate import evaluate

    series = {"two-foci": write_phantom(tmp_path / "two", PhantomSpec(**PHANTOM, lesion=True)),
              "one-focus": write_phantom(tmp_path / "one", PhantomSpec(**PHANTOM, lesion=True, second_focus=None,
                                                                        seed=4))}
    calls: dict[str, dict[str, tuple]] = {name: {} for name in series}
    data = tmp_path / "dataset"
    for name, files in series.items():
        folder = files[0].parent
        (rep,), _ = analyze_path(folder, shipped, b"k" * 32)
        v = rep.verdict
        calls[name]["analyze"] = _core(v.result, v.evidence and v.evidence.as_dict(), v.focal and v.focal.as_dict())
        b = bench_backend(folder, "onnxruntime", "int8", None, 4)
        calls[name]["bench"] = _core(b["result"], b["evidence"], b["focal"])
        shutil.copytree(folder, data / "covid" / name)
    for p in evaluate(data, shipped).patients:
        calls[p.source.name]["evaluate"] = _core(p.result, p.evidence, p.focal)

    cfg = Config(device_id="ct-rule", state_dir=str(tmp_path / "state"))
    cfg.analysis.backend = "onnxruntime"
    cfg.watch.dir, cfg.watch.stable_seconds, cfg.watch.rescan_seconds = str(tmp_path / "watch"), 0.2, 0.5
    cfg.watch.min_free_mb, cfg.series.quiet_seconds, cfg.mqtt.url = 0, 1.0, mosquitto.url
    sub = Collector(mosquitto.url, ["ctriage/ct-rule/verdict/#"])
    d = Daemon(cfg, analyzer=shipped)
    d.start()
    try:
        keys = {pseudonym(d.secret, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)): name
                for name, files in series.items()}
        for name, files in series.items():
            drop(files, Path(cfg.watch.dir) / name)
        for key, name in keys.items():
            m = sub.wait_for(lambda m, k=key: m[0].endswith(k) and b'"final"' in m[1], timeout=120)
            v = json.loads(m[1])
            calls[name]["daemon"] = _core(v["result"], v["evidence"], v["focal"])
    finally:
        d.stop()
        sub.close()
    for name, by_caller in calls.items():
        assert len(by_caller) == 4, by_caller.keys()
        assert len(set(by_caller.values())) == 1, (name, by_caller)
    print({name: by_caller["daemon"] for name, by_caller in calls.items()})
    assert json.loads(calls["two-foci"]["daemon"])["result"] == "positive", "the phantom's two foci fire the rule"
    one = json.loads(calls["one-focus"]["daemon"])
    assert one["result"] == "negative" and one["focal"] is not None, "a single focus is named, not flagged"
