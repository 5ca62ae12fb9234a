"""Training helpers (models/): the split and fine-tuning from a shipped bundle. Needs the `train` extra (torch)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def train_extra(module: str):
    """Import a module of the `train` extra, or skip the test saying it is not installed."""
    return pytest.importorskip(module, reason=f"{module} is in the `train` extra, not installed here")


def test_held_out_split_is_fixed_and_sized():
    from models.data import held_out

    a, b = held_out(0), held_out(0)
    assert a == b  # training and models.make_eval_set draw the same held-back slices
    assert len(a["doctor"]) == 10 and len(a["noncovid"]) == 140
    assert max(a["doctor"]) < 50 and max(a["noncovid"]) < 700
    assert held_out(1) != a


def test_fine_tune_starts_from_a_shipped_unetpp_model():
    """A from-scratch UNet++ (the valid-area model; lesion model 1 in the git history) can be fine-tuned from its
    bundle when the training checkpoint is gone."""
    torch = train_extra("torch")
    train_extra("onnx")
    import onnxruntime as ort

    from appliance.inference.bundle import default_bundle_dir, find_bundles
    from models.train import load_folded_onnx
    from models.unetpp import UNetPP

    b = find_bundles(default_bundle_dir())["valid-area"]
    arch = b.manifest["arch"]
    model = UNetPP(arch["width"], arch["levels"], stem=arch.get("stem", 1))
    load_folded_onnx(model, b.path / "model.onnx")
    model.eval()
    x = np.random.default_rng(0).random((2, 1) + tuple(b.input_size), dtype=np.float32)
    with torch.no_grad():
        mine = torch.sigmoid(model(torch.from_numpy(x))).numpy()
    sess = ort.InferenceSession(str(b.path / "model.onnx"), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.abs(mine - ref).max() < 1e-4

    wrong = UNetPP(arch["width"] * 2, arch["levels"])
    with pytest.raises(ValueError, match="weight"):
        load_folded_onnx(wrong, b.path / "model.onnx")


def test_make_eval_set_builds_evaluate_layout_outside_the_project(tmp_path):
    from tests.conftest import shared_data

    shared_data("covid-semiseg")
    shared_data("lung-pet-ct-dx-A0001")
    train_extra("nibabel")
    from appliance.evaluate import find_patients
    from models.make_eval_set import build_images, main

    counts = build_images(tmp_path / "images")
    assert counts == {"covid": 10, "control": 140}
    pats = {p.name: p for p in find_patients(tmp_path / "images")}
    assert set(pats) == {"doctor-val", "noncovid-val"}
    assert pats["doctor-val"].masks is not None and len(list(pats["doctor-val"].masks.iterdir())) == 10
    assert all(f.is_symlink() for f in pats["noncovid-val"].folder.iterdir())  # links: nothing copied

    project = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit, match="inside the project"):
        main([str(project / "eval-here")])
    assert not (project / "eval-here").exists()


def test_pseudo_patients_group_a_cases_series():
    from models.make_eval_set import pseudo_patient

    assert pseudo_patient("coronacases_org_004") == "coronacases-004"
    assert pseudo_patient("radiopaedia_org_covid-19-pneumonia-29_86490_1-dcm") == "radiopaedia-29"
    assert pseudo_patient("radiopaedia_org_covid-19-pneumonia-29_86491_1-dcm") == "radiopaedia-29"
    assert pseudo_patient("radiopaedia_org_covid-19-pneumonia-7_85703_0-dcm") == "radiopaedia-7"
    with pytest.raises(ValueError, match="not a pseudo-labelled series"):
        pseudo_patient("Non-Covid (12)")


def test_pseudo_patients_set_has_every_series_under_its_patient(tmp_path):
    from tests.conftest import shared_data

    shared_data("covid-semiseg")
    from appliance.evaluate import find_patients
    from models.make_eval_set import build_pseudo_patients

    counts = build_pseudo_patients(tmp_path)
    assert sum(counts.values()) == 1189 and len(counts) == 12  # 14 series of 12 patients
    pats = {p.name: p for p in find_patients(tmp_path)}
    assert set(pats) == set(counts) and {p.group for p in pats.values()} == {"covid"}
    assert sorted(d.name[-7:] for d in pats["radiopaedia-29"].folder.iterdir()) == ["0_1-dcm", "1_1-dcm"]
    assert all(f.is_symlink() for d in pats["radiopaedia-10"].folder.iterdir() for f in d.iterdir())


def test_make_series_refuses_the_project_and_answers_help(capsys):
    from models.make_series import main

    project = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit):
        main([str(project / "series-here")])
    assert "inside the project" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ex:
        main(["--help"])
    assert ex.value.code == 0 and "scratch folder" in capsys.readouterr().out
    assert not (project / "series-here").exists() and not (project / "--help").exists()


def test_rebundle_keeps_the_model_files_and_records_new_thresholds(tmp_path):
    train_extra("torch")
    import json

    from appliance.inference.bundle import default_bundle_dir, find_bundles, load_bundle
    from models.export import rebundle

    src = find_bundles(default_bundle_dir())["lesion"]
    inputs = np.load(src.path / "selftest.npz")["inputs"].astype(np.float32)
    out = rebundle(src.path, "99.0.0", {"threshold": 0.3}, "test", dest_root=tmp_path, inputs=inputs)
    b = load_bundle(out, verify=True)  # every file hash in the new manifest matches
    m = json.loads((out / "manifest.json").read_text())
    assert (b.name, b.version) == (src.name, "99.0.0") and b.sha256 != src.sha256
    assert m["output"]["threshold"] == 0.3 and m["quantization"]["mask_threshold"] == 0.3
    assert m["output"]["min_score"] == src.manifest["output"]["min_score"]  # untouched fields carried over
    assert m["derived_from"] == {"name": src.name, "version": src.version, "manifest_sha256": src.sha256,
                                 "same_model_files": True, "reason": "test"}
    for f in src.manifest["files"]:  # every file as it was (a second graph too)
        assert m["files"][f] == src.manifest["files"][f], f
    assert not (out / "manifest.sig").exists()  # a derived bundle is unsigned until the release key signs it
    assert 0.9 <= m["quantization"]["fp32_vs_int8_openvino_mask_dice"] <= 1.0
    with pytest.raises(SystemExit):
        rebundle(out, "99.0.0", {}, "same version", dest_root=tmp_path, inputs=inputs)


def test_requantize_keeps_the_fp32_model_and_rebuilds_int8(tmp_path):
    train_extra("torch")
    import json

    import onnx

    from appliance.inference.bundle import default_bundle_dir, find_bundles, load_bundle
    from appliance.inference.openvino_adapter import OpenVINOAdapter
    from models.export import requantize

    src = find_bundles(default_bundle_dir())["lesion"]
    inputs = np.load(src.path / "selftest.npz")["inputs"].astype(np.float32)
    if src.spec.deferred is not None:  # two graphs: rebuilt by models.ensemble, not requantized
        with pytest.raises(SystemExit, match="two graphs"):
            requantize(src.path, "99.0.1", 1, 1, "test", dest_root=tmp_path, calib=inputs, inputs=inputs)
        src = max((load_bundle(d, verify=True) for d in default_bundle_dir().glob("lesion-*")
                   if "graphs" not in json.loads((d / "manifest.json").read_text())),
                  key=lambda b: tuple(int(v) for v in b.version.split(".")))
    out = requantize(src.path, "99.0.1", 1, 1, "test", dest_root=tmp_path, calib=inputs, inputs=inputs)
    b = load_bundle(out, verify=True)
    m = json.loads((out / "manifest.json").read_text())
    assert m["files"]["model.onnx"] == src.manifest["files"]["model.onnx"]  # the same FP32 model
    assert m["files"]["model.int8.onnx"] != src.manifest["files"]["model.int8.onnx"]
    assert m["derived_from"]["same_fp32_model"] and m["derived_from"]["version"] == src.version
    convs = [n.name for n in onnx.load(str(out / "model.int8.onnx")).graph.node if n.op_type == "Conv"]
    if m["arch"]["type"] == "ensemble":  # each member keeps its own first and last convolution
        from models.ensemble import PREFIX

        want = set()
        for i in range(len(m["arch"]["members"])):
            own = [c for c in convs if c.startswith(PREFIX.format(i))]
            want |= {own[0], own[-1]}
        assert set(m["quantization"]["kept_fp32"]) == want
    else:
        assert m["quantization"]["kept_fp32"] == [convs[0], convs[-1]]  # only these stay float convolutions
    assert 0.5 <= m["quantization"]["fp32_vs_int8_openvino_mask_dice"] <= 1.0
    report = b.selftest(OpenVINOAdapter(b.path / "openvino" / "model.xml", "int8"))  # regenerated expectations
    assert report["max_abs_diff"] <= 1e-4
    new, old = np.load(out / "selftest.npz"), np.load(src.path / "selftest.npz")
    assert np.array_equal(new["expected_fp32"], old["expected_fp32"])
    assert not np.array_equal(new["expected_int8_openvino"], old["expected_int8_openvino"])
    assert not (out / "manifest.sig").exists()


def test_requantize_can_build_the_openvino_model_with_filtered_upsampling(tmp_path):
    train_extra("torch")
    import json

    from appliance.inference.bundle import default_bundle_dir, find_bundles, load_bundle
    from appliance.inference.openvino_adapter import OpenVINOAdapter
    from models.export import requantize
    from tests.test_graph import interpolate_modes

    src = find_bundles(default_bundle_dir())["valid-area"]
    inputs = np.load(src.path / "selftest.npz")["inputs"].astype(np.float32)
    plain = requantize(src.path, "99.0.1", 2, 1, "test", dest_root=tmp_path / "a", calib=inputs, inputs=inputs)
    filt = requantize(src.path, "99.0.1", 2, 1, "test", dest_root=tmp_path / "b", calib=inputs, inputs=inputs,
                      filter_upsample=True)
    assert set(interpolate_modes(plain / "openvino" / "model.xml")) == {"linear_onnx"}
    assert set(interpolate_modes(filt / "openvino" / "model.xml")) == {"nearest"}
    for f in ("model.onnx", "model.int8.onnx"):  # ONNX Runtime keeps its graph, byte for byte
        assert (plain / f).read_bytes() == (filt / f).read_bytes()
    q = json.loads((filt / "manifest.json").read_text())["quantization"]
    assert q["openvino_upsampling_rewrite"]["replaced"] == 3 and q["openvino_upsampling_rewrite"]["max_abs_diff"] < 1e-5
    assert q["int8_onnxruntime_vs_int8_openvino_mask_dice"] >= 0.95
    b = load_bundle(filt, verify=True)
    assert b.selftest(OpenVINOAdapter(b.path / "openvino" / "model.xml", "int8"))["max_abs_diff"] <= 1e-4


def test_deep_supervision_adds_outputs_not_parameters():
    torch = train_extra("torch")
    from models.train import loss_fn
    from models.unetpp import UNetPP

    torch.manual_seed(0)
    m = UNetPP(4, 3).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        outs = m.forward_all(x)
        assert len(outs) == 2 and all(o.shape == (2, 1, 32, 32) for o in outs)
        assert torch.equal(outs[-1], m(x))  # the full model's output last
        assert not torch.allclose(outs[0], outs[-1])  # the shallower node's own map
    y = (torch.rand(2, 1, 32, 32) > 0.7).float()
    w = torch.ones(2)
    m.train()
    loss = loss_fn(m.forward_all(x)[0], y, w, w)
    loss.backward()  # the shallow output trains the shared head and the nodes under it, not the deeper ones
    assert m.head.weight.grad is not None and m.nodes["x0_1"][0].weight.grad is not None
    assert m.nodes["x0_2"][0].weight.grad is None


def test_weight_average_of_two_models():
    torch = train_extra("torch")
    from models.soup import average_state
    from models.unetpp import UNetPP

    torch.manual_seed(0)
    a, b = UNetPP(4, 2).state_dict(), UNetPP(4, 2).state_dict()
    b = {k: (v + 1.0 if v.dtype.is_floating_point else v + 3) for k, v in b.items()}
    mid = average_state(a, b, 0.25)
    k = "nodes.x0_0.0.weight"
    assert torch.allclose(mid[k], 0.25 * a[k] + 0.75 * b[k])
    assert torch.equal(average_state(a, b, 1.0)[k], a[k])
    counter = "nodes.x0_0.1.num_batches_tracked"
    assert mid[counter].dtype == torch.int64 and mid[counter] == b[counter]  # integer buffers are not averaged
    model = UNetPP(4, 2)
    model.load_state_dict(mid)  # a valid model of the same architecture
    with pytest.raises(ValueError, match="alpha"):
        average_state(a, b, 1.5)
    with pytest.raises(ValueError, match="differ in parameters"):
        average_state(a, UNetPP(4, 3).state_dict(), 0.5)


def test_nearest_upsampling_has_the_same_parameters_and_exports_as_nearest_resize(tmp_path):
    torch = train_extra("torch")
    onnx = train_extra("onnx")
    from models.unetpp import UNetPP

    torch.manual_seed(0)
    lin = UNetPP(8, 3, with_sigmoid=True).eval()
    near = UNetPP(8, 3, with_sigmoid=True, upsample="nearest").eval()
    near.load_state_dict(lin.state_dict())  # same parameters: a bilinear model fine-tunes into a nearest one
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        a, b = lin(x), near(x)
    assert a.shape == b.shape and 0 < float((a - b).abs().max()) < 0.5  # close, not the same function
    from models.export import export_onnx

    export_onnx(near, 64, tmp_path / "m.onnx")  # as the bundles are built
    modes = {a.s for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "Resize"
             for a in n.attribute if a.name == "mode"}
    assert modes == {b"nearest"}
    with pytest.raises(ValueError, match="bilinear or nearest"):
        UNetPP(8, 3, upsample="bicubic")


def test_distillation_teachers_give_their_mean_map(tmp_path):
    """`train_lesion --teacher A --teacher B`: the taught samples' targets are the mean of the teachers' maps,
    computed by ONNX Runtime on the augmented batch, in the model's input form."""
    torch = train_extra("torch")
    train_extra("onnx")
    from models.export import export_onnx
    from models.train import _teach, _teachers
    from models.unetpp import UNetPP

    maps = []
    x = np.random.default_rng(1).random((3, 1, 64, 64), dtype=np.float32)
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = UNetPP(8, 3, with_sigmoid=True).eval()
        export_onnx(m, 64, tmp_path / f"t{seed}.onnx")
        with torch.no_grad():
            maps.append(m(torch.from_numpy(x)).numpy())
    teachers = _teachers([str(tmp_path / "t0.onnx"), str(tmp_path / "t1.onnx")])
    got = _teach(teachers, x)
    assert got.shape == (3, 1, 64, 64) and got.dtype == np.float32
    assert np.abs(got - (maps[0] + maps[1]) / 2).max() < 1e-4
    assert np.abs(maps[0] - maps[1]).max() > 1e-3  # two different teachers: the mean is not either one
    assert _teachers([]) == []
    # --teach-floor: what the teachers are unsure of (below the floor) becomes clean lung, the rest is unchanged
    floor = float(np.median(got))
    cut = _teach(teachers, x, floor)
    assert (cut[got < floor] == 0).all() and np.array_equal(cut[got >= floor], got[got >= floor])
    assert 0 < (cut == 0).mean() < 1


def test_all_doctor_trains_on_the_held_back_radiologist_slices_too():
    from tests.conftest import shared_data

    shared_data("covid-semiseg")
    train_extra("torch")
    from models.train import TrainConfig
    from models.train_lesion import load

    held, _ = load(TrainConfig(name="t", task="lesion", size=224))
    every, val = load(TrainConfig(name="t", task="lesion", size=224, extra={"all_doctor": True}))
    assert len(held["doctor"][0]) == 40 and len(every["doctor"][0]) == 50
    assert len(val["doctor"][0]) == 10  # still scored, now as a training fit
    for group in ("pseudo", "noncovid", "hu-neg"):  # nothing else moves out of the held-back split
        assert len(every[group][0]) == len(held[group][0])
    train_keys = {x.tobytes() for x in every["doctor"][0]}
    assert all(x.tobytes() in train_keys for x in val["doctor"][0])


def test_checkpoint_choice_by_score_or_the_last_step():
    train_extra("torch")
    from models.train import keeps

    assert keeps(0.7, 0.6, 200, 1000) and not keeps(0.5, 0.6, 200, 1000)
    assert not keeps(0.5, 0.6, 1000, 1000)  # a worse last step stays out ...
    assert keeps(0.5, 0.6, 1000, 1000, keep_last=True)  # ... unless validation was trained on
    assert not keeps(0.5, 0.6, 800, 1000, keep_last=True)


def test_synthetic_consolidation_darkens_nothing_and_stays_in_the_lung():
    torch = train_extra("torch")
    from scipy import ndimage as ndi

    from models.train import paste_consolidation

    x = torch.full((6, 1, 96, 96), 0.95)  # soft tissue in the lung window
    y = torch.zeros((6, 1, 96, 96))
    y[:, 0, 20:70, 12:42] = 1.0  # two lungs
    y[:, 0, 20:70, 54:84] = 1.0
    x[y > 0] = 0.35  # aerated lung
    out = paste_consolidation(x, y, torch.Generator().manual_seed(0), 1.0)
    changed = (out - x).abs()[:, 0] > 1e-4
    near_lung = torch.from_numpy(ndi.binary_dilation(y[0, 0].numpy() > 0, iterations=3))
    assert changed.any(), "p = 1: every sample with lung gets some consolidation"
    assert not (changed & ~near_lung).any(), "only the lung (and its blurred edge) changes"
    assert (out >= x - 1e-6).all(), "consolidation only makes lung denser"


def test_dot_clusters_go_on_lesion_free_lung_only_and_only_brighten():
    """`train_lesion2 --dots P`: clusters of small dense dots land in the aerated lung of lesion-free samples;
    samples with a lesion target, the targets themselves and everything outside the lung stay as they were."""
    torch = train_extra("torch")
    from models.train import paste_dots

    H = 96
    x = torch.full((3, 1, H, H), 0.92)  # soft tissue ...
    x[:, :, 20:76, 10:45] = 0.3  # ... around two aerated lungs
    x[:, :, 20:76, 51:86] = 0.3
    y = torch.zeros_like(x)
    y[2, 0, 40:50, 20:30] = 1.0  # sample 2 has a lesion
    g = torch.Generator().manual_seed(3)
    out = paste_dots(x, y, g, 1.0)
    lung = x[0, 0] < 0.45
    for i in (0, 1):
        d = out[i, 0] - x[i, 0]
        assert (d >= -1e-6).all()  # only brightens
        assert d[lung].max() > 0.3  # dots of soft-tissue-like density in the lung
        assert (d > 0.05)[lung].float().mean() < 0.25  # discrete dots, not a patch of ground glass
        assert d[~lung].abs().max() < 0.1  # outside the lung: at most the blur of a dot on the lung's edge
    assert torch.equal(out[2], x[2])  # a sample with a lesion is left alone
    assert torch.equal(paste_dots(x, y, g, 0.0), x)


def test_emphysema_darkens_aerated_lung_only_and_keeps_the_lesion():
    """`train_lesion2 --emphysema P`: round lucencies at about −970 HU in the aerated lung, covering a part of it;
    the lesion target and the lung next to it, vessels, soft tissue and the target itself stay as they were."""
    torch = train_extra("torch")
    from models.train import paste_emphysema

    H = 128
    x = torch.full((2, 1, H, H), 0.92)  # soft tissue ...
    x[:, :, 20:108, 10:60] = 0.333  # ... around two lungs of normal density (−850 HU)
    x[:, :, 20:108, 68:118] = 0.333
    x[:, :, 60:62, 10:60] = 0.7  # a vessel
    y = torch.zeros_like(x)
    y[1, 0, 40:60, 80:100] = 1.0  # sample 1 has a lesion
    x[1, 0, 40:60, 80:100] = 0.5
    out = paste_emphysema(x, y, torch.Generator().manual_seed(2), 1.0)
    lung = (x[0, 0] - 0.333).abs() < 1e-6
    for i in (0, 1):
        d = out[i, 0] - x[i, 0]
        assert (d <= 1e-6).all()  # only darkens
        dark = d < -0.05
        assert 0.03 < float(dark[lung].float().mean()) < 0.5  # a share of the lung, not all of it
        assert float(out[i, 0][dark].median()) < (-950 + 1350) / 1500  # lucent: below −950 HU
        assert d[~lung & (x[i, 0] > 0.6)].abs().max() == 0  # vessels and soft tissue untouched
    assert torch.equal(out[1, 0, 37:63, 77:103], x[1, 0, 37:63, 77:103])  # the lesion and its rim
    assert torch.equal(paste_emphysema(x, y, torch.Generator().manual_seed(2), 0.0), x)
    only = paste_emphysema(x, y, torch.Generator().manual_seed(2), 1.0, lesion_free_only=True)
    assert not torch.equal(only[0], x[0]) and torch.equal(only[1], x[1])  # the lesion slice left alone


def test_augment_reports_the_emphysema_slices_so_a_teacher_leaves_their_targets():
    """With a teacher, samples given emphysema keep their own (empty) target: `augment` says which they are."""
    torch = train_extra("torch")
    from models.train import TrainConfig, augment

    H = 96
    x = torch.full((3, 1, H, H), 0.92)
    x[:, :, 10:86, 8:44] = 0.333
    x[:, :, 10:86, 52:88] = 0.333
    y = torch.zeros_like(x)
    y[2, 0, 30:50, 20:30] = 1.0
    cfg = TrainConfig(name="t", task="lesion", size=H, intensity=0.0,
                      extra={"emphysema": 1.0, "emphysema_lesion_free": True})
    report: dict = {}
    augment(x, y, cfg, torch.Generator().manual_seed(0), report)
    assert report["emphysema"].tolist() == [True, True, False]
    report = {}
    augment(x, y, TrainConfig(name="t", task="lesion", size=H), torch.Generator().manual_seed(0), report)
    assert "emphysema" not in report


def test_fine_tune_starts_from_a_member_of_the_shipped_lesion_ensemble(tmp_path):
    """`train_lesion2 --init-onnx BUNDLE#I`: lesion model 2 (pretrained encoder, BatchNorms outside any Sequential)
    is rebuilt from its folded FP32 graph inside the shipped ensemble, to the same map."""
    torch = train_extra("torch")
    train_extra("onnx")
    import onnx
    import onnxruntime as ort

    from models.ensemble import extract_member
    from models.lite_unetpp import LiteUNetPP
    from models.train import load_folded_onnx

    src = Path(__file__).resolve().parents[1] / "models" / "bundles" / "lesion-2.0.0" / "model.onnx"
    if not src.is_file():
        pytest.skip(f"{src} is absent")
    member = tmp_path / "m1.onnx"
    onnx.save(extract_member(onnx.load(str(src)), 1), str(member))
    model = LiteUNetPP(with_sigmoid=True)
    before = model.head.weight.detach().clone()
    load_folded_onnx(model, member)
    assert not torch.equal(before, model.head.weight)
    model.eval()
    x = np.random.default_rng(0).random((2, 1, 224, 224), dtype=np.float32)  # the graph's fixed size
    with torch.no_grad():
        mine = model(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(member), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.abs(mine - ref).max() < 1e-4


def test_synthetic_masses_go_on_lesion_free_lung_with_soft_tissue_density():
    """`--masses P` (lesion 1.x's recipe): round or spiculated soft-tissue masses pasted into the aerated lung of
    lesion-free samples, target left empty; a sample with a lesion is left alone. Non-square slices too."""
    torch = train_extra("torch")
    from models.train import paste_masses

    H, W = 96, 112
    x = torch.full((3, 1, H, W), 0.92)
    x[:, :, 20:76, 10:50] = 0.3
    x[:, :, 20:76, 60:100] = 0.3
    y = torch.zeros_like(x)
    y[2, 0, 40:50, 20:30] = 1.0
    out = paste_masses(x, y, torch.Generator().manual_seed(1), 1.0)
    lung = x[0, 0] < 0.45
    for i in (0, 1):
        d = out[i, 0] - x[i, 0]
        core = lung & (d > 0.4)
        assert core.any(), "a mass in the lung"
        assert float(out[i, 0][core].median()) > 0.8  # of soft-tissue density (its edge blends), not ground glass
        assert (d >= -0.1).all()  # denser, never darker (texture noise aside)
    assert torch.equal(out[2], x[2]) and torch.equal(y[2].sum(), torch.tensor(100.0))
    assert torch.equal(paste_masses(x, y, torch.Generator().manual_seed(1), 0.0), x)


def test_sample_shares_outside_0_to_1_are_refused_with_a_clear_error(capsys):
    train_extra("torch")
    from models.train_lesion2 import main

    for flag in ("--dots", "--corr-noise"):
        with pytest.raises(SystemExit) as e:
            main(["--name", "x", flag, "1.5"])
        assert e.value.code == 2
        assert "a share of samples is between 0 and 1, not 1.5" in capsys.readouterr().err
