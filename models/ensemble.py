"""Lesion bundle as one graph of several networks: the mean of their probability maps, a member optionally also on
the mirrored slice (horizontal flip, mirrored back).

    python -m models.ensemble --member models/bundles/lesion-1.2.2 --member run:l2-b \\
        --name lesion --version 2.0.0 --threshold 0.3 --min-score 0.5 --dest /tmp/cand

Why: the from-scratch UNet++ (1.2.2) and the UNet++ on the pretrained EfficientNet-Lite0 encoder (model 2) make
different errors (model 2 finds more consolidation, 1.2.2 more faint ground glass), and a chest slice is nearly
mirror-symmetric, so averaging the two and their mirrored views is a better mask than either (models/LESION2.md).
The stage's contract does not change: one lung-window input at 224², one probability map; the appliance runs the
bundle as any other.

A member is a bundle folder (its FP32 model.onnx), `BUNDLE#I` (member I of an ensemble bundle, taken out of its
FP32 graph) or `run:NAME` (a training run's best.pt, exported here). The
INT8 model is quantized from the composed FP32 graph as `models.export` does, with each member's own first and
last convolutions kept in FP32 (`--keep MEMBER_INDEX:FIRST:LAST`) and the mirror/mean nodes left in FP32.

`--defer I` packs the same map as two graphs: member I's mirrored view apart (`split_deferred`), which the
appliance runs only on slices where it can still make a box (appliance/inference/deferred.py; lesion 2.6.0).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
from pathlib import Path

import numpy as np

PREFIX = "m{}/"  # member i's names in the composed graph
TTA = "tta/"  # names of the mirror / mean nodes


def extract_member(model, index: int):
    """Member `index` of a composed ensemble graph (its nodes `m<index>/…`) as a model of its own with the stage's
    contract (input `image`, output `prob`), the prefix taken off: a shipped member re-used without its run."""
    import onnx
    from onnx import helper

    pre = PREFIX.format(index)
    names = {n.name for n in model.graph.node}
    if not any(n.startswith(pre) for n in names):
        members = sorted({n.split("/")[0] for n in names if n[:1] == "m" and n.split("/")[0][1:].isdigit()})
        raise ValueError(f"no member {index} in this graph (members: {', '.join(members) or 'none: not an ensemble'})")
    sub = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model)).extract_model([pre + "image"],
                                                                                   [pre + "prob"])
    strip = lambda v: v[len(pre):] if v.startswith(pre) else v  # noqa: E731
    for n in sub.graph.node:
        n.name = strip(n.name)
        n.input[:] = [strip(v) for v in n.input]
        n.output[:] = [strip(v) for v in n.output]
    for coll in (sub.graph.initializer, sub.graph.input, sub.graph.output, sub.graph.value_info):
        for v in coll:
            v.name = strip(v.name)
    del sub.graph.value_info[:]  # shapes inferred inside the ensemble (its batch): not this member's contract
    width = model.graph.input[0].type.tensor_type.shape
    sub.graph.input[0].type.tensor_type.shape.CopyFrom(width)  # the ensemble's input shape (N free, 224 fixed)
    sub.graph.output[0].type.tensor_type.shape.CopyFrom(model.graph.output[0].type.tensor_type.shape)
    out = helper.make_model(sub.graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    onnx.checker.check_model(out)
    return out


def member_onnx(spec: str, tmp: Path) -> tuple[Path, dict]:
    """(FP32 ONNX file, description) of a member: a bundle folder, `BUNDLE#I` (member I of an ensemble bundle)
    or `run:NAME`."""
    if spec.startswith("run:"):
        from models.export import _arch, export_onnx, load_model

        run = spec[4:]
        model, ck = load_model(run)
        path = tmp / f"{run}.onnx"
        export_onnx(model, int(ck["config"]["size"]), path)
        return path, {"run": run, "best_step": ck["step"], "arch": _arch(ck["config"], model),
                      "validation": ck["metrics"], "config": ck["config"]}
    from appliance.inference.bundle import BundleError, load_bundle

    folder, _, index = spec.partition("#")
    try:
        b = load_bundle(Path(folder), verify=True)
    except BundleError as e:
        raise SystemExit(f"--member {spec}: {e}") from None
    m = json.loads((Path(folder) / "manifest.json").read_text())
    if b.spec.deferred is not None and not index:
        raise SystemExit(f"--member {spec}: a bundle in two graphs; take its members out one by one (BUNDLE#I)")
    path = b.path / b.spec.runtime_files["onnx"]  # two graphs: every member is whole in the first
    about = {"bundle": f"{b.name} {b.version}", "manifest_sha256": b.sha256, "arch": m.get("arch"),
             "training_run": m.get("training", {}).get("run")}
    if not index:
        return path, about
    import onnx

    try:
        i = int(index)
        sub = extract_member(onnx.load(str(path)), i)
    except ValueError as e:
        raise SystemExit(f"--member {spec}: {e if index.isdigit() else 'expected BUNDLE#MEMBER_INDEX, e.g. #1'}") from None
    out = tmp / f"{b.name}-{b.version}-m{i}.onnx"
    onnx.save(sub, str(out))
    arch = (m.get("arch") or {}).get("members", [None] * (i + 1))
    return out, {**about, "member": i, "arch": arch[i] if i < len(arch) else None}


def compose(members: list, flip: list[bool] | bool = True, scale: list[float] | None = None):
    """One ONNX model: input `image` [N,1,H,W] → output `prob` [N,1,H,W], the mean over members, each member
    weighing the same. A member with `flip` sees the slice and its mirror image (batch doubled) and contributes the
    mean of the two maps (the mirrored one mirrored back). Members must share that contract.

    scale: each member's map multiplied by this before the mean (default 1): `split_deferred` uses it to leave a
    member's mirrored view out of the graph with the other weights unchanged."""
    import onnx
    from onnx import helper, numpy_helper

    if not members:
        raise ValueError("an ensemble needs at least one member")
    flips = [flip] * len(members) if isinstance(flip, bool) else list(flip)
    if len(flips) != len(members):
        raise ValueError(f"{len(flips)} flip flags for {len(members)} members")
    if scale is not None and len(scale) != len(members):
        raise ValueError(f"{len(scale)} scales for {len(members)} members")
    width = None
    nodes, inits, infos, opset, ir, parts = [], [], [], 0, 0, []
    for i, m in enumerate(members):
        if [x.name for x in m.graph.input] != ["image"] or [x.name for x in m.graph.output] != ["prob"]:
            raise ValueError(f"member {i}: expected one input 'image' and one output 'prob'")
        w = m.graph.input[0].type.tensor_type.shape.dim[3].dim_value
        if width is not None and w != width:
            raise ValueError(f"member {i}: input width {w} differs from member 0's {width}")
        width = w
        pre = PREFIX.format(i)
        p = onnx.compose.add_prefix(m, pre)
        nodes.append(helper.make_node("Identity", [TTA + ("both" if flips[i] else "image")], [pre + "image"],
                                      name=f"{TTA}in{i}"))
        nodes += list(p.graph.node)
        if flips[i]:  # mean of the plain and the mirrored-back map
            nodes += [helper.make_node("Split", [pre + "prob"], [f"{TTA}{i}/plain", f"{TTA}{i}/mirrored"],
                                       name=f"{TTA}{i}/split", axis=0),
                      helper.make_node("Gather", [f"{TTA}{i}/mirrored", TTA + "reverse"], [f"{TTA}{i}/back"],
                                       name=f"{TTA}{i}/back", axis=3),
                      helper.make_node("Sum", [f"{TTA}{i}/plain", f"{TTA}{i}/back"], [f"{TTA}{i}/pair"],
                                       name=f"{TTA}{i}/pair"),
                      helper.make_node("Mul", [f"{TTA}{i}/pair", TTA + "half"], [f"{TTA}{i}/prob"],
                                       name=f"{TTA}{i}/prob")]
            parts.append(f"{TTA}{i}/prob")
        else:
            parts.append(pre + "prob")
        if scale is not None and scale[i] != 1.0:
            inits.append(numpy_helper.from_array(np.array(scale[i], np.float32), f"{TTA}{i}/scale"))
            nodes.append(helper.make_node("Mul", [parts[-1], f"{TTA}{i}/scale"], [f"{TTA}{i}/scaled"],
                                          name=f"{TTA}{i}/scaled"))
            parts[-1] = f"{TTA}{i}/scaled"
        inits += list(p.graph.initializer)
        infos += list(p.graph.value_info)
        opset = max(opset, next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")))
        ir = max(ir, m.ir_version)
    if not width:
        raise ValueError("members must have a fixed input width")
    head = [helper.make_node("Identity", ["image"], [TTA + "image"], name=TTA + "image")]
    if any(flips):
        inits += [numpy_helper.from_array(np.arange(width - 1, -1, -1, dtype=np.int64), TTA + "reverse"),
                  numpy_helper.from_array(np.array(0.5, np.float32), TTA + "half")]
        head += [helper.make_node("Gather", ["image", TTA + "reverse"], [TTA + "mirror"], name=TTA + "mirror",
                                  axis=3),
                 helper.make_node("Concat", ["image", TTA + "mirror"], [TTA + "both"], name=TTA + "both", axis=0)]
    inits.append(numpy_helper.from_array(np.array(1.0 / len(members), np.float32), TTA + "weight"))
    tail = [helper.make_node("Sum", parts, [TTA + "sum"], name=TTA + "sum"),
            helper.make_node("Mul", [TTA + "sum", TTA + "weight"], ["prob"], name=TTA + "mean")]
    src = members[0].graph
    g = helper.make_graph(head + nodes + tail, "lesion-ensemble", [src.input[0]], [src.output[0]], inits,
                          value_info=infos)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    onnx.checker.check_model(model)
    return model


def mirrored_view(member, index: int, weight: float):
    """`member` on the mirrored slice, its map mirrored back and multiplied by `weight`: input `image`, output
    `prob`; the member's names prefixed as in `compose` (m<index>/), so its quantization keeps the same layers."""
    import onnx
    from onnx import helper, numpy_helper

    if [x.name for x in member.graph.input] != ["image"] or [x.name for x in member.graph.output] != ["prob"]:
        raise ValueError(f"member {index}: expected one input 'image' and one output 'prob'")
    width = member.graph.input[0].type.tensor_type.shape.dim[3].dim_value
    if not width:
        raise ValueError("members must have a fixed input width")
    pre = PREFIX.format(index)
    p = onnx.compose.add_prefix(member, pre)
    inits = list(p.graph.initializer) + [
        numpy_helper.from_array(np.arange(width - 1, -1, -1, dtype=np.int64), TTA + "reverse"),
        numpy_helper.from_array(np.array(weight, np.float32), TTA + "weight")]
    nodes = [helper.make_node("Gather", ["image", TTA + "reverse"], [pre + "image"], name=TTA + "mirror", axis=3),
             *p.graph.node,
             helper.make_node("Gather", [pre + "prob", TTA + "reverse"], [TTA + "back"], name=TTA + "back", axis=3),
             helper.make_node("Mul", [TTA + "back", TTA + "weight"], ["prob"], name=TTA + "weighted")]
    g = helper.make_graph(nodes, "lesion-deferred-view", [member.graph.input[0]], [member.graph.output[0]], inits,
                          value_info=list(p.graph.value_info))
    model = helper.make_model(g, opset_imports=list(member.opset_import))
    model.ir_version = member.ir_version
    onnx.checker.check_model(model)
    return model


def split_deferred(members: list, flip: list[bool], defer: int):
    """`compose(members, flip)` as two graphs whose maps add up to it: (first, deferred, ceiling).

    `deferred` is member `defer`'s mirrored view with its weight in the mean (half the member's, `ceiling` =
    1 / (2 × members)); `first` is everything else. As `deferred`'s map lies in [0, ceiling], a slice whose
    `first` map peaks below min_score − ceiling cannot reach min_score with it: the appliance runs `deferred` only
    where it can still make a box (appliance.inference.deferred)."""
    n = len(members)
    if not 0 <= defer < n:
        raise ValueError(f"no member {defer} to defer (members 0..{n - 1})")
    if not flip[defer]:
        raise ValueError(f"member {defer} has no mirrored view to defer")
    ceiling = 0.5 / n
    first = compose(members, [f and i != defer for i, f in enumerate(flip)],
                    scale=[0.5 if i == defer else 1.0 for i in range(n)])
    return first, mirrored_view(members[defer], defer, ceiling), ceiling


def keep_groups(n_members: int, keep: list[str]) -> list[tuple[str, int, int]]:
    """(name prefix, first, last) per member from `--keep I:FIRST:LAST` (default 2 first, 3 last)."""
    out = {i: (2, 3) for i in range(n_members)}
    for k in keep:
        try:
            i, first, last = (int(v) for v in k.split(":"))
        except ValueError:
            raise SystemExit(f"--keep {k!r}: expected MEMBER:FIRST:LAST, e.g. 0:2:1") from None
        if i not in out:
            raise SystemExit(f"--keep {k!r}: there is no member {i} (members 0..{n_members - 1})")
        out[i] = (first, last)
    return [(PREFIX.format(i), f, la) for i, (f, la) in sorted(out.items())]


DEFERRED_FILES = {"onnx": "deferred.onnx", "onnx_int8": "deferred.int8.onnx", "openvino_int8": "openvino/deferred.xml"}


def build(specs: list[str], name: str, version: str, output: dict, dest_root: Path, keep: list[str],
          flip: list[bool], recipe: str = "", defer: int | None = None) -> Path:
    """The bundle: the composed graph (or, with `defer`, the two graphs of `split_deferred`), each quantized for
    both runtimes, agreement and self-test measured on the full map (the graphs' sum)."""
    import onnx

    from appliance.inference.bundle import sha256_file
    from models.export import (LICENCE, calibration, new_bundle_dir, openvino_ir_filtered, quantize_ort, run_bundle,
                               runtime_agreement, selftest_inputs)

    out, paths = new_bundle_dir(dest_root, name, version)
    groups = keep_groups(len(specs), keep)
    graphs = [paths]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        found = [member_onnx(s, tmp) for s in specs]
        members = [onnx.load(str(p)) for p, _ in found]
        if defer is None:
            models, group_sets = [compose(members, flip)], [groups]
        else:
            first, second, ceiling = split_deferred(members, flip, defer)
            graphs.append({k: out / v for k, v in DEFERRED_FILES.items()})
            models, group_sets = [first, second], [groups, [groups[defer]]]
        kept, rewrite = [], []
        for k, (model, files, gs) in enumerate(zip(models, graphs, group_sets)):
            onnx.save(model, str(files["onnx"]))
            size = model.graph.input[0].type.tensor_type.shape.dim[3].dim_value
            calib = calibration("lesion", size=size)
            kept += [("deferred: " if k else "") + c
                     for c in quantize_ort(files["onnx"], files["onnx_int8"], calib, groups=gs, exclude_prefix=TTA)]
            # OpenVINO: the same quantization of the graph with its bilinear upsamplings rewritten (models.graph)
            rewrite.append(openvino_ir_filtered(files["onnx"], files["openvino_int8"], calib, 0, 0,
                                                selftest_inputs("lesion", size), groups=gs, exclude_prefix=TTA))

    held = calibration("lesion", n=48, seed=1, size=size)
    thr = float(output["threshold"])
    agree = {"scheme": "one INT8 QDQ quantization of the composed graph for both runtimes (ONNX Runtime quantizer: "
                       "per-channel, 7-bit weights, min-max activations; each member's first and last convolutions "
                       "and the mirror / mean nodes in FP32); OpenVINO IR converted from it with bilinear upsampling "
                       "as nearest + exact filter (models.graph)"
                       + ("; the deferred view's graph quantized the same way on its own, agreement measured on "
                          "the sum" if defer is not None else ""),
             "kept_fp32": kept,
             "openvino_upsampling_rewrite": rewrite[0] if len(rewrite) == 1 else rewrite,
             **runtime_agreement(run_bundle(graphs, held), thr), "n_inputs": int(len(held))}
    st_in = selftest_inputs("lesion", size)
    st = run_bundle(graphs, st_in)
    np.savez_compressed(out / "selftest.npz", inputs=st_in, expected_fp32=st["fp32"],
                        expected_int8_onnxruntime=st["int8_onnxruntime"], expected_int8_openvino=st["int8_openvino"])
    tta = ["horizontal mirror" if f else "none" for f in flip]
    if defer is not None:
        tta[defer] = "horizontal mirror, deferred (run only where it can still make a box)"
    manifest = {
        "schema": "ctriage.bundle/1", "name": name, "version": version,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "task": "lesion",
        "arch": {"type": "ensemble", "combine": "mean of probabilities",
                 "members": [{**d["arch"], "test_time_augmentation": t} for (_, d), t in zip(found, tta)]},
        "input": {"size": [size, size], "window": [-1350, 150], "layout": "NCHW", "range": [0, 1],
                  "content": "lung-window lung-box crop"},
        "output": output,
    }
    files = {"onnx": "model.onnx", "onnx_int8": "model.int8.onnx", "openvino_int8": "openvino/model.xml"}
    if defer is None:
        manifest["runtime_files"] = files
    else:  # schema 2: software that runs one graph only must not load it (appliance.inference.bundle)
        manifest["schema"] = "ctriage.bundle/2"
        manifest["graphs"] = {
            "first": files, "deferred": dict(DEFERRED_FILES), "ceiling": ceiling,
            "about": f"deferred: member {defer}'s mirrored view with its weight in the mean; the full map is the sum "
                     "of both graphs' maps. The appliance runs it only on slices whose first map peaks at or above "
                     "min_score - ceiling (elsewhere no box can be made with or without it)"}
    manifest.update({
        "files": {},
        "selftest": {"atol": 0.08, "inputs": "synthetic phantom (appliance.phantom)"},
        "training": {"ensemble_of": [{k: v for k, v in d.items() if k != "arch"} for _, d in found],
                     "recipe": recipe or "python -m models.ensemble " + " ".join(f"--member {s}" for s in specs)},
        "quantization": agree, "metrics": {}, "licence": LICENCE,
    })
    manifest["files"] = {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps({"bundle": str(out), "quantization": agree}, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--member", action="append", required=True, help="a bundle folder, BUNDLE#I or run:NAME (repeatable)")
    ap.add_argument("--name", default="lesion")
    ap.add_argument("--version", required=True)
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--min-area", type=float, default=25.0)
    ap.add_argument("--min-score", type=float, default=None)
    ap.add_argument("--keep", action="append", default=[], metavar="I:FIRST:LAST",
                    help="member I's first / last convolutions kept in FP32 (default 2:3 for each)")
    ap.add_argument("--flip", default="all", metavar="I,J|all|none",
                    help="members that also see the mirrored slice (default: all)")
    from models.export import BUNDLES

    ap.add_argument("--defer", type=int, default=None, metavar="I",
                    help="member I's mirrored view as a second graph the appliance runs only where it can still "
                         "make a box (same boxes, less work on slices without lesion)")
    ap.add_argument("--dest", type=Path, default=BUNDLES)
    a = ap.parse_args(argv)
    output = {"kind": "probability", "threshold": a.threshold, "min_area_px": a.min_area, "area_scale": 512,
              "min_score": a.min_score if a.min_score is not None else a.threshold}
    n = len(a.member)
    if a.flip in ("all", "none"):
        flip = [a.flip == "all"] * n
    else:
        try:
            chosen = {int(v) for v in a.flip.split(",")}
        except ValueError:
            ap.error(f"--flip {a.flip!r}: expected member indices like 0,1 or all / none")
        if not chosen <= set(range(n)):
            ap.error(f"--flip {a.flip!r}: members are 0..{n - 1}")
        flip = [i in chosen for i in range(n)]
    import shlex
    import sys

    args = sys.argv[1:] if argv is None else argv
    if a.defer is not None and not (0 <= a.defer < n and flip[a.defer]):
        ap.error(f"--defer {a.defer}: not a member with a mirrored view (--flip)")
    build(a.member, a.name, a.version, output, a.dest, a.keep, flip, defer=a.defer,
          recipe="python -m models.ensemble " + " ".join(shlex.quote(v) for v in args))


if __name__ == "__main__":
    main()
