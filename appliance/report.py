"""Evaluation report: one self-contained HTML page (plots and key images embedded as base64 PNG) + metrics.json.

Contents: Table 3 per image and per patient with confusion tables, ROC and sensitivity/specificity over the
per-image score threshold (exact sweep), Dice histogram, per-patient table with the run that fired, galleries of
the worst misses and of the false alarms with boxes drawn, the model bundles and the backend.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from appliance import __version__
from appliance.domain import Rect, SliceFinding
from appliance.evaluate import Evaluation, ImageResult, PatientResult, paired_dice, read_mask, spread_words
from appliance.metrics import auc
from appliance.imaging import resize
from appliance.pipeline.anatomy import run_text
from appliance.pipeline.grade_text import pattern_text
from appliance.publish.overlays import png_bytes, render

MASK = (64, 230, 90)
GALLERY = 8


def _mpl():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the HTML report needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure


def _fig_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: str, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{w} src="data:image/png;base64,{b64}">'


def roc_plot(points: Sequence[dict], operating: tuple[float | None, float | None]) -> str:
    """ROC (FPR → TPR) over the score threshold, with the pipeline's own calls marked; base64 PNG."""
    Figure = _mpl()
    fig = Figure(figsize=(4.2, 4.0))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="#999")
    a = auc(points)
    if a is None:
        ax.text(0.5, 0.5, "ROC needs images of both classes", ha="center", va="center")
    else:
        ax.plot([p["fpr"] for p in points], [p["tpr"] for p in points], color="#c0392b", lw=1.8,
                label=f"AUC {a:.3f}")
        fpr, tpr = operating
        if fpr is not None and tpr is not None:
            ax.plot([fpr], [tpr], "o", color="#1f4e79", label="pipeline (boxes)")
        ax.legend(loc="lower right")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 − specificity (FPR)", ylabel="sensitivity (TPR)",
           title="ROC per image")
    ax.grid(alpha=0.3)
    return _fig_png(fig)


def threshold_plot(points: Sequence[dict], threshold: float) -> str:
    """Sensitivity and specificity over the per-image score threshold (exact steps); base64 PNG."""
    Figure = _mpl()
    fig = Figure(figsize=(5.2, 4.0))
    ax = fig.add_subplot()
    pts = sorted((p for p in points if np.isfinite(p["threshold"])), key=lambda p: p["threshold"])
    top = next(p for p in points if not np.isfinite(p["threshold"]))  # nothing called
    if pts:
        # value at threshold x = the point with the smallest threshold ≥ x ("steps-pre" in ascending order)
        xs = [0.0] + [p["threshold"] for p in pts] + [max(1.0, pts[-1]["threshold"])]
        for key, colour in (("sensitivity", "#c0392b"), ("specificity", "#1f4e79")):
            ys = [pts[0][key]] + [p[key] for p in pts] + [top[key]]
            if all(v is not None for v in ys):
                ax.plot(xs, ys, drawstyle="steps-pre", color=colour, lw=1.6, label=key)
    ax.axvline(threshold, ls=":", color="#555", label=f"bundle threshold {threshold:g}")
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), xlabel="per-image score threshold", ylabel="",
           title="sensitivity / specificity per image")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _fig_png(fig)


def dice_plot(values: Sequence[float]) -> str:
    """Histogram of per-image Dice (at least one value; the report says so when there are none)."""
    Figure = _mpl()
    fig = Figure(figsize=(4.6, 3.4))
    ax = fig.add_subplot()
    ax.hist(values, bins=np.linspace(0, 1, 21), color="#2e8b57", edgecolor="white")
    ax.axvline(float(np.mean(values)), color="#c0392b", ls="--", label=f"mean {np.mean(values):.3f}")
    ax.legend(loc="upper left")
    ax.set(xlim=(0, 1), xlabel="Dice per image", ylabel="images", title=f"Dice (n = {len(values)})")
    return _fig_png(fig)


def paired_dice_plot(pairs: Sequence[tuple[float, float]]) -> str:
    """Per-image Dice, baseline (x) against this evaluation (y): above the diagonal, this one is better."""
    Figure = _mpl()
    fig = Figure(figsize=(4.0, 3.8))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#888", lw=1, ls="--")
    xs, ys = [b for _, b in pairs], [n for n, _ in pairs]
    colours = ["#2e8b57" if n > b else "#c0392b" if n < b else "#555" for n, b in pairs]
    ax.scatter(xs, ys, c=colours, s=22)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="Dice, baseline", ylabel="Dice, this evaluation",
           title=f"Dice per image (n = {len(pairs)})")
    ax.grid(alpha=0.3)
    return _fig_png(fig)


def baseline_html(vs: dict, pairs: Sequence[tuple[float, float]]) -> str:
    """The paired comparison with the baseline evaluation: the plot and the difference in words."""
    ci = vs["ci95"]
    was = ", ".join(f"{b['name']} {b['version']}" for b in vs.get("bundles_baseline") or []) or "the baseline"
    verdict = spread_words(ci)
    interval = "" if ci is None else f" (95 % paired bootstrap interval {ci[0]:+.3f} … {ci[1]:+.3f})"
    return (f"""<div class=row>{_img(paired_dice_plot(pairs), "Dice per image against the baseline")}
<p>Against {html.escape(was)} on the same {vs['n']} image(s): mean Dice {vs['mean_new']:.3f} vs
{vs['mean_baseline']:.3f}, difference <b>{vs['difference']:+.3f}</b>{interval}: <b>{verdict}</b>.<br>
Better on {vs['better']} image(s), worse on {vs['worse']} (green above the diagonal, red below).</p></div>""")


def _grey(r: ImageResult, max_tilt_deg: float) -> np.ndarray:
    if r.kind == "dicom":
        from appliance.imaging import window
        from appliance.ingest.dicom_reader import read_slice

        return window(read_slice(r.key, max_tilt_deg=max_tilt_deg).hu)  # type: ignore[arg-type]
    from appliance.ingest.image_reader import read_image

    return read_image(Path(r.key), r.index, "").window01  # type: ignore[return-value]


def _scaled(f: SliceFinding, k: float) -> SliceFinding:
    def r(x: Rect | None) -> Rect | None:
        return None if x is None else Rect(*(int(round(v * k)) for v in x.as_list()))

    return replace(f, shape=(int(round(f.shape[0] * k)), int(round(f.shape[1] * k))), lung=r(f.lung),
                   crop=r(f.crop), boxes=[replace(b, rect=r(b.rect)) for b in f.boxes], prob=None)


def key_image(r: ImageResult, max_tilt_deg: float = 10.0, size: int = 320) -> str:
    """The slice scaled to `size` with lung box and lesion boxes (overlays.render) and the mask outline, if any."""
    grey = _grey(r, max_tilt_deg)
    shape = grey.shape
    k = size / max(shape)
    if k > 1.0:  # small crops: enlarge the image, not the lettering
        grey = resize(grey, (int(round(shape[0] * k)), int(round(shape[1] * k))))
        im = render(grey, _scaled(r.finding, k), title="", max_size=0)
    else:
        im = render(grey, r.finding, title="", max_size=size)
    if r.mask is not None:
        m = read_mask(r.mask)
        if m.shape == shape and m.any():
            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(im.size, Image.NEAREST)) > 0
            edge = ndi.binary_dilation(m & ~ndi.binary_erosion(m))
            a = np.asarray(im).copy()
            a[edge] = MASK
            im = Image.fromarray(a)
    return base64.b64encode(png_bytes(im)).decode()


def worst_misses(images: Sequence[ImageResult], n: int = GALLERY) -> list[ImageResult]:
    """COVID images with lesion that were missed (no box) first, then those with the lowest Dice."""
    pos = [r for r in images if r.truth]
    pos.sort(key=lambda r: (r.called, r.dice if r.dice is not None else (0.0 if not r.called else 1.0), r.score))
    return [r for r in pos if not r.called or (r.dice is not None and r.dice < 1.0)][:n]


def false_alarms(images: Sequence[ImageResult], n: int = GALLERY) -> list[ImageResult]:
    """Control images with boxes, highest box score first."""
    fa = [r for r in images if r.truth is False and r.called]
    fa.sort(key=lambda r: -max(b.score for b in r.finding.boxes))
    return fa[:n]


def deciding_images(images: Sequence[ImageResult], patients: Sequence[PatientResult]
                    ) -> list[tuple[ImageResult, str]]:
    """(image, caption) for every slice that decided a patient's call (`evaluate.deciding_slices`), patient order."""
    by_key = {(r.patient, r.key): r for r in images}
    out = []
    for p in patients:
        for d in p.deciding:
            r = by_key.get((p.source.name, d["key"]))
            if r is not None:
                out.append((r, f"{p.result.upper()} · slice {d['index'] + 1} · {d['what']}"))
    return out


def _gallery(items: list[ImageResult], max_tilt_deg: float, empty: str,
             captions: Sequence[str] | None = None) -> str:
    if not items:
        return f"<p class=note>{html.escape(empty)}</p>"
    cells = []
    for k, r in enumerate(items):
        cap = (f"{html.escape(r.patient)} · {html.escape(Path(r.key).name)}<br>score {r.score:.3f} · "
               f"{len(r.finding.boxes)} box(es)" + (f" · Dice {r.dice:.3f}" if r.dice is not None else ""))
        if captions is not None:
            cap = f"{html.escape(r.patient)} · {html.escape(captions[k])}"
        try:
            img = _img(key_image(r, max_tilt_deg), Path(r.key).name)
        except Exception as e:  # a file that went away since the run: say so, keep the report
            img = f"<div class=note>cannot show: {html.escape(type(e).__name__)}: {html.escape(str(e))}</div>"
        cells.append(f"<figure>{img}<figcaption>{cap}</figcaption></figure>")
    return "<div class=gallery>" + "".join(cells) + "</div>"


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence], cls: str = "") -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def _confusion(m: dict, pos: str, neg: str) -> str:
    return _table(["", f"truth {pos}", f"truth {neg}"],
                  [["called positive", m["tp"], m["fp"]], ["called negative", m["fn"], m["tn"]]], "conf")


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:2px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3} table.conf td:first-child{font-weight:600}
tr.ok td:nth-child(3){color:#1e7b34} tr.bad td:nth-child(3){color:#b02a1c;font-weight:600}
.row{display:flex;gap:18px;flex-wrap:wrap;align-items:flex-start}
.gallery{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0;width:320px}
figcaption{font-size:12px;color:#444} .note{color:#666} code{background:#f5f5f5;padding:0 3px}
"""


def build_html(ev: Evaluation, data: dict, max_tilt_deg: float = 10.0, gallery: int = GALLERY,
               baseline: dict | None = None) -> str:
    pi, pp, d = data["per_image"], data["per_patient"], data["dice"]
    points = ev.sweep()
    op = (None if pi["specificity"] is None else 1.0 - pi["specificity"], pi["sensitivity"])
    names = [("sensitivity", "sensitivity"), ("specificity", "specificity"), ("accuracy", "accuracy"),
             ("ppv", "PPV"), ("npv", "NPV")]
    t3 = _table(["", "per image", "per patient"],
                [[label, _fmt(pi[k]), _fmt(pp[k])] for k, label in names]
                + [["TP / FP / TN / FN", f"{pi['tp']} / {pi['fp']} / {pi['tn']} / {pi['fn']}",
                    f"{pp['tp']} / {pp['fp']} / {pp['tn']} / {pp['fn']}"]])
    deciding = deciding_images(ev.images, ev.patients)
    prow = []
    for p in data["patients"]:
        ev_ = p["evidence"]
        run = (html.escape(run_text(ev_["quadrant"], ev_["first_slice"], ev_["last_slice"], ev_["run"]))
               if ev_ else html.escape(p.get("reason") or "–"))
        right = (p["result"] == "positive") == (p["group"] == "covid")
        pattern = html.escape(pattern_text(p.get("grade"), p["result"], reasons=True) or "–")
        named = "<br>".join(html.escape(o["text"]) for o in p.get("others") or []) or "–"
        acq = p.get("acquisition") or {}
        noise = (f"{acq['noise']:.3f}" + (f" <b>noisy</b> (&gt; {acq.get('limit', 0):.3f})" if acq.get("noisy") else "")
                 if isinstance(acq.get("noise"), (int, float)) else "–")
        prow.append((right, [html.escape(p["patient"]), p["group"], p["result"],
                             p.get("result_without_other_findings") or p["result"], run, pattern, named, p["slices"],
                             p["lesion_slices"], p["series"], p["rejected"], noise]))
    head = ["patient", "group", "result", "without other findings",
            "run that fired (quadrant, slices, length) or reason", "pattern (positives)",
            "solid nodules and masses named", "slices", "lesion slices", "series", "rejected",
            "image noise"]
    ptab = (f"<table><thead><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr></thead><tbody>"
            + "".join(f'<tr class="{"ok" if ok else "bad"}">' + "".join(f"<td>{c}</td>" for c in r) + "</tr>"
                      for ok, r in prow) + "</tbody></table>")
    btab = _table(["bundle", "version", "sha256"],
                  [[html.escape(b["name"]), html.escape(b["version"]), f"<code>{b['sha256'][:16]}…</code>"]
                   for b in data["bundles"]])
    dice_vals = [r.dice for r in ev.with_dice if r.dice is not None]
    created = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    auc_txt = f"{data['roc_auc']:.3f}" if data["roc_auc"] is not None else "–"
    peak = (f", its component peaking at ≥ {ev.min_score:g}" if ev.min_score is not None
            and ev.min_score > ev.threshold else "")
    rule = f": {html.escape(ev.case_rule)}" if ev.case_rule else ""
    vs = data.get("dice_vs_baseline")
    if vs:
        old = {i["image"]: i["dice"] for i in baseline["dice"]["images"]} if baseline else {}
        pairs = paired_dice(data, old)
        versus = "<h3>Against the baseline</h3>\n" + baseline_html(vs, pairs)
    else:
        versus = ""
    ci = d.get("ci95")
    ci_txt = (f" (95 % bootstrap interval {_fmt(ci[0])}–{_fmt(ci[1])}: the images resampled; few images, wide "
              "interval)" if ci else "")
    if d["n"]:
        dice_html = f"""<div class=row>{_img(dice_plot(dice_vals), "Dice histogram")}
<p>mean Dice {_fmt(d['mean'])}{ci_txt}, mean IoU {_fmt(d['iou_mean'])} over {d['n']} images with a mask
({d['both_empty']} with mask and prediction both empty, counted as 1);<br>mean Dice {_fmt(d['lesion_mean'])} over
the {d['lesion_n']} images whose mask shows lesion.<br>
Prediction: the probability map resized back to the lung box, ≥ {ev.threshold:g}.</p></div>"""
    else:
        dice_html = ("<p class=note>No lesion masks in this dataset "
                     "(<code>masks/&lt;patient&gt;/&lt;image&gt;.png</code>): Dice not computed.</p>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ctriage evaluation</title><style>{CSS}</style></head><body>
<h1>ctriage evaluation</h1>
<p class=note>{len(ev.images)} images ({pi['excluded']} COVID images with an empty mask excluded from the per-image
counts) · {len(ev.patients)} patients · {html.escape(ev.backend)} ({html.escape(ev.precision)}) on
{html.escape(ev.device)} · {_fmt(data['ms_per_slice'])} ms per slice, {data['total_s']:.1f} s in all ·
ctriage {__version__} · {created}. Triage aid, not for diagnostic use.</p>

<h2>Table 3: per image and per patient</h2>
<div class=row><div>{t3}</div>
<div><b>per image</b>{_confusion(pi, "COVID lesion", "control")}</div>
<div><b>per patient</b>{_confusion(pp, "COVID", "control")}</div></div>
<p class=note>Per image: positives are COVID images with lesion (mask non-empty; every COVID image where there is
no mask), negatives every control image; called positive when the pipeline drew at least one box (probability
≥ {ev.threshold:g}, area &gt; {ev.min_area:g} px at 512²{peak}). Per patient: called positive when the case rule
fired{rule} (indeterminate counts as a negative call).</p>

<h2>ROC and threshold sweep (per image)</h2>
<div class=row>{_img(roc_plot(points, op), "ROC curve")}{_img(threshold_plot(points, ev.threshold),
"sensitivity and specificity over the threshold")}</div>
<p class=note>Per-image score: the highest probability threshold at which the slice still has a connected lesion
component larger than the area rule — so each point is exactly what the pipeline would call at that threshold
(for DICOM slices the boxes also require the component inside the lung region; the dot marks the real calls).
AUC {auc_txt}.</p>

<h2>Dice</h2>
{dice_html}
{versus}

<h2>Patients</h2>
{ptab}

<h2>Deciding slices</h2>
<p class=note>For each patient, the slice with the largest box of the run that fired (a positive) or of the single
focal lesion (a negative naming one), and of each solid nodule or mass named. Red: lesion boxes · blue dashed: lung
box and quadrant cross.</p>
{_gallery([r for r, _ in deciding], max_tilt_deg, "no patient with a run, a focal lesion or a named lesion",
          [c for _, c in deciding])}

<h2>Worst misses (COVID images with lesion: missed, then lowest Dice)</h2>
<p class=note>Red: lesion boxes · blue dashed: lung box and quadrant cross · green: the mask outline.</p>
{_gallery(worst_misses(ev.images, gallery), max_tilt_deg, "no missed COVID image")}

<h2>False alarms (control images with boxes)</h2>
{_gallery(false_alarms(ev.images, gallery), max_tilt_deg, "no control image with a box")}

<h2>Models and runtime</h2>
{btab}
<p>backend <b>{html.escape(ev.backend)}</b>, precision <b>{html.escape(ev.precision)}</b>, device
{html.escape(ev.device)}; lesion threshold {ev.threshold:g}, minimum area {ev.min_area:g} px at 512².</p>
</body></html>
"""


def write_report(ev: Evaluation, out: Path, max_tilt_deg: float = 10.0, gallery: int = GALLERY,
                 data: dict | None = None, baseline: dict | None = None) -> Path:
    """Write out/index.html and out/metrics.json (the same object as `ctriage evaluate --json`; with a baseline,
    its paired Dice comparison too)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = ev.as_dict() if data is None else data
    (out / "metrics.json").write_text(json.dumps(data, indent=1) + "\n")
    page = out / "index.html"
    page.write_text(build_html(ev, data, max_tilt_deg, gallery, baseline))
    return page
