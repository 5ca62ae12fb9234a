/* CT triage screen: the viral-pneumonia-pattern grade and the solid nodules or masses of a verdict, on a tile.
   The grade is of a *pattern* that other viral and some bacterial pneumonias share: a positive reads "COVID-19
   pattern — isolate pending PCR", never "confirmed". The zone figure is 2 × 3 cells, patient's right on the image's
   left (as on the quadrant icon), rows upper / middle / lower, shaded by % of that zone involved.
   Used by app.js (loaded before it); payload values are only ever set as text. */
"use strict";
window.CTriageGrade = (() => {
  const PATTERN = "COVID-19 pattern — isolate pending PCR";
  const RADIOLOGIST = "radiologist to read";

  const pct = (x) => (typeof x === "number" ? (Math.round(x * 10) / 10).toLocaleString("en") + " %" : "–");

  /* The zone's fill: none at 0 %, then magenta growing lighter with more involved (square root: a few % already
     shows; 100 % is near white). Continuous, so a zone with more involved is never drawn darker than one with less. */
  function shade(p) {
    if (typeof p !== "number" || p <= 0) return "";
    const light = 30 + 58 * Math.sqrt(Math.min(p, 100) / 100);
    return "hsl(325, 90%, " + light.toFixed(1) + "%)";
  }

  /* Whether a tile shows the grade: a positive with a grade (negatives and the rest keep their own look). */
  function graded(s) {
    return s.flag === "positive" && !!s.grade;
  }

  function severityText(g) {
    return g.severity === null || g.severity === undefined ? "" : "severity " + g.severity + "/25";
  }

  function categoryText(g) {
    return g.category === "atypical" ? "atypical pattern — " + RADIOLOGIST : g.words;
  }

  function reasonsText(g, whole) {
    const r = whole ? g.reasons : g.short;
    return r.length ? r.join(", ") : "no reasons given";
  }

  function zonesTitle(g) {
    return "% involved — " + g.zones.map((z) => "patient's " + z.side + " " + z.level + " " + pct(z.pct)).join(", ");
  }

  /* The extent beside the key image (zone figure, severity) and the category with its reasons under the body. */
  function renderGrade(el, s) {
    const g = graded(s) ? s.grade : null;
    el.classList.toggle("graded", !!g);
    el.classList.toggle("grade-atypical", !!g && g.category === "atypical");
    const row = el.querySelector(".grade"), ext = el.querySelector(".extent");
    row.classList.toggle("hidden", !g);
    ext.classList.toggle("hidden", !g);
    row.dataset.category = g ? g.category : "";
    setText(row.querySelector(".grade-cat"), g ? categoryText(g) : "");
    setText(row.querySelector(".grade-why"), g ? reasonsText(g, false) : "");
    row.title = g ? categoryText(g) + ": " + reasonsText(g, true) : "";
    setText(ext.querySelector(".sev-num"), g && g.severity !== null ? g.severity + "/25" : "–");
    ext.title = g ? [severityText(g), zonesTitle(g)].filter(Boolean).join(" · ") : "";
    const byName = new Map((g ? g.zones : []).map((z) => [z.side + " " + z.level, z.pct]));
    for (const cell of ext.querySelectorAll(".z")) {
      const p = byName.get(cell.dataset.zone);
      cell.dataset.pct = typeof p === "number" ? String(p) : "";
      cell.style.backgroundColor = shade(p);
      cell.classList.toggle("on", typeof p === "number" && p > 0);
    }
  }

  function setText(e, text) {
    if (e.textContent !== text) e.textContent = text;
  }

  function othersText(s) {
    const o = s.others || [];
    return o.length ? "⚠ " + o[0].text : "";
  }

  function renderOthers(el, s) {
    const row = el.querySelector(".others"), o = s.others || [];
    el.classList.toggle("has-others", o.length > 0);
    row.classList.toggle("hidden", !o.length);
    const text = othersText(s), more = o.length > 1 ? "+" + (o.length - 1) + " more" : "";
    const m = row.querySelector(".others-more");
    setText(row.querySelector(".others-text"), text);
    setText(m, more);
    m.classList.toggle("hidden", !more);
    row.title = o.map((x) => x.text).join("\n");
    row.setAttribute("aria-label", o.length ? text + (more ? ", " + more : "") + " (tap for the full list)" : "");
  }

  /* The flag's action line, the facts' detail line and the empty key image's words, where grade or solid lesions
     change them; null: the tile's usual words. */
  function action(s) {
    if (graded(s)) return PATTERN;
    if (s.flag === "negative" && (s.others || []).length) return RADIOLOGIST;
    return null;
  }

  function detail(s) {
    if (graded(s)) {
      const total = s.grade.extent && s.grade.extent.total;
      return typeof total === "number" ? pct(total) + " of lung" : null;
    }
    const o = s.others || [];
    if (s.flag === "negative" && o.length && !s.focal) {
      return "lesion explained by a solid " + (o.some((x) => x.kind === "mass") ? "mass" : "nodule");
    }
    return null;
  }

  /* The tile's full detail (on tap): the grade whole with the extent, every solid lesion, what the pattern is.
     [class, text] pairs, most important first. */
  function infoLines(s) {
    const lines = [];
    const g = graded(s) ? s.grade : null;
    if (g) {
      const ext = g.extent || {};
      const share = typeof ext.total === "number"
        ? pct(ext.total) + " of lung (right " + pct(ext.right) + ", left " + pct(ext.left) + ")" : "";
      const head = [g.words.charAt(0).toUpperCase() + g.words.slice(1), severityText(g), share].filter(Boolean);
      lines.push(["grade", head.join(" · ") + ": " + reasonsText(g, true)]);
    }
    for (const x of s.others || []) {
      const slices = x.where ? x.where.replace(/^.*, (slices? )/, "$1") : "";
      lines.push(["others", "Not counted: " + x.text + (slices ? " (" + slices + ")" : "")]);
    }
    if (s.acquisition) lines.push(["acquisition", s.acquisition.text]);
    if (g) lines.push(["note", "Other viral and some bacterial pneumonias look alike."]);
    return lines;
  }

  return { graded, renderGrade, renderOthers, action, detail, infoLines, shade };
})();
