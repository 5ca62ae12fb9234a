"""`ctriage bench` runs end to end and reports every field (no timing assertions)."""
from __future__ import annotations

import json

import pytest

from appliance.cli import main
from appliance.inference.bundle import default_bundle_dir, find_bundles
from appliance.inference.factory import available_backends

STAGES = {"headers", "decode", "valid_area", "lesion_pre", "lesion_infer", "boxes", "measures", "case_logic"}


def test_bench_json_reports_every_field(capsys):
    assert main(["bench", "--json", "--slices", "24"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["backends"]) == set(available_backends())
    assert res["machine"]["cores"] >= 1 and res["machine"]["cpu"]
    for name, r in res["backends"].items():
        assert "error" not in r, r
        assert r["slices"] == 24
        assert r["slices_per_s"] > 0 and r["study_515_s"] > 0
        assert set(r["stage_ms"]) == STAGES
        assert all({"median", "p95"} <= set(v) for v in r["stage_ms"].values())
        # per slice within one worker: the analysis stages fit in the time the workers had per slice (a unit
        # slip, ms vs s or a wrong divisor, is off by orders of magnitude)
        analysis = sum(r["stage_ms_mean"][k] for k in ("valid_area", "lesion_pre", "lesion_infer", "boxes",
                                                        "measures"))
        assert 0 < analysis <= 3 * r["workers"] * 1000.0 / r["slices_per_s"], (r["stage_ms_mean"], r)
        assert r["streaming_latency_s"] > 0
        # the rule re-applied after every take: at least once, and far less than the whole run (a unit slip: ms)
        assert r["rule_take"] == r["workers"] * r["batch"]
        assert 0 < r["rule_stream_s"] < r["wall_s"], (r["rule_stream_s"], r["wall_s"])
        assert 50 < r["peak_rss_mb"] < 4096
        assert r["result"] in ("positive", "negative", "indeterminate")
        assert {b["name"] for b in r["bundles"]} == {"valid-area", "lesion"}
        assert r["workers"] >= 1 and r["batch"] >= 1
        lesion = find_bundles(default_bundle_dir())["lesion"]  # the bundle the bench ran (the shipped one)
        if lesion.spec.deferred is None:
            assert r["deferred_share"] is None
        else:  # the phantom has lung slices without lesion: the second graph is skipped on some, run on others
            assert 0 < r["deferred_share"] < 1, r["deferred_share"]
        assert r["pixels"] == "Explicit VR Little Endian: pydicom"


@pytest.mark.parametrize("syntax,name", [("jpeg-lossless", "JPEG Lossless, Non-Hierarchical, First-Order Prediction"),
                                         ("jpeg-ls", "JPEG-LS Lossless Image Compression")])
def test_bench_says_which_codec_decodes_compressed_series(capsys, syntax, name):
    pytest.importorskip("imagecodecs", reason="imagecodecs is not installed: pydicom's own decoders run")
    backend = available_backends()[0]
    assert main(["bench", "--slices", "8", "--backend", backend, "--syntax", syntax]) == 0
    out = capsys.readouterr().out
    assert f"pixels: {name}" in out and ": imagecodecs " in out


def test_bench_workers_and_batch_reach_the_pipeline(capsys):
    backend = available_backends()[0]
    assert main(["bench", "--json", "--slices", "12", "--backend", backend, "--threads", "2", "--workers", "1",
                 "--batch", "2"]) == 0
    r = json.loads(capsys.readouterr().out)["backends"][backend]
    assert (r["workers"], r["batch"]) == (1, 2) and "streams" not in r["device"]
    assert main(["bench", "--json", "--slices", "12", "--backend", backend, "--threads", "2", "--workers", "2"]) == 0
    r = json.loads(capsys.readouterr().out)["backends"][backend]
    assert r["workers"] == 2 and "2 streams" in r["device"]
    assert main(["bench", "--slices", "12", "--workers", "0"]) == 2
    assert "--workers must be between 1 and 256" in capsys.readouterr().err


def test_bench_runs_with_the_configuration_it_is_given(tmp_path, capsys):
    backend = available_backends()[0]
    cfg = tmp_path / "site.toml"
    cfg.write_text("[analysis]\ndensity_check = false\nnoise_target = 0.012\n")
    assert main(["bench", "--json", "--slices", "8", "--backend", backend, "--config", str(cfg)]) == 0
    r = json.loads(capsys.readouterr().out)["backends"][backend]
    assert r["settings"] == {"density_check": False, "noise_target": 0.012}  # what the child ran with
    assert main(["bench", "--json", "--slices", "8", "--backend", backend]) == 0
    assert json.loads(capsys.readouterr().out)["backends"][backend]["settings"] == {}
    assert main(["bench", "--slices", "8", "--backend", backend, "--config", str(cfg)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("settings from the configuration"))
    assert "density_check = false" in line and "noise_target = 0.012" in line
    bad = tmp_path / "bad.toml"
    bad.write_text("[analysis]\nnoise_target = 5\n")
    assert main(["bench", "--slices", "8", "--backend", backend, "--config", str(bad)]) == 2
    assert "noise_target" in capsys.readouterr().err


def test_bench_table_and_bad_path(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_bench_runs_the_bundles_it_is_given(tmp_path, capsys):
    """--bundles: a candidate bundle set is measured instead of the shipped one."""
    import shutil

    from appliance.inference.bundle import default_bundle_dir, find_bundles, load_bundle

    shipped = find_bundles(default_bundle_dir())
    for b in shipped.values():
        shutil.copytree(b.path, tmp_path / b.path.name)
    cand = tmp_path / shipped["lesion"].path.name / "manifest.json"
    m = json.loads(cand.read_text())
    m["version"] = "0.0.1"
    cand.write_text(json.dumps(m))
    want = {(b.name, b.version, b.sha256) for b in (shipped["valid-area"], load_bundle(cand.parent))}
    assert main(["bench", "--json", "--slices", "8", "--backend", "openvino", "--bundles", str(tmp_path)]) == 0
    r = json.loads(capsys.readouterr().out)["backends"]["openvino"]
    assert {(b["name"], b["version"], b["sha256"]) for b in r["bundles"]} == want
    assert main(["bench", "--bundles", str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()  # a folder without bundles: each backend reports why, and the exit status says it failed
    assert main(["bench", "--slices", "4", "--backend", "openvino", "--bundles", str(empty)]) == 1
    assert "no valid-area or lesion bundle" in capsys.readouterr().out
