"""Shared training loop for the two UNet++ models (CPU, 2 cores): augmentation, losses, EMA, validation, log.

Used by `models.train_lesion` and `models.train_valid_area`; each run writes to models/runs/<name>/:
`train.log` (one JSON object per line), `best.pt` / `last.pt` (EMA weights + config) and `summary.json`.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from appliance.imaging import LUNG_WINDOW
from models.unetpp import UNetPP, count_params

RUNS = Path(__file__).resolve().parent / "runs"


@dataclass
class TrainConfig:
    name: str
    task: str  # "lesion" | "valid-area"
    width: int = 8
    levels: int = 5
    stem: int = 1
    upsample: str = "bilinear"  # or "nearest"
    size: int = 256
    steps: int = 2000
    batch: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    ema: float = 0.995
    eval_every: int = 100
    seed: int = 0
    threads: int = 2
    dihedral: bool = True  # all 8 flips/rotations (crops come in every orientation)
    rotate_deg: float = 12.0
    scale: tuple[float, float] = (0.85, 1.2)
    intensity: float = 1.0  # strength of window / gamma / noise / blur / sharpen augmentation
    mix: dict[str, float] = field(default_factory=dict)  # source group -> share of each batch
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- augmentation (batched, torch)


def _gauss_kernel(sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(2 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = _gauss_kernel(sigma)
    n = k.numel()
    x = F.conv2d(F.pad(x, (n // 2, n // 2, 0, 0), mode="replicate"), k.view(1, 1, 1, n))
    return F.conv2d(F.pad(x, (0, 0, n // 2, n // 2), mode="replicate"), k.view(1, 1, n, 1))


def _lesion_free_lungs(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, p: float, min_px: int):
    """For a share p of the lesion-free samples with at least min_px aerated-lung pixels: (index, lung pixels as
    (N, 2) rows, the pixel grid's y and x)."""
    B, _, H, W = x.shape
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    for i in range(B):
        if float(y[i].max()) > 0.02 or float(torch.rand(1, generator=g)) >= p:
            continue
        lung = (x[i, 0] < 0.45).nonzero()
        if len(lung) >= min_px:
            yield i, lung, yy, xx


def paste_masses(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """Synthetic solid nodules and masses (soft-tissue density, round or lobulated, smooth or spiculated edges)
    pasted into the aerated lung of lesion-free samples; their target stays empty. Teaches that a tumour is not
    a COVID-19 lesion (real tumour examples are few)."""
    H, W = x.shape[2:]
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    out = x.clone()
    for i, lung, yy, xx in _lesion_free_lungs(x, y, g, p, 50):
        for _ in range(1 + int(float(u(1)) < 0.3)):
            cy, cx = (float(v) for v in lung[int(float(u(1)) * len(lung))])
            r = 3 + float(u(1)) * 0.09 * H
            ang = torch.atan2(yy - cy, xx - cx)
            lob = 1 + 0.15 * torch.sin(ang * (2 + int(float(u(1)) * 4)) + float(u(1)) * 6.28)
            spic = 1 + (0.08 * torch.sin(ang * (9 + int(float(u(1)) * 12)) + float(u(1)) * 6.28) if float(u(1)) < 0.4 else 0)
            d = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / (r * lob * spic)
            soft = torch.clamp((1.2 - d) / 0.4, 0, 1)  # smooth edge
            level = 0.86 + 0.08 * float(u(1))  # -60 … +60 HU in the lung window
            tex = level + 0.02 * torch.randn(H, W, generator=g)
            out[i, 0] = out[i, 0] * (1 - soft) + tex * soft
    return out.clamp(0, 1)


def paste_dots(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """Clusters of small dense dots (3–10 mm discs at soft-tissue density, 10–50 of them within 1–3 cm) pasted
    into the aerated lung of lesion-free samples; their target stays empty. Teaches that discrete small nodules
    (vessels cut across, micronodules, tree-in-bud: not the COVID-19 pattern) are not ground glass or
    consolidation: model 2 marked such clusters as lesion with full confidence (models/LESION2.md)."""
    H, W = x.shape[2:]
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    out = x.clone()
    for i, lung, yy, xx in _lesion_free_lungs(x, y, g, p, 200):
        dots = torch.zeros(H, W)
        for _ in range(1 + int(float(u(1)) < 0.4)):
            cy, cx = (float(v) for v in lung[int(float(u(1)) * len(lung))])
            spread = 0.03 * H + float(u(1)) * 0.07 * H
            for _ in range(10 + int(float(u(1)) * 40)):
                py = cy + float(torch.randn(1, generator=g)) * spread
                px = cx + float(torch.randn(1, generator=g)) * spread
                r = 1.0 + float(u(1)) * 2.5
                level = 0.6 + 0.35 * float(u(1))  # partial volume up to soft tissue
                d = torch.sqrt((yy - py) ** 2 + (xx - px) ** 2)
                dots = torch.maximum(dots, level * torch.clamp(r + 0.5 - d, 0, 1))
        dots = dots * (x[i, 0] < 0.45)  # in aerated lung only
        out[i, 0] = torch.maximum(out[i, 0], blur(dots[None, None], 0.6)[0, 0])
    return out.clamp(0, 1)


def _window(hu: float) -> float:
    """An HU value as the lesion model's input sees it (appliance.imaging.LUNG_WINDOW scaled to [0, 1])."""
    lo, hi = LUNG_WINDOW
    return (hu - lo) / (hi - lo)


def paste_emphysema(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, p: float,
                    mm_per_px: float = 1.4, lesion_free_only: bool = False) -> torch.Tensor:
    """Centrilobular emphysema on a share `p` of samples: round lucencies (−970 HU, cuts through spheres of 2–6 mm
    radius) covering 5–35 % of the aerated lung (−945 … −600 HU), away from the lesion target (which is left as
    it is); vessels and soft tissue inside a lucency stay. Teaches that normal-density lung between dark spaces
    is not ground glass: the model read that texture as lesion (models/LESION2.md, stop 45). `lesion_free_only`:
    samples with a lesion target are left alone (when a teacher's map replaces their targets, it would be read on
    the lucencies too)."""
    B, _, H, W = x.shape
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    lucent, aerated_lo, aerated_hi = _window(-970.0), _window(-945.0), _window(-600.0)
    out = x.clone()
    for i in range(B):
        if float(u(1)) >= p or (lesion_free_only and float(y[i].max()) > 0.02):
            continue
        lesion = F.max_pool2d(y[i : i + 1], 7, 1, 3)[0, 0] > 0.02
        free = (x[i, 0] > aerated_lo) & (x[i, 0] < aerated_hi) & ~lesion
        area = int(free.sum())
        if area < 200:
            continue
        share = 0.05 + 0.30 * float(u(1))
        r_mm = 2.0 + 4.0 * u(4000)
        cut = r_mm * torch.sqrt(1 - u(4000) ** 2)  # a slice through a sphere at a random height
        r_px = (cut / mm_per_px).clamp(0.7, 4.5)
        n = int(torch.searchsorted(torch.cumsum(math.pi * r_px ** 2, 0), share * area))
        idx = free.flatten().nonzero()[:, 0]
        centres = idx[(u(n) * len(idx)).long()]
        holes = torch.zeros(H * W)
        for lo, hi in ((0.0, 1.5), (1.5, 2.5), (2.5, 3.5), (3.5, 5.0)):
            sel = (r_px[:n] >= lo) & (r_px[:n] < hi)
            if not bool(sel.any()):
                continue
            seeds = torch.zeros(H * W)
            seeds[centres[sel]] = 1.0
            r = (lo + hi) / 2
            k = int(math.ceil(r)) * 2 + 1
            ky, kx = torch.meshgrid(torch.arange(k) - k // 2, torch.arange(k) - k // 2, indexing="ij")
            disc = torch.clamp(r + 0.5 - torch.sqrt((ky ** 2 + kx ** 2).float()), 0, 1)  # soft edge
            spread = F.conv2d(seeds.view(1, 1, H, W), disc.view(1, 1, k, k), padding=k // 2).flatten()
            holes = torch.maximum(holes, spread.clamp(0, 1))
        holes = holes.view(H, W) * (x[i, 0] < aerated_hi) * ~lesion  # vessels and the lesion keep their pixels
        tex = lucent + 0.01 * torch.randn(H, W, generator=g)
        out[i, 0] = x[i, 0] * (1 - holes) + torch.minimum(tex, x[i, 0]) * holes
    return out.clamp(0, 1)


def paste_consolidation(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """Synthetic diseased lung for the valid-area model: on a share `p` of samples with lung, part of one lung —
    its dependent (posterior) part below a random level, a patch, or the whole lung — turns to consolidation or
    dense ground glass (soft-tissue to −450 HU in the lung window, textured, a few aerated islands left); the
    target stays lung. The HU labeler cannot show the model such lung (it stops at −320 HU)."""
    from scipy import ndimage as ndi

    B, _, H, W = x.shape
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    out = x.clone()
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    for i in range(B):
        if float(u(1)) >= p:
            continue
        lab, n = ndi.label(y[i, 0].numpy() > 0.5)
        if n == 0:
            continue
        k = 1 + int(float(u(1)) * n)
        lung = torch.from_numpy(lab == min(k, n))
        rows = lung.any(1).nonzero()
        if len(rows) < 4:
            continue
        r0, r1 = int(rows[0]), int(rows[-1])
        mode = float(u(1))
        if mode < 0.35:  # dependent: below a level (display orientation: posterior is down)
            region = lung & (yy >= r0 + (r1 - r0) * (0.2 + 0.6 * float(u(1))))
        elif mode < 0.65:  # a patch
            pts = lung.nonzero()
            cy, cx = (float(v) for v in pts[int(float(u(1)) * len(pts))])
            rad = (0.08 + 0.2 * float(u(1))) * H
            region = lung & (((yy - cy) ** 2 + (xx - cx) ** 2) <= rad * rad)
        else:  # the whole lung
            region = lung
        if int(region.sum()) < 10:
            continue
        islands = blur(torch.randn(1, 1, H, W, generator=g), 1.5)[0, 0]
        keep_air = islands / islands.std() > (1.0 + float(u(1)))  # aerated islands (2–16 % of the region)
        level = 0.6 + 0.33 * float(u(1))  # −450 … +50 HU in the [−1350, 150] window
        tex = level + 0.03 * blur(torch.randn(1, 1, H, W, generator=g), 1.0)[0, 0] / 0.25
        soft = blur((region & ~keep_air).float()[None, None], 0.7)[0, 0]
        out[i, 0] = out[i, 0] * (1 - soft) + torch.maximum(tex, out[i, 0]) * soft
    return out.clamp(0, 1)


def correlated_noise(x: torch.Tensor, g: torch.Generator, p: float, max_sd: float = 0.06) -> torch.Tensor:
    """CT-like noise on a share `p` of the batch: white noise blurred (sigma 0.5-1.1 px at the model's size, as a
    sharp lung kernel's noise after the lung box is resized to 224) and scaled to an SD drawn from 0.01-`max_sd`.
    White noise (the intensity augmentation) does not teach what a noisy series looks like: correlated noise at
    SD 0.06 makes 84 % of normal crops boxed by a model trained without it (models/LESION2.md)."""
    B = x.shape[0]
    out = []
    for i in range(B):
        if float(torch.rand(1, generator=g)) >= p:
            out.append(x[i])
            continue
        n = blur(torch.randn((1,) + tuple(x.shape[1:]), generator=g), 0.5 + 0.6 * float(torch.rand(1, generator=g)))[0]
        sd = 0.01 + (max_sd - 0.01) * float(torch.rand(1, generator=g))
        out.append((x[i] + n * (sd / (n.std() + 1e-9))).clamp(0, 1))
    return torch.stack(out)


def augment(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, g: torch.Generator,
            report: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y: (B, 1, H, W) in [0, 1]. Geometry applies to both, intensity to x only. `report` (a dict) gets
    "emphysema": which samples were given emphysema (their targets must stay as they are)."""
    B = x.shape[0]
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    if cfg.extra.get("masses", 0.0):
        x = paste_masses(x, y, g, float(cfg.extra["masses"]))
    if cfg.extra.get("dots", 0.0):
        x = paste_dots(x, y, g, float(cfg.extra["dots"]))
    if cfg.extra.get("emphysema", 0.0):
        before = x
        x = paste_emphysema(x, y, g, float(cfg.extra["emphysema"]),
                            lesion_free_only=bool(cfg.extra.get("emphysema_lesion_free")))
        if report is not None:
            report["emphysema"] = (x != before).flatten(1).any(1)
    if cfg.extra.get("consolidate", 0.0):
        x = paste_consolidation(x, y, g, float(cfg.extra["consolidate"]))
    if cfg.dihedral:
        xs, ys = [], []
        for i in range(B):
            k = int(u(1) * 4)
            xi, yi = torch.rot90(x[i], k, (1, 2)), torch.rot90(y[i], k, (1, 2))
            if u(1) < 0.5:
                xi, yi = xi.flip(2), yi.flip(2)
            xs.append(xi), ys.append(yi)
        x, y = torch.stack(xs), torch.stack(ys)
    else:
        flip = u(B) < 0.5
        x = torch.where(flip.view(B, 1, 1, 1), x.flip(3), x)
        y = torch.where(flip.view(B, 1, 1, 1), y.flip(3), y)
    ang = (u(B) * 2 - 1) * math.radians(cfg.rotate_deg)
    lo, hi = cfg.scale
    sx = lo + u(B) * (hi - lo)
    sy = sx * (0.92 + 0.16 * u(B))
    tx, ty = (u(B) * 2 - 1) * 0.06, (u(B) * 2 - 1) * 0.06
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([cos / sx, -sin / sx, tx], 1), torch.stack([sin / sy, cos / sy, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    y = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    s = cfg.intensity
    if s > 0:
        a = (u(B) * 2 - 1) * 0.12 * s
        b = 1 + (u(B) * 2 - 1) * 0.15 * s
        x = ((x - a.view(B, 1, 1, 1)) / (b - a).view(B, 1, 1, 1)).clamp(0, 1)
        gam = torch.exp((u(B) * 2 - 1) * 0.35 * s)
        x = x.clamp_min(1e-4) ** gam.view(B, 1, 1, 1)
        for i in range(B):
            r = float(u(1))
            if r < 0.25 * s:
                x[i : i + 1] = blur(x[i : i + 1], 0.6 + 1.2 * float(u(1)))
            elif r < 0.45 * s:
                k = 0.3 + 0.9 * float(u(1))
                x[i : i + 1] = x[i : i + 1] + k * (x[i : i + 1] - blur(x[i : i + 1], 1.0))
        noise = (u(B) < 0.5 * s).float() * u(B) * 0.04 * s
        x = x + torch.randn(x.shape, generator=g) * noise.view(B, 1, 1, 1)
        x = x.clamp(0, 1)
    if cfg.extra.get("corr_noise", 0.0):
        x = correlated_noise(x, g, float(cfg.extra["corr_noise"]), float(cfg.extra.get("corr_noise_max", 0.06)))
    return x, y.clamp(0, 1)


# ---------------------------------------------------------------- losses and metrics


def loss_fn(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor, dice_w: torch.Tensor,
            blob_weight: float = 0.0) -> torch.Tensor:
    """Per-sample weighted BCE + soft Dice (Dice only on samples whose target has foreground).

    blob_weight > 0 adds a penalty on negatives (empty targets): the mean of their top 0.5 % probabilities,
    squared — a confident blob anywhere on a lesion-free slice costs, however small it is.
    """
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean((1, 2, 3))
    p = torch.sigmoid(logits)
    inter = (p * y).sum((1, 2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1)
    has = (y.sum((1, 2, 3)) > 4).float() * dice_w
    loss = (bce * w).sum() / w.sum() + (dice * has).sum() / has.sum().clamp_min(1)
    if blob_weight > 0:
        neg = (y.flatten(1).amax(1) < 0.02).float()
        if neg.sum() > 0:
            flat = p.flatten(1)
            k = max(1, int(flat.shape[1] * 0.005))
            top = flat.topk(k, dim=1).values.mean(1)
            loss = loss + blob_weight * ((top**2) * neg).sum() / neg.sum()
    return loss


def dice_np(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    s = pred.sum() + gt.sum()
    return 1.0 if s == 0 else float(2 * np.logical_and(pred, gt).sum() / s)


def largest_component(mask: np.ndarray) -> int:
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask)
    return 0 if n == 0 else int(np.bincount(lab.ravel())[1:].max())


# ---------------------------------------------------------------- loop


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval()
        self.decay = decay
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, m in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(d).add_(m.detach(), alpha=1 - d)
            else:
                e.copy_(m)


@torch.no_grad()
def predict(model: torch.nn.Module, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """x: (N, H, W) uint8 → (N, H, W) float32 probabilities."""
    out = []
    dev = next(model.parameters()).device
    for i in range(0, len(x), batch):
        t = torch.from_numpy(x[i : i + batch].astype(np.float32) / 255.0)[:, None].to(dev)
        out.append(torch.sigmoid(model(t))[:, 0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,) + x.shape[1:], np.float32)


def _scope_module(scope: list[str], names: list[str]) -> str | None:
    """The module an ONNX node's scope names ("/encoder/_blocks.0/_depthwise_conv/Conv" →
    "encoder._blocks.0._depthwise_conv"; "/x0_0/x0_0.3/Conv" → "nodes.x0_0.3"): the one name ending in the
    scope's last part, taking more of the scope while several do."""
    for k in range(1, len(scope) + 1):
        tail = ".".join(scope[-k:])
        hits = [n for n in names if n == tail or n.endswith("." + tail)]
        if len(hits) <= 1:
            return hits[0] if hits else None
    return None


def _batchnorm_after(model: torch.nn.Module, size: int = 64) -> dict[str, torch.nn.BatchNorm2d]:
    """Each bias-free convolution's BatchNorm: the one that runs next after it (one forward pass, in order)."""
    order: list[tuple[str, torch.nn.Module]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append((n, mod)))
             for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, size, size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    out = {}
    for (n, m), (_, nxt) in zip(order, order[1:]):
        if isinstance(m, torch.nn.Conv2d) and m.bias is None and isinstance(nxt, torch.nn.BatchNorm2d):
            out[n] = nxt
    return out


def load_folded_onnx(model: torch.nn.Module, path: Path) -> None:
    """Initialise `model` from an exported FP32 ONNX file (a shipped bundle's model.onnx, or one member taken out of
    an ensemble with `models.ensemble.extract_member`), where export folded each BatchNorm into the convolution
    before it: the convolution takes the folded weight and its BatchNorm (the one that runs next) becomes the
    identity plus the folded bias (mean 0, variance 1 − eps, scale 1). Fine-tune with `freeze_bn` so those
    statistics stay. Lets a shipped model be fine-tuned when its training checkpoint is gone."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    modules = dict(model.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, torch.nn.Conv2d)]
    bns = _batchnorm_after(model)
    done: set[str] = set()
    for node in g.node:
        if node.op_type != "Conv":
            continue
        name = _scope_module(node.name.strip("/").split("/")[:-1], convs)
        if name is None or name in done:
            raise ValueError(f"{path}: cannot place ONNX node {node.name} in the model ({name or 'no match'})")
        conv = modules[name]
        w, b = torch.from_numpy(inits[node.input[1]].copy()), torch.from_numpy(inits[node.input[2]].copy())
        if conv.weight.shape != w.shape:
            raise ValueError(f"{path}: {node.name} weight {tuple(w.shape)} != model {tuple(conv.weight.shape)}")
        with torch.no_grad():
            conv.weight.copy_(w)
            if conv.bias is not None:
                conv.bias.copy_(b)
            elif name in bns:
                bn = bns[name]
                bn.weight.fill_(1.0), bn.bias.copy_(b)
                bn.running_mean.zero_(), bn.running_var.fill_(1.0 - bn.eps)
            else:
                raise ValueError(f"{path}: {node.name} has a folded bias but {name} has no bias and no BatchNorm")
        done.add(name)
    if len(done) != len(convs):
        raise ValueError(f"{path}: {len(done)} convolutions loaded, the model has {len(convs)}")


def _teachers(paths: list[str]) -> list:
    """ONNX Runtime sessions of exported FP32 models (a bundle's model.onnx) used as distillation teachers."""
    if not paths:
        return []
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in paths]


def _teach(teachers: list, x: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """The teachers' mean probability map for a batch (N, 1, H, W) in [0, 1]; values below `floor` become 0 (the
    student learns the teachers' lesions, not their doubt on vessels and lung texture)."""
    x = np.ascontiguousarray(x, np.float32)
    p = np.mean([t.run(None, {t.get_inputs()[0].name: x})[0] for t in teachers], axis=0).astype(np.float32)
    if floor > 0:
        p[p < floor] = 0.0
    return p


def keeps(score: float, best: float, step: int, steps: int, keep_last: bool = False) -> bool:
    """Whether this evaluation's weights become `best.pt`: a better validation score, or — when the validation
    set is also trained on (`keep_last`) and so cannot pick a step — the last step."""
    return score > best or (keep_last and step == steps)


def build_model(cfg: TrainConfig, with_sigmoid: bool = False) -> torch.nn.Module:
    """The network a run config names: `extra["arch"]` "lite0-unetpp" (lesion model 2: pretrained
    EfficientNet-Lite0 encoder, ImageNet weights loaded and checked) or the from-scratch UNet++ (default)."""
    if cfg.extra.get("arch") == "lite0-unetpp":
        from models.efficientnet_lite import load_imagenet
        from models.lite_unetpp import LiteUNetPP

        model = LiteUNetPP(with_sigmoid=with_sigmoid)
        if cfg.extra.get("pretrained", True):
            report = load_imagenet(model.encoder)
            if report["stem_filters_max_abs_diff"] != 0.0:
                raise RuntimeError(f"ImageNet weights did not load: {report}")
            print(json.dumps({"event": "imagenet weights", **report}), flush=True)
        return model
    return UNetPP(cfg.width, cfg.levels, with_sigmoid=with_sigmoid, stem=cfg.stem, upsample=cfg.upsample)


def run(
    cfg: TrainConfig,
    data: dict[str, tuple[np.ndarray, np.ndarray, float, float]],
    validate: Callable[[torch.nn.Module], dict[str, float]],
    score: Callable[[dict[str, float]], float],
) -> Path:
    """Train. `data`: group -> (x uint8 (N,H,W), y uint8 (N,H,W), bce weight, dice weight).

    Each batch draws from the groups in the proportions of cfg.mix. Returns the run directory.
    """
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    g = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out = RUNS / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "train.log").open("a")

    model = build_model(cfg)
    if cfg.extra.get("init_onnx"):
        load_folded_onnx(model, Path(cfg.extra["init_onnx"]))
    if cfg.extra.get("init"):
        init = torch.load(RUNS / cfg.extra["init"] / "best.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(init["state_dict"])
    dev = torch.device(cfg.extra.get("device", "cpu"))
    model.to(dev)
    ema = EMA(model, cfg.ema)
    enc_lr = float(cfg.extra.get("encoder_lr", 1.0))  # pretrained encoder: a fraction of the decoder's rate
    enc = [p for n, p in model.named_parameters() if n.startswith("encoder.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    opt = torch.optim.AdamW([{"params": rest, "scale": 1.0}, {"params": enc, "scale": enc_lr}][: 2 if enc else 1],
                            lr=cfg.lr, weight_decay=cfg.weight_decay)
    groups = list(cfg.mix)
    shares = np.array([cfg.mix[k] for k in groups], dtype=float)
    counts = np.floor(shares / shares.sum() * cfg.batch).astype(int)
    while counts.sum() < cfg.batch:
        counts[int(np.argmax(shares / shares.sum() * cfg.batch - counts))] += 1

    teachers = _teachers(cfg.extra.get("teachers", []))
    taught = set(cfg.extra.get("teach_groups", ["pseudo"]))

    info = {"event": "start", "config": asdict(cfg), "params": count_params(model),
            "groups": {k: int(len(data[k][0])) for k in groups}, "per_batch": dict(zip(groups, counts.tolist()))}
    log.write(json.dumps(info) + "\n")
    log.flush()
    print(json.dumps(info), flush=True)

    best = -1e9
    t0 = time.time()
    for step in range(1, cfg.steps + 1):
        xs, ys, ws, dws, kinds = [], [], [], [], []
        for k, n in zip(groups, counts):
            if n == 0:
                continue
            x, y, w, dw = data[k]
            idx = rng.integers(0, len(x), n)
            xs.append(x[idx]), ys.append(y[idx])
            ws += [w] * n
            dws += [dw] * n
            kinds += [k] * n
        xb = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)[:, None]
        yb = torch.from_numpy(np.concatenate(ys).astype(np.float32) / 255.0)[:, None]
        changed: dict = {}
        xb, yb = augment(xb, yb, cfg, g, changed)
        if teachers:  # distillation: the taught groups learn the teachers' mean map on the augmented slice
            own = changed.get("emphysema", torch.zeros(len(kinds), dtype=torch.bool))  # keep their own targets
            sel = [i for i, k in enumerate(kinds) if k in taught and not bool(own[i])]
            if sel:
                yb[sel] = torch.from_numpy(_teach(teachers, xb[sel].numpy(), float(cfg.extra.get("teach_floor", 0.0))))
        lr = cfg.lr * min(1.0, step / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for pg in opt.param_groups:
            pg["lr"] = lr * pg["scale"]
        model.train()
        if cfg.extra.get("freeze_bn"):  # statistics folded in from an exported model stay as they are
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()
        # the blob penalty ramps in after the model has learned what lesions look like (from the start it
        # collapses to predicting nothing)
        b0, b1 = int(cfg.extra.get("blob_start", 300)), int(cfg.extra.get("blob_full", 800))
        ramp = min(1.0, max(0.0, (step - b0) / max(1, b1 - b0)))
        xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
        w_t, dw_t = torch.tensor(ws, device=dev), torch.tensor(dws, device=dev)
        blob = float(cfg.extra.get("blob_weight", 0.0)) * ramp
        ds = float(cfg.extra.get("deep_supervision", 0.0))
        if ds > 0:  # UNet++ deep supervision: the shallower top-row nodes learn the mask too (shared head)
            *aux, last = model.forward_all(xb)
            aux_loss = sum(loss_fn(a, yb, w_t, dw_t, blob) for a in aux) / len(aux)
            loss = loss_fn(last, yb, w_t, dw_t, blob) + ds * aux_loss
        else:
            loss = loss_fn(model(xb), yb, w_t, dw_t, blob)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model, step)
        if step % 20 == 0:
            el = time.time() - t0
            print(f"step {step}/{cfg.steps} loss {loss.item():.4f} lr {lr:.2e} "
                  f"{el / step:.2f}s/step eta {el / step * (cfg.steps - step) / 60:.1f} min", flush=True)
        late = time.time() - t0 > 60 * float(cfg.extra.get("max_minutes", 1e9))
        if step % cfg.eval_every == 0 or step == cfg.steps or late:
            metrics = validate(ema.model)
            sc = score(metrics)
            rec = {"event": "eval", "step": step, "loss": round(loss.item(), 5), "score": round(sc, 5),
                   "elapsed_min": round((time.time() - t0) / 60, 2), **{k: round(v, 5) for k, v in metrics.items()}}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
            state = {"config": asdict(cfg), "state_dict": ema.model.state_dict(), "step": step, "metrics": metrics}
            torch.save(state, out / "last.pt")
            if cfg.extra.get("keep_every"):  # every evaluation's weights, for averaging neighbours later
                torch.save(state, out / f"step{step}.pt")
            if keeps(sc, best, step, cfg.steps, bool(cfg.extra.get("keep_last"))):
                best = sc
                torch.save(state, out / "best.pt")
                (out / "summary.json").write_text(json.dumps({"best_step": step, "score": sc, **metrics}, indent=1))
            if late:
                log.write(json.dumps({"event": "time limit", "step": step}) + "\n")
                break
    log.write(json.dumps({"event": "end", "minutes": round((time.time() - t0) / 60, 2)}) + "\n")
    log.close()
    return out
