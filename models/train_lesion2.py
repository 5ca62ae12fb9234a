"""Train lesion model 2: UNet++ decoder on the ImageNet EfficientNet-Lite0 encoder (models.lite_unetpp).

    python -m models.train_lesion2 --name lesion2-a                 # 2 CPU cores (default), the shipped recipe
    python -m models.train_lesion2 --name lesion2-a --device cuda   # the same on a GPU, where one is lent

Data: `models.data.prepare_lesion2()` (model 1's sources and split, plus real normal slices from a pneumonia series
and the LIDC nodule runs as negatives). `--pack FILE` writes that cache as one compact file (images as JPEG q95,
masks as PNG, for a machine without ../shared/data); `--packed FILE` trains from it.

Validation (the held-back split): Dice on the 10 radiologist slices at 0.5, the share of their ground-glass and of
their consolidation pixels found (per-class recall: consolidation is lesion too), Dice on the 2 held-back
pseudo-labelled patients, and image-level specificity on the held-back negatives.

Every run so far, its numbers and why none is shipped yet: models/LESION2.md.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch

from models.train import TrainConfig, dice_np, largest_component, predict, run

MIN_AREA_MODEL_PX = 16  # as models.train_lesion (not imported: it needs the raw-data readers)


def _resize_all(a: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(i).resize((size, size), Image.BILINEAR)) for i in a])


def pack(path: Path, size: int = 224) -> None:
    """The lesion-2 cache as one small file at the model's size: images JPEG q95 (most sources are JPEG already),
    masks PNG."""
    from PIL import Image

    from models.data import prepare_lesion2

    d = np.load(prepare_lesion2())

    def enc(a: np.ndarray, fmt: str, mode=Image.BILINEAR) -> bytes:
        b = io.BytesIO()
        Image.fromarray(a).resize((size, size), mode).save(b, fmt, **({"quality": 95} if fmt == "JPEG" else {"optimize": True}))
        return b.getvalue()

    blobs = {"x": [enc(a, "JPEG") for a in d["x"]], "y": [enc(a, "PNG") for a in d["y"]],
             "cls": [enc(a, "PNG", Image.NEAREST) for a in d["cls"]]}
    arrays = {k: np.frombuffer(b"".join(v), np.uint8) for k, v in blobs.items()}
    arrays |= {f"{k}_len": np.array([len(b) for b in v], np.int64) for k, v in blobs.items()}
    np.savez(path, src=d["src"], split=d["split"], group=d["group"], **arrays)
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB, {len(d['x'])} images")


def unpack(path: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    d = np.load(path)
    out = {k: d[k] for k in ("src", "split", "group")}
    for k in ("x", "y", "cls"):
        ends = np.cumsum(d[f"{k}_len"])
        buf = d[k].tobytes()
        out[k] = np.stack([np.asarray(Image.open(io.BytesIO(buf[e - n : e])))
                           for e, n in zip(ends, d[f"{k}_len"])])
    return out


def load(cfg: TrainConfig, packed: str = ""):
    if packed:
        d = unpack(Path(packed))
    else:
        from models.data import prepare_lesion2

        d = dict(np.load(prepare_lesion2()))
    x, y, cls, src, split = d["x"], d["y"], d["cls"], d["src"], d["split"]
    if cfg.size != x.shape[1]:
        x, y = _resize_all(x, cfg.size), _resize_all(y, cfg.size)
        cls = _resize_all(cls, cfg.size)  # classes 0/1/2: bilinear then rounded back below
    tr = split == "train"
    hu = np.char.startswith(src.astype(str), "hu-")
    ncw = float(cfg.extra.get("noncovid_weight", 1.0))
    pw = float(cfg.extra.get("pseudo_weight", 0.5))
    data = {
        "doctor": (x[tr & (src == "doctor")], y[tr & (src == "doctor")], 1.0, 1.0),
        "pseudo": (x[tr & (src == "pseudo")], y[tr & (src == "pseudo")], pw, pw),
        "noncovid": (x[tr & (src == "noncovid")], y[tr & (src == "noncovid")], ncw, 0.0),
        "hu-neg": (x[tr & hu], y[tr & hu], 1.0, 0.0),
    }
    va = split == "val"
    val = {
        "doctor": (x[va & (src == "doctor")], y[va & (src == "doctor")], np.rint(cls[va & (src == "doctor")])),
        "pseudo": (x[va & (src == "pseudo")], y[va & (src == "pseudo")]),
        "neg": (x[va & ((src == "noncovid") | hu)], None),
    }
    return data, val


def make_validate(val):
    def validate(model: torch.nn.Module) -> dict[str, float]:
        m: dict[str, float] = {}
        x, y, cls = val["doctor"]
        p = predict(model, x) >= 0.5
        m["dice_doctor"] = float(np.mean([dice_np(a, b > 127) for a, b in zip(p, y)]))
        for c, name in ((1, "ggo"), (2, "consolidation")):
            m[f"recall_{name}"] = float((p & (cls == c)).sum() / max(1, (cls == c).sum()))
        x, y = val["pseudo"]
        p = predict(model, x) >= 0.5
        m["dice_pseudo"] = float(np.mean([dice_np(a, b > 127) for a, b in zip(p, y)]))
        m["sens_pseudo"] = float(np.mean([largest_component(a) > MIN_AREA_MODEL_PX for a in p]))
        p = predict(model, val["neg"][0]) >= 0.5
        m["spec_neg"] = float(np.mean([largest_component(a) <= MIN_AREA_MODEL_PX for a in p]))
        return m

    return validate


def score(m: dict[str, float]) -> float:
    return m["dice_doctor"] + 0.5 * m["dice_pseudo"] + m["spec_neg"]


def share(text: str) -> float:
    """An argparse type: a share of samples, 0 to 1."""
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"a share of samples is between 0 and 1, not {text}")
    return v


def init_onnx(spec: str, name: str) -> str:
    """The FP32 ONNX file a fine-tune starts from: `spec` itself, or for `BUNDLE#I` member I taken out of the
    bundle's graph and written into the run's folder (so the run records what it started from)."""
    if not spec or "#" not in spec:
        if spec and not Path(spec).is_file():
            raise SystemExit(f"--init-onnx: {spec} is not a file")
        return spec
    import onnx

    from models.ensemble import extract_member
    from models.train import RUNS

    bundle, _, index = spec.rpartition("#")
    src = Path(bundle) / "model.onnx"
    if not src.is_file() or not index.isdigit():
        raise SystemExit(f"--init-onnx: expected BUNDLE#I with BUNDLE/model.onnx, got {spec}")
    try:
        member = extract_member(onnx.load(str(src)), int(index))
    except ValueError as e:
        raise SystemExit(f"--init-onnx {spec}: {e}") from None
    out = RUNS / name / "init.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(member, str(out))
    return str(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="lesion2")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--encoder-lr", type=float, default=0.3, help="the encoder's learning rate, as a share of --lr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--mix", default="doctor=3,pseudo=3,noncovid=2,hu-neg=2")
    ap.add_argument("--noncovid-weight", type=float, default=1.0,
                    help="BCE weight of the non-COVID crops (image label only; some show other disease)")
    ap.add_argument("--pseudo-weight", type=float, default=0.5, help="BCE and Dice weight of the pseudo labels")
    ap.add_argument("--keep-every", action="store_true", help="also keep each evaluation's weights (stepN.pt)")
    ap.add_argument("--init", default="", help="start from this run's best checkpoint (fine-tuning)")
    ap.add_argument("--init-onnx", default="", metavar="MODEL_ONNX|BUNDLE#I",
                    help="start from an exported model 2 (fine-tuning, BatchNorm frozen): an FP32 model.onnx, or "
                         "member I of an ensemble bundle, e.g. models/bundles/lesion-2.0.0#1")
    ap.add_argument("--blob-weight", type=float, default=0.3)
    ap.add_argument("--blob-start", type=int, default=300)
    ap.add_argument("--no-pretrained", action="store_true", help="random encoder (for the ablation)")
    ap.add_argument("--max-minutes", type=float, default=1e9, help="stop (and keep the best so far) after this")
    ap.add_argument("--corr-noise", type=share, default=0.0, metavar="P",
                    help="share of slices given CT-like (correlated) noise, SD 0.01 to --corr-noise-max")
    ap.add_argument("--corr-noise-max", type=float, default=0.06)
    ap.add_argument("--emphysema", type=share, default=0.0, metavar="P",
                    help="share of slices given centrilobular emphysema (lucencies in the aerated lung; target kept)")
    ap.add_argument("--emphysema-lesion-free", action="store_true",
                    help="emphysema on lesion-free slices only (with --teacher on the lesion slices)")
    ap.add_argument("--dots", type=share, default=0.0, metavar="P",
                    help="share of lesion-free slices given a cluster of small dense dots (target stays empty)")
    ap.add_argument("--teacher", action="append", default=[], metavar="MODEL_ONNX",
                    help="distil: the taught groups learn the mean map of these exported models (repeat), e.g. "
                         "the shipped ensemble's models/bundles/lesion-2.0.0/model.onnx")
    ap.add_argument("--teach", default="pseudo", help="groups whose targets the teachers give (comma-separated)")
    ap.add_argument("--teach-floor", type=float, default=0.0,
                    help="teacher probabilities below this become 0 in the targets (e.g. the bundle's threshold)")
    ap.add_argument("--pack", type=Path, help="write the data cache as one compact file and exit")
    ap.add_argument("--packed", default="", help="train from a file written by --pack")
    a = ap.parse_args(argv)
    if a.pack:
        pack(a.pack, a.size)
        return
    mix = {k: float(v) for k, v in (kv.split("=") for kv in a.mix.split(","))}
    cfg = TrainConfig(name=a.name, task="lesion", size=a.size, steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed,
                      threads=a.threads, eval_every=a.eval_every, warmup=100, mix=mix,
                      extra={"arch": "lite0-unetpp", "pretrained": not a.no_pretrained, "encoder_lr": a.encoder_lr,
                             "device": a.device, "blob_weight": a.blob_weight, "blob_start": a.blob_start,
                             "blob_full": a.blob_start + 500, "noncovid_weight": a.noncovid_weight,
                             "pseudo_weight": a.pseudo_weight, "init": a.init,
                             "corr_noise": a.corr_noise, "corr_noise_max": a.corr_noise_max, "dots": a.dots,
                             "emphysema": a.emphysema, "emphysema_lesion_free": a.emphysema_lesion_free,
                             "init_onnx": init_onnx(a.init_onnx, a.name),
                             "freeze_bn": bool(a.init_onnx),
                             "keep_every": a.keep_every, "teachers": a.teacher,
                             "teach_groups": a.teach.split(","), "teach_floor": a.teach_floor,
                             "max_minutes": a.max_minutes})
    data, val = load(cfg, a.packed)
    run(cfg, data, make_validate(val), score)


if __name__ == "__main__":
    main()
