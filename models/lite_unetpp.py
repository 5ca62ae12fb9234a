"""Lesion model 2: UNet++ decoder (nested skip paths, Zhou et al. 2018) on a pretrained EfficientNet-Lite0 encoder.

Input and output are the stage's contract, unchanged from model 1: one lung-window channel ([-1350, 150] HU →
[0, 1]) at 224², one probability map of the same size. Inside, the one window becomes the encoder's three channels
— the lung window, a ground-glass window and a soft-tissue window of the same slice (consolidation and solid tissue
are flat white in the lung window) — each normalised as ImageNet images were.

Decoder nodes X[i][j] (level i: the encoder map at stride 2^(i+1); column j ≥ 1) take every X[i][k<j] and the
upsampled X[i+1][j-1], reduce them with a 1×1 convolution and refine with a 3×3 one (two 3×3 convolutions per node
cost twice as much on a CPU and gained nothing measurable at this size). The top node X[0][4] (stride 2) is
upsampled to full resolution and refined once more before the 1×1 head.
"""
from __future__ import annotations

import torch
from torch import nn

from models.efficientnet_lite import IMAGENET_MEAN, IMAGENET_STD, TAP_CHANNELS, LiteEncoder

LUNG_WINDOW = (-1350.0, 150.0)
# (low, high) HU of the three encoder channels.
WINDOWS = ((-1350.0, 150.0), (-1000.0, -200.0), (-200.0, 200.0))
DECODER = (16, 24, 40, 64)  # channels of decoder levels 0..3 (strides 2, 4, 8, 16)


def _cbr(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Windows(nn.Module):
    """[0, 1] lung window → 3 ImageNet-normalised windows (a fixed affine map, a clip, a fixed affine map)."""

    def __init__(self) -> None:
        super().__init__()
        lo0, hi0 = LUNG_WINDOW
        a, b = [], []
        for lo, hi in WINDOWS:  # hu = lo0 + (hi0 - lo0) x ; c = (hu - lo) / (hi - lo)
            a.append((hi0 - lo0) / (hi - lo))
            b.append((lo0 - lo) / (hi - lo))
        self.register_buffer("a", torch.tensor(a).view(1, 3, 1, 1))
        self.register_buffer("b", torch.tensor(b).view(1, 3, 1, 1))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = torch.clamp(x * self.a + self.b, 0.0, 1.0)
        return (c - self.mean) / self.std


class LiteUNetPP(nn.Module):
    def __init__(self, with_sigmoid: bool = False, decoder: tuple[int, ...] = DECODER) -> None:
        super().__init__()
        self.with_sigmoid = with_sigmoid
        self.windows = Windows()
        self.encoder = LiteEncoder()
        enc = TAP_CHANNELS
        self.depth = len(enc) - 1  # decoder columns
        ch = lambda i, j: enc[i] if j == 0 else decoder[i]  # noqa: E731
        nodes = {}
        for j in range(1, self.depth + 1):
            for i in range(self.depth + 1 - j):
                cin = sum(ch(i, k) for k in range(j)) + ch(i + 1, j - 1)
                nodes[f"x{i}_{j}"] = nn.Sequential(*_cbr(cin, decoder[i], 1), *_cbr(decoder[i], decoder[i], 3))
        self.nodes = nn.ModuleDict(nodes)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.final = nn.Sequential(*_cbr(decoder[0], 8, 3))
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        X = {(i, 0): f for i, f in enumerate(self.encoder(self.windows(x)))}
        for j in range(1, self.depth + 1):
            for i in range(self.depth + 1 - j):
                parts = [X[i, k] for k in range(j)] + [self.up(X[i + 1, j - 1])]
                X[i, j] = self.nodes[f"x{i}_{j}"](torch.cat(parts, 1))
        out = self.head(self.final(self.up(X[0, self.depth])))
        return torch.sigmoid(out) if self.with_sigmoid else out
