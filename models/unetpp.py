"""UNet++ (nested U-Net, Zhou et al. 2018), single channel in, single channel out.

Sized for a 2-core CPU: `width` is the channel count of the first level, doubled per level.
The exported graph ends in a sigmoid, so runtimes return probabilities.
"""
from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UNetPP(nn.Module):
    """Nested U-Net with `levels` resolution levels.

    Node X[i][j]: level i (downsampling depth), column j. X[i][0] is the encoder; X[i][j] for j > 0 takes
    every X[i][k<j] plus the upsampled X[i+1][j-1].
    """

    def __init__(self, width: int = 16, levels: int = 5, with_sigmoid: bool = False, stem: int = 1,
                 upsample: str = "bilinear") -> None:
        """stem=2: a stride-2 convolution first and a ×2 upsampling of the logits last, so the nested
        decoder runs at half resolution (about a quarter of the cost; lesion masks are smooth at that scale).
        upsample: "bilinear" or "nearest" for every ×2 upsampling (nearest costs about a fifth less on CPUs; the
        two have the same parameters, so a model trained with one can be fine-tuned to the other)."""
        super().__init__()
        ch = [width * 2**i for i in range(levels)]
        self.levels = levels
        self.width = width
        self.with_sigmoid = with_sigmoid
        self.stem = stem
        self.stem_conv = (nn.Sequential(nn.Conv2d(1, ch[0], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(ch[0]),
                                        nn.ReLU(inplace=True)) if stem == 2 else None)
        self.pool = nn.MaxPool2d(2)
        if upsample not in ("bilinear", "nearest"):
            raise ValueError(f"upsample must be bilinear or nearest, not {upsample!r}")
        self.upsample = upsample
        self.up = (nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False) if upsample == "bilinear"
                   else nn.Upsample(scale_factor=2, mode="nearest"))
        nodes = {}
        for i in range(levels):
            nodes[f"x{i}_0"] = ConvBlock((ch[0] if stem == 2 else 1) if i == 0 else ch[i - 1], ch[i])
        for j in range(1, levels):
            for i in range(levels - j):
                nodes[f"x{i}_{j}"] = ConvBlock(ch[i] * j + ch[i + 1], ch[i])
        self.nodes = nn.ModuleDict(nodes)
        self.head = nn.Conv2d(ch[0], 1, 1)

    def _nodes(self, x: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
        X: dict[tuple[int, int], torch.Tensor] = {}
        if self.stem_conv is not None:
            x = self.stem_conv(x)
        for i in range(self.levels):
            X[i, 0] = self.nodes[f"x{i}_0"](x if i == 0 else self.pool(X[i - 1, 0]))
        for j in range(1, self.levels):
            for i in range(self.levels - j):
                parts = [X[i, k] for k in range(j)] + [self.up(X[i + 1, j - 1])]
                X[i, j] = self.nodes[f"x{i}_{j}"](torch.cat(parts, 1))
        return X

    def _out(self, feat: torch.Tensor) -> torch.Tensor:
        out = self.head(feat)
        if self.stem_conv is not None:
            out = self.up(out)
        return torch.sigmoid(out) if self.with_sigmoid else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._out(self._nodes(x)[0, self.levels - 1])

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Deep supervision (training only): the output of every top-row node X[0][1..L-1] through the one shared
        head, the full model's output last. Sharing the head adds no parameters, so the exported network, its
        state and everything that loads it are unchanged."""
        X = self._nodes(x)
        return [self._out(X[0, j]) for j in range(1, self.levels)]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
