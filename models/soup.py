"""Weight averaging ("model soup", Wortsman et al. 2022) of a shipped lesion model and a fine-tune started from it.

    python -m models.train_lesion --name lesion-ft-e --init-onnx models/bundles/lesion-X.Y.Z/model.onnx ...
    python -m models.soup --onnx models/bundles/lesion-X.Y.Z/model.onnx --run lesion-ft-e --name lesion-soup-i
    python -m models.export --run lesion-soup-i --name lesion --version X.Y.Z --threshold 0.3 --min-score 0.9
    python -m models.soup --run l2e-a@300 --name l2e-a-w50   # lesion model 2: the base is the run's --init-onnx

Both models share the BatchNorm-folded parameterisation (`load_folded_onnx`, and `freeze_bn` in the fine-tune),
so a convex combination of their weights is a valid model of the same architecture. The averaged checkpoint is
validated on the trainer's held-back split and saved as `models/runs/NAME/best.pt`, ready for export.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from models.train import RUNS, TrainConfig, load_folded_onnx
from models.unetpp import UNetPP


def average_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """alpha·a + (1 − alpha)·b for floating-point tensors; integer buffers (BatchNorm's step counter) from b."""
    if set(a) != set(b):
        raise ValueError(f"the two models differ in parameters: {sorted(set(a) ^ set(b))[:5]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = {}
    for k, v in a.items():
        if v.shape != b[k].shape:
            raise ValueError(f"{k}: shapes differ ({tuple(v.shape)} vs {tuple(b[k].shape)})")
        out[k] = alpha * v + (1.0 - alpha) * b[k] if v.dtype.is_floating_point else b[k].clone()
    return out


def _net(cfg: dict) -> torch.nn.Module:
    """An untrained network of the run config's architecture (lesion model 1's UNet++ or model 2's Lite0 UNet++)."""
    if cfg.get("extra", {}).get("arch") == "lite0-unetpp":
        from models.lite_unetpp import LiteUNetPP

        return LiteUNetPP()
    return UNetPP(cfg["width"], cfg["levels"], stem=cfg.get("stem", 1), upsample=cfg.get("upsample", "bilinear"))


def soup(onnx: Path | None, runs: list[str], name: str, alpha: float = 0.5) -> Path:
    """The shipped model (weight `alpha`) averaged with one or more fine-tunes of it (sharing 1 − alpha equally).
    `onnx` None: the model the first run started from (model 2 runs record it as `init_onnx`). A run given as
    NAME@STEP uses that evaluation's weights (`--keep-every`) instead of best.pt."""
    def ckpt(r: str) -> Path:
        run, _, step = r.partition("@")
        return RUNS / run / (f"step{step}.pt" if step else "best.pt")

    missing = [str(ckpt(r)) for r in runs if not ckpt(r).is_file()]
    if missing:
        raise SystemExit(f"not found: {', '.join(missing)}")
    cks = [torch.load(ckpt(r), map_location="cpu", weights_only=False) for r in runs]
    for r, ck in zip(runs, cks):
        if not ck["config"].get("extra", {}).get("freeze_bn"):
            raise SystemExit(f"{r} was not fine-tuned with frozen BatchNorm from a shipped model: its weights do "
                             "not live in the same parameterisation")
    cfg = dict(cks[0]["config"])
    onnx = Path(onnx or cfg.get("extra", {}).get("init_onnx") or "")
    if not onnx.is_file():
        raise SystemExit(f"not found: the model the fine-tune started from ({onnx}); give --onnx")
    lite = cfg.get("extra", {}).get("arch") == "lite0-unetpp"
    if lite:
        from models.train_lesion2 import load, make_validate
    else:
        from models.train_lesion import load, make_validate
    base = _net(cfg)
    load_folded_onnx(base, onnx)
    tuned = cks[0]["state_dict"]
    for k, ck in enumerate(cks[1:], start=2):  # running mean of the fine-tunes
        tuned = average_state(tuned, ck["state_dict"], (k - 1) / k)
    model = _net(cfg)
    model.load_state_dict(average_state(base.state_dict(), tuned, alpha))
    model.eval()
    cfg["name"] = name
    cfg["extra"] = {**cfg.get("extra", {}), "soup": {"alpha": alpha, "base_onnx": str(onnx), "fine_tunes": runs,
                                                      "fine_tune_steps": [ck["step"] for ck in cks]}}
    tc = TrainConfig(**{k: v for k, v in cfg.items() if k in TrainConfig.__dataclass_fields__})
    _, val = load(tc)
    with torch.no_grad():
        metrics = make_validate(val)(model)
    out = RUNS / name
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "config": cfg, "step": cks[0]["step"], "metrics": metrics},
               out / "best.pt")
    (out / "summary.json").write_text(json.dumps({"soup": cfg["extra"]["soup"], **metrics}, indent=1) + "\n")
    print(json.dumps({"run": str(out), "validation": metrics}, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", help="the shipped model.onnx the fine-tune started from (default: the run's init_onnx)")
    ap.add_argument("--run", required=True, action="append",
                    help="a fine-tune run (trained with --init-onnx from --onnx), NAME or NAME@STEP; repeat for several")
    ap.add_argument("--name", required=True, help="run name for the averaged checkpoint")
    ap.add_argument("--alpha", type=float, default=0.5,
                    help="weight of the shipped model; the runs share the rest equally (default 0.5)")
    a = ap.parse_args(argv)
    soup(Path(a.onnx) if a.onnx else None, a.run, a.name, a.alpha)


if __name__ == "__main__":
    main()
