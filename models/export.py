"""Export a trained checkpoint as an appliance bundle: ONNX FP32, one INT8 QDQ model (ONNX) and its OpenVINO IR,
a self-test with golden inputs and outputs, and manifest.json with every file's sha256.

    python -m models.export --run lesion-w8l4-c --name lesion --version 1.0.0
    # or a new version of a shipped bundle with thresholds tuned on validation (same model files):
    python -m models.export --from-bundle models/bundles/lesion-X.Y.Z --version X.Y+1.0 --threshold 0.3 --min-score 0.9
    # write MODEL_CARD.md into the bundle, then hash it into the manifest and sign:
    ctriage models sign models/bundles/lesion-X.Y.Z --key SIGNING_KEY --rehash

Both runtimes run the same quantization of the same network, so their verdicts agree (OpenVINO's IR computes the
bilinear upsamplings as nearest + a fixed filter, the same function, which it can keep in INT8: models.graph);
NNCF's own INT8 IR is measured for the record (its FP32 agreement is in the manifest) but not shipped: a second,
different quantization would make the two backends disagree on borderline slices.

Calibration uses real training slices (from the local training cache, never shipped). The self-test inputs are
synthetic phantom slices (appliance.phantom), so the bundle carries no patient data.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from appliance.imaging import resize, window
from appliance.inference.bundle import sha256_file
from appliance.phantom import PhantomSpec, phantom_series
from appliance.pipeline.classic_lung import lung_mask, mask_box
from models.data import CROP_MARGIN, prepare_lesion, prepare_valid_area
from models.train import RUNS, dice_np
from models.quantize import (filter_upsampling_file, openvino_ir_filtered, openvino_ir_from_qdq,  # noqa: F401
                             quantize_nncf, quantize_ort)
from models.unetpp import UNetPP, count_params

BUNDLES = Path(__file__).resolve().parent / "bundles"
LICENCE = (
    "Trained on public research data under non-commercial licences (COVID-SemiSeg / MedSeg, SARS-CoV-2 CT-scan "
    "dataset CC BY-NC-SA 4.0, TCIA collections, TotalSegmentator and lungmask test data). Research and evaluation "
    "use only; not for commercial use; not a certified medical device."
)


def load_model(run: str) -> tuple[UNetPP, dict]:
    from models.train import TrainConfig, build_model

    ck = torch.load(RUNS / run / "best.pt", map_location="cpu", weights_only=False)
    cfg = ck["config"]
    tc = TrainConfig(**{**cfg, "extra": {**cfg.get("extra", {}), "pretrained": False}})  # weights: the run's
    m = build_model(tc, with_sigmoid=True)
    m.load_state_dict(ck["state_dict"])
    return m.eval(), ck


def calibration(task: str, n: int = 64, seed: int = 0, size: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if task == "lesion":
        d = np.load(prepare_lesion())
        tr = d["split"] == "train"
        idx = rng.choice(np.flatnonzero(tr), n, replace=False)
    else:
        d = np.load(prepare_valid_area())
        idx = rng.choice(len(d["x"]), min(n, len(d["x"])), replace=False)
    x = d["x"][idx]
    if size and size != x.shape[1]:
        from PIL import Image

        x = np.stack([np.asarray(Image.fromarray(i).resize((size, size), Image.BILINEAR)) for i in x])
    return (x.astype(np.float32) / 255.0)[:, None]


def selftest_inputs(task: str, size: int) -> np.ndarray:
    """Synthetic phantom inputs in the exact form the stage feeds the model."""
    spec = PhantomSpec(slices=12, seed=11)
    out = []
    for hu in phantom_series(spec)[2:10]:
        if task == "lesion":
            box = mask_box(lung_mask(hu, spec.spacing_mm**2), CROP_MARGIN)
            if box is None:
                continue
            y0, x0, y1, x1 = box
            out.append(resize(window(hu[y0:y1, x0:x1]), (size, size)))
        else:
            out.append(resize(window(hu), (size, size)))
    return np.stack(out)[:, None].astype(np.float32)


def export_onnx(model: UNetPP, size: int, path: Path) -> None:
    torch.onnx.export(model, torch.zeros(1, 1, size, size), str(path), input_names=["image"], output_names=["prob"],
                      dynamic_axes={"image": {0: "batch"}, "prob": {0: "batch"}}, opset_version=17, dynamo=False)


def run_bundle(graphs: list[dict[str, Path]], x: np.ndarray) -> dict[str, np.ndarray]:
    """`run_all` of a bundle's full map: the sum of its graphs' maps (one graph: that graph's)."""
    outs = [run_all(g, x) for g in graphs]
    return {k: sum(o[k] for o in outs) for k in outs[0]}


def run_all(paths: dict[str, Path], x: np.ndarray) -> dict[str, np.ndarray]:
    from appliance.inference.onnxruntime_adapter import OnnxRuntimeAdapter
    from appliance.inference.openvino_adapter import OpenVINOAdapter

    return {
        "fp32": OnnxRuntimeAdapter(paths["onnx"], "fp32").infer(x),
        "fp32_openvino": OpenVINOAdapter(paths["onnx"], "fp32").infer(x),
        "int8_onnxruntime": OnnxRuntimeAdapter(paths["onnx_int8"], "int8").infer(x),
        "int8_openvino": OpenVINOAdapter(paths["openvino_int8"], "int8").infer(x),
    }


def agreement(a: np.ndarray, b: np.ndarray, threshold: float = 0.5) -> float:
    """Mean mask Dice between two probability batches at `threshold` (empty vs empty counts as 1)."""
    return float(np.mean([dice_np(p >= threshold, q >= threshold) for p, q in zip(a[:, 0], b[:, 0])]))


def runtime_agreement(outs: dict[str, np.ndarray], threshold: float) -> dict[str, float]:
    """The manifest's FP32 vs INT8 (each runtime) and runtime vs runtime mask agreement at `threshold`."""
    return {
        "mask_threshold": threshold,
        "fp32_vs_int8_onnxruntime_mask_dice": agreement(outs["fp32"], outs["int8_onnxruntime"], threshold),
        "fp32_vs_int8_openvino_mask_dice": agreement(outs["fp32"], outs["int8_openvino"], threshold),
        "int8_onnxruntime_vs_int8_openvino_mask_dice": agreement(outs["int8_onnxruntime"], outs["int8_openvino"],
                                                                 threshold),
    }


def new_bundle_dir(dest_root: Path, name: str, version: str) -> tuple[Path, dict[str, Path]]:
    """An empty dest_root/<name>-<version>/ (replacing one there) and the paths of its three runtime files."""
    out = dest_root / f"{name}-{version}"
    if out.exists():
        shutil.rmtree(out)
    (out / "openvino").mkdir(parents=True)
    return out, {"onnx": out / "model.onnx", "onnx_int8": out / "model.int8.onnx",
                 "openvino_int8": out / "openvino" / "model.xml"}


def build(run: str, name: str, version: str, output: dict, metrics: dict | None = None,
          notes: dict | None = None, dest_root: Path = BUNDLES, keep_fp32_first: int = 2,
          keep_fp32_last: int = 3) -> Path:
    model, ck = load_model(run)
    cfg = ck["config"]
    size = int(cfg["size"])
    task = cfg["task"]
    out, paths = new_bundle_dir(dest_root, name, version)
    export_onnx(model, size, paths["onnx"])
    calib = calibration(task, size=size)
    kept_fp32 = quantize_ort(paths["onnx"], paths["onnx_int8"], calib, keep_fp32_first, keep_fp32_last)
    rewrite = openvino_ir_filtered(paths["onnx"], paths["openvino_int8"], calib, keep_fp32_first, keep_fp32_last,
                                   selftest_inputs(task, size))

    # FP32 vs INT8 agreement on held-back real inputs (computed here, recorded in the manifest)
    held = calibration(task, n=48, seed=1, size=size)
    outs = run_all(paths, held)
    with torch.no_grad():
        torch_ref = model(torch.from_numpy(held)).numpy()
    import tempfile

    from appliance.inference.openvino_adapter import OpenVINOAdapter

    with tempfile.TemporaryDirectory() as tmp:
        nncf_xml = Path(tmp) / "nncf.xml"
        quantize_nncf(paths["onnx"], nncf_xml, calib)
        nncf_out = OpenVINOAdapter(nncf_xml, "int8").infer(held)
    thr = float(output.get("threshold", 0.5))  # agreement of the masks the appliance actually uses
    agree = {
        "scheme": "one INT8 QDQ quantization for both runtimes (ONNX Runtime quantizer: per-channel, 7-bit "
                  "weights, min-max activations; first and last convolutions in FP32); OpenVINO IR converted from "
                  "it with bilinear upsampling as nearest + exact filter (models.graph)",
        "kept_fp32": kept_fp32,
        "openvino_upsampling_rewrite": rewrite,
        "torch_vs_onnx_fp32_max_abs": float(np.abs(torch_ref - outs["fp32"]).max()),
        **runtime_agreement(outs, thr),
        "not_shipped_nncf_mixed_fp32_vs_int8_mask_dice": agreement(outs["fp32"], nncf_out, thr),
        "not_shipped_nncf_vs_int8_onnxruntime_mask_dice": agreement(outs["int8_onnxruntime"], nncf_out, thr),
        "n_inputs": int(len(held)),
    }

    st_in = selftest_inputs(task, size)
    st = run_all(paths, st_in)
    np.savez_compressed(out / "selftest.npz", inputs=st_in, expected_fp32=st["fp32"],
                        expected_int8_onnxruntime=st["int8_onnxruntime"], expected_int8_openvino=st["int8_openvino"])

    files = sorted(p for p in out.rglob("*") if p.is_file())
    manifest = {
        "schema": "ctriage.bundle/1",
        "name": name,
        "version": version,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "task": task,
        "arch": _arch(cfg, model),
        "input": {"size": [size, size], "window": [-1350, 150], "layout": "NCHW", "range": [0, 1],
                  "content": "lung-window lung-box crop" if task == "lesion" else "lung-window full slice, square-padded"},
        "output": output,
        "runtime_files": {"onnx": "model.onnx", "onnx_int8": "model.int8.onnx", "openvino_int8": "openvino/model.xml"},
        "files": {str(p.relative_to(out)): sha256_file(p) for p in files},
        "selftest": {"atol": 0.08, "inputs": "synthetic phantom (appliance.phantom)"},
        "training": {"run": run, "best_step": ck["step"], "config": cfg, "validation": ck["metrics"], **(notes or {})},
        "quantization": agree,
        "metrics": metrics or {},
        "licence": LICENCE,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps({"bundle": str(out), "quantization": agree, "validation": ck["metrics"]}, indent=1))
    return out


def _arch(cfg: dict, model: torch.nn.Module) -> dict:
    """The manifest's description of the network."""
    if cfg.get("extra", {}).get("arch") == "lite0-unetpp":
        from models.lite_unetpp import DECODER, WINDOWS

        return {"type": "unet++", "encoder": "efficientnet-lite0 (ImageNet weights, Apache-2.0)",
                "decoder_channels": list(DECODER), "input_windows_hu": [list(w) for w in WINDOWS],
                "upsample": "bilinear", "params": count_params(model)}
    return {"type": "unet++", "width": cfg["width"], "levels": cfg["levels"], "stem": cfg.get("stem", 1),
            "upsample": cfg.get("upsample", "bilinear"), "params": count_params(model)}


def _derive(src: Path, version: str, dest_root: Path, skip: tuple[str, ...] = ()) -> tuple:
    """Start a new version of a bundle: verify the source, copy its files (but the manifest, its signature and
    `skip`) to dest_root/<name>-<version>. Returns (source bundle, manifest to edit, new folder)."""
    from appliance.inference.bundle import load_bundle

    src = Path(src)
    old = load_bundle(src, verify=True)
    m = json.loads((src / "manifest.json").read_text())
    out = dest_root / f"{m['name']}-{version}"
    if out.resolve() == src.resolve():
        raise SystemExit(f"{out} is the source bundle; choose a new version")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("manifest.sig", "manifest.json", *skip))
    m["version"] = version
    m["created"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return old, m, out


def _write_manifest(out: Path, m: dict) -> None:
    """Hash every file of the new bundle into its manifest (metrics are re-measured by `ctriage evaluate`)."""
    m["metrics"] = {}
    m["files"] = {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    (out / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")


def rebundle(src: Path, version: str, output: dict, reason: str, dest_root: Path = BUNDLES,
             inputs: np.ndarray | None = None) -> Path:
    """A new version of a bundle with the same model files and new output thresholds (tuned on validation).

    The manifest records what it was derived from and why; INT8 vs FP32 agreement is re-measured at the new
    mask threshold on `inputs` (default: 48 real held calibration crops). MODEL_CARD.md is copied as it is: update
    it, then re-hash and sign (`ctriage models sign`).
    """
    old, m, out = _derive(src, version, dest_root)
    m["output"] = {**m["output"], **output}
    m["derived_from"] = {"name": old.name, "version": old.version, "manifest_sha256": old.sha256,
                         "same_model_files": True, "reason": reason}
    if m["task"] == "lesion":
        size = int(m["input"]["size"][0])
        graphs = [{k: out / v for k, v in g.items()} for g in old.spec.graphs()]  # the same files, copied
        outs = run_bundle(graphs, calibration("lesion", n=48, seed=1, size=size) if inputs is None else inputs)
        m["quantization"].update(runtime_agreement(outs, float(m["output"]["threshold"])))
    _write_manifest(out, m)
    print(json.dumps({"bundle": str(out), "output": m["output"], "quantization": m.get("quantization")}, indent=1))
    return out


def requantize(src: Path, version: str, keep_fp32_first: int, keep_fp32_last: int, reason: str,
               dest_root: Path = BUNDLES, calib: np.ndarray | None = None, inputs: np.ndarray | None = None,
               filter_upsample: bool = False) -> Path:
    """A new version of a bundle with the same FP32 model and a new INT8 model (other convolutions kept in FP32).

    The INT8 QDQ model and its OpenVINO IR are rebuilt from the bundle's model.onnx, calibrated on `calib`
    (default: the same 64 real training crops as `build`); FP32 vs INT8 agreement is re-measured at the bundle's
    mask threshold on `inputs` (default: 48 held real crops) and the self-test's INT8 outputs are regenerated.
    With `filter_upsample`, the OpenVINO IR is built from the rewritten graph (`openvino_ir_filtered`); model.onnx
    and model.int8.onnx stay as they were. MODEL_CARD.md is copied as it is: update it, then re-hash and sign
    (`ctriage models sign`).
    """
    from appliance.inference.bundle import load_bundle

    if load_bundle(src, verify=False).spec.deferred is not None:
        raise SystemExit(f"{src}: a bundle in two graphs (deferred); build it again with `python -m models.ensemble "
                         "--defer` and other --keep values (its manifest's training.recipe)")
    old, m, out = _derive(src, version, dest_root, skip=("model.int8.onnx", "openvino", "selftest.npz"))
    size, task = int(m["input"]["size"][0]), m["task"]
    paths = {"onnx": out / "model.onnx", "onnx_int8": out / "model.int8.onnx",
             "openvino_int8": out / "openvino" / "model.xml"}
    calib = calibration(task, size=size) if calib is None else calib
    kw: dict = {}
    if m.get("arch", {}).get("type") == "ensemble":  # each member keeps its own ends (models.ensemble)
        from models.ensemble import PREFIX, TTA

        kw = {"groups": [(PREFIX.format(i), keep_fp32_first, keep_fp32_last)
                         for i in range(len(m["arch"]["members"]))], "exclude_prefix": TTA}
    kept = quantize_ort(paths["onnx"], paths["onnx_int8"], calib, keep_fp32_first, keep_fp32_last, **kw)
    rewrite = None
    if filter_upsample:
        with np.load(Path(src) / "selftest.npz") as st_old:
            rewrite = openvino_ir_filtered(paths["onnx"], paths["openvino_int8"], calib, keep_fp32_first,
                                           keep_fp32_last, st_old["inputs"].astype(np.float32), **kw)
    else:
        openvino_ir_from_qdq(paths["onnx_int8"], paths["openvino_int8"])
    held = calibration(task, n=48, seed=1, size=size) if inputs is None else inputs
    thr = float(m["output"].get("threshold", 0.5))
    q = {k: v for k, v in m.get("quantization", {}).items() if "vs_int8_onnxruntime" not in k or "fp32_vs" in k}
    q.update({"scheme": "one INT8 QDQ model for both runtimes (ONNX Runtime quantizer: per-channel, 7-bit weights, "
                        f"min-max activations; the first {keep_fp32_first} and last {keep_fp32_last} convolutions"
                        f"{' of each member' if kw else ''} in FP32); OpenVINO IR converted from it",
              "kept_fp32": kept, **runtime_agreement(run_all(paths, held), thr), "n_inputs": int(len(held))})
    m["quantization"] = q
    with np.load(Path(src) / "selftest.npz") as st_old:
        st_in, expected_fp32 = st_old["inputs"], st_old["expected_fp32"]
    st = run_all(paths, st_in.astype(np.float32))
    np.savez_compressed(out / "selftest.npz", inputs=st_in, expected_fp32=expected_fp32,
                        expected_int8_onnxruntime=st["int8_onnxruntime"], expected_int8_openvino=st["int8_openvino"])
    m["derived_from"] = {"name": old.name, "version": old.version, "manifest_sha256": old.sha256,
                         "same_fp32_model": True, "reason": reason}
    if rewrite is not None:
        q["scheme"] += "; the OpenVINO IR with bilinear upsampling as nearest + exact filter (models.graph)"
        q["openvino_upsampling_rewrite"] = rewrite
    _write_manifest(out, m)
    print(json.dumps({"bundle": str(out), "quantization": q, "rewrite": rewrite}, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-bundle", metavar="DIR", default=None,
                    help="derive a new version of this bundle (same model files) with new thresholds")
    ap.add_argument("--reason", default="output thresholds tuned on the validation split (python -m models.tune --sweep)")
    ap.add_argument("--run", required=False)
    ap.add_argument("--name", choices=["lesion", "valid-area"], default="lesion")
    ap.add_argument("--version", required=True)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--min-area", type=float, default=25.0)
    ap.add_argument("--min-score", type=float, default=None)
    ap.add_argument("--requantize", action="store_true",
                    help="with --from-bundle: same FP32 model, a new INT8 model "
                         "(see --keep-fp32-first/--keep-fp32-last)")
    ap.add_argument("--keep-fp32-first", type=int, default=2, help="convolutions kept in FP32 at the input end")
    ap.add_argument("--keep-fp32-last", type=int, default=3, help="convolutions kept in FP32 at the output end")
    ap.add_argument("--filter-upsample", action="store_true",
                    help="with --requantize: build the OpenVINO IR with bilinear upsampling rewritten as nearest + "
                         "a fixed filter (the same function; OpenVINO keeps it in INT8)")
    ap.add_argument("--dest", type=Path, default=BUNDLES, help="where the new bundle is written")
    a = ap.parse_args(argv)
    if a.filter_upsample and not a.requantize:
        ap.error("--filter-upsample needs --requantize (new models get it from the export itself)")
    if a.requantize:
        if not a.from_bundle:
            ap.error("--requantize needs --from-bundle")
        reason = a.reason if a.reason != ap.get_default("reason") else (
            f"re-quantized: first {a.keep_fp32_first} and last {a.keep_fp32_last} convolutions kept in FP32")
        requantize(Path(a.from_bundle), a.version, a.keep_fp32_first, a.keep_fp32_last, reason, a.dest,
                   filter_upsample=a.filter_upsample)
        return
    if a.from_bundle:
        changes = {"threshold": a.threshold, "min_area_px": a.min_area}
        if a.min_score is not None:
            changes["min_score"] = a.min_score
        from appliance.inference.bundle import BundleError

        try:
            rebundle(Path(a.from_bundle), a.version, changes, a.reason, a.dest)
        except BundleError as e:
            raise SystemExit(f"--from-bundle: {e}") from None
        return
    if not a.run:
        ap.error("--run is required (or --from-bundle)")
    if a.name == "lesion":
        output = {"kind": "probability", "threshold": a.threshold, "min_area_px": a.min_area, "area_scale": 512,
                  "min_score": a.min_score if a.min_score is not None else a.threshold}
    else:
        output = {"kind": "probability", "threshold": a.threshold, "min_lung_cm2": 6.0, "min_total_lung_cm2": 15.0,
                  "box_margin": CROP_MARGIN, "region_dilate_px": 3}
    build(a.run, a.name, a.version, output, dest_root=a.dest, keep_fp32_first=a.keep_fp32_first,
          keep_fp32_last=a.keep_fp32_last)


if __name__ == "__main__":
    main()
