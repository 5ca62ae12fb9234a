"""The case rule, pure: a series is positive when ≥ `min_run` consecutive slices show lesion in the same quadrant
(the rule of Chen et al. 2020) and, with `min_foci` ≥ 2 (the appliance's default), the lesions form at least that many
separate foci.

Consecutive means neighbours in position order with a gap ≤ 1.5 × the series' median spacing: a missing slice
breaks a run. Optionally (`min_run_mm`, on by default in the appliance) the run must also cover a minimum extent
along z, so that 3 slices of 0.6 mm (a 2 mm vessel segment) do not count like 3 slices of 5 mm. Slices without
lung count as negative (they break runs like any slice without lesion).

A *focus* is one lesion followed through the series: boxes on neighbouring slices that overlap (after growing
each by `FOCUS_GROW` of the slice size) belong to the same focus, also across `FOCUS_SKIP` slice(s) where the
model missed the lesion (a tumour marked on slices 13–15 and 17–18 is one focus, not two); a focus counts when
it spans as many slices as a qualifying run. COVID-19 pneumonia is multifocal (bilateral, peripheral patches:
the "typical" pattern of the RSNA consensus), while a lung tumour — with its ground-glass halo the lesion model
cannot tell from COVID ground glass — is one focus on many consecutive slices in one quadrant, which Chen et al.'s
rule alone calls positive. Such a series is negative for COVID-19 with the single focus reported (`focal`) for a
radiologist. With the other-findings stage on (`other_findings`), foci that are the halo of a solid nodule or mass
(appliance.pipeline.solid_lesions) or that wrap a mass-sized soft-tissue core (appliance.pipeline.mass_foci) are
named in `others` and not counted: a lung cancer beside one stray patch is one mass and one focal lesion.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appliance.domain import QUADRANTS, Core, Evidence, SeriesVerdict, SliceFinding
from appliance.geometry import GAP_FACTOR, links, median_spacing
from appliance.pipeline.anatomy import patient_side, quadrant_of, zone_of  # noqa: F401 - quadrant_of: the rule's quadrants
from appliance.pipeline.foci import FOCUS_GROW, FOCUS_SKIP, foci, focus_members, focus_size  # noqa: F401
from appliance.pipeline.grading import DEPENDENT_ADVICE, grade
from appliance.pipeline.mass_foci import explain_masses
from appliance.pipeline.noise import NOISY, acquisition
from appliance.pipeline.solid_lesions import explain_foci

MIN_RUN = 3


@dataclass(frozen=True)
class CaseRule:
    """The case rule's settings, built once (`from_config`) and shared by every caller — the daemon's tracker,
    `analyze`, `evaluate`, `bench` — so they cannot disagree about what "positive" means.

    min_run: consecutive slices with lesion in one quadrant (Chen et al. 2020: 3); min_run_mm: the run's extent
    along z on DICOM series (0: the plain slice count); min_foci: separate lesion foci each spanning such a run;
    min_slices: slices a series needs before it may be called negative; gap_factor: neighbours further apart than
    this × the median spacing break a run.
    """

    min_run: int
    min_run_mm: float
    min_foci: int
    min_slices: int
    gap_factor: float
    other_findings: bool = False  # foci a solid nodule or mass explains do not count (see appliance.pipeline.solid)
    min_peak: float = 0.0  # the most confident counted focus must peak at least this for a positive (0: off)
    noise_limit: float = NOISY  # a series noisier than this is reported as a noisy acquisition (not a result change)

    @classmethod
    def from_config(cls, analysis: Any) -> "CaseRule":
        """From `appliance.config.AnalysisConfig` (the one place the defaults live)."""
        return cls(min_run=int(analysis.min_run), min_run_mm=float(analysis.min_run_mm),
                   min_foci=int(analysis.min_foci), min_slices=int(analysis.min_slices),
                   gap_factor=float(analysis.gap_factor), other_findings=bool(analysis.other_findings),
                   min_peak=float(getattr(analysis, "min_focus_peak", 0.0)),
                   noise_limit=float(getattr(analysis, "noise_limit", NOISY)))

    @classmethod
    def chen2020(cls, min_slices: int = 0) -> "CaseRule":
        """The rule of Chen et al. 2020 alone (3 consecutive slices, same quadrant), for reproducing the paper."""
        return cls(min_run=MIN_RUN, min_run_mm=0.0, min_foci=1, min_slices=min_slices, gap_factor=GAP_FACTOR)

    def but(self, **changes: Any) -> "CaseRule":
        """A copy with some settings changed (e.g. `rule.but(min_slices=1)`)."""
        return dataclasses.replace(self, **changes)

    def for_images(self) -> "CaseRule":
        """For lung-window crop images: they carry no physical spacing, so the extent check is off."""
        return self.but(min_run_mm=0.0)

    def describe(self) -> str:
        """The rule in one phrase (reports)."""
        text = describe_rule(self.min_run, self.min_run_mm, self.min_foci)
        if self.min_peak > 0:
            text += f", one of them peaking at ≥ {self.min_peak:g}"
        return text + ("; foci that are the halo of a solid nodule or mass do not count" if self.other_findings
                       else "")


def longest_runs(findings: Sequence[SliceFinding], gap_factor: float = GAP_FACTOR) -> dict[str, tuple[int, int]]:
    """For each quadrant, the longest run as (first index, length) over findings sorted in series order."""
    link = links([f.position for f in findings], gap_factor)
    best: dict[str, tuple[int, int]] = {}
    for q in QUADRANTS:
        start, length = 0, 0
        for i, f in enumerate(findings):
            if q in f.quadrants:
                if length and link[i - 1]:
                    length += 1
                else:
                    start, length = i, 1
                if length > best.get(q, (0, 0))[1]:
                    best[q] = (start, length)
            else:
                length = 0
    return best


def slices_needed(findings: Sequence[SliceFinding], min_run: int = MIN_RUN, min_run_mm: float = 0.0) -> int:
    """Slices a run (or a focus) must span: ≥ `min_run`, and ≥ `min_run_mm` along z at the median spacing."""
    spacing = median_spacing([f.position for f in findings]) if min_run_mm > 0 else 0.0
    return max(min_run, int(math.ceil(min_run_mm / spacing - 1e-9))) if spacing > 0 else min_run


def describe_rule(min_run: int = MIN_RUN, min_run_mm: float = 0.0, min_foci: int = 1) -> str:
    """The case rule with these settings, in one phrase (for reports)."""
    run = f"{min_run} consecutive slices with lesion in one quadrant (covering ≥ {min_run_mm:g} mm on DICOM)"
    if min_foci <= 1:
        return run
    return f"{run}, and at least {min_foci} separate lesion foci each spanning such a run"


def find_evidence(findings: Sequence[SliceFinding], min_run: int = MIN_RUN,
                  gap_factor: float = GAP_FACTOR, min_run_mm: float = 0.0) -> Evidence | None:
    """The longest qualifying run (ties: the most superior), or None.

    A run qualifies with ≥ `min_run` slices that also cover ≥ `min_run_mm` along z (run × median spacing), so
    that thin-slice series need as much lesion extent as thick ones; 0 disables the extent check.
    """
    runs = longest_runs(findings, gap_factor)
    need = slices_needed(findings, min_run, min_run_mm)
    cands = [(length, -start, q) for q, (start, length) in runs.items() if length >= need]
    if not cands:
        return None
    length, neg_start, q = max(cands)
    start = -neg_start
    return Evidence(quadrant=q, first_slice=start, last_slice=start + length - 1, run=length)  # type: ignore[arg-type]


def focal_extent(findings: Sequence[SliceFinding], focal: Evidence) -> tuple[float | None, float | None, str]:
    """(size, length, zone) of the focal lesion: the largest box side in its quadrant over the run (mm, DICOM
    slices only: their pixel size is known; the lesion model marks the opacity and its halo), its length along z
    (mm, with one spacing), and the zone (third of the lung's z-extent at the run's middle)."""
    run = findings[focal.first_slice:focal.last_slice + 1]
    sides = [max(b.rect.height, b.rect.width) * f.pixel_mm for f in run for b in f.boxes
             if b.quadrant == focal.quadrant and f.pixel_mm]
    spacing = median_spacing([f.position for f in findings]) if len(findings) > 1 else 0.0
    zone = zone_of(run[len(run) // 2].position, [f.position for f in findings if f.lung is not None])
    if not sides or spacing <= 0:
        return None, None, zone
    return max(sides), abs(run[-1].position - run[0].position) + spacing, zone


def focal_note(findings: Sequence[SliceFinding], focal: Evidence, core: Core | None = None) -> str:
    """The single focal lesion for people: size and length (`focal_extent`), the patient's side and zone, the image
    quadrant and 1-based slices. What it is the appliance cannot always tell (a mass with a ground-glass rim and a
    focal pneumonia look alike to the lesion model and in density): it says so. With a halo-wrapped soft-tissue
    `core` (appliance.pipeline.halo_core) it names a solid mass."""
    size_mm, length, zone = focal_extent(findings, focal)
    size = "" if size_mm is None else f" about {size_mm:.0f} mm across and {length:.0f} mm long,"
    side, _, ap = patient_side(focal.quadrant).partition(" ")
    where = (f"{size} patient's {side} {zone} zone, {ap} (image {focal.quadrant}, slices "
             f"{focal.first_slice + 1}–{focal.last_slice + 1})")
    if core is not None:
        return (f"a solid mass,{where}: a soft-tissue core about {core.thick_mm:.0f} mm thick under a ground-glass"
                " halo, not the multifocal pattern of COVID-19 pneumonia — a tumour or a mass-like consolidation,"
                " for a radiologist")
    return (f"a single focal lesion,{where}: not the multifocal pattern of COVID-19 pneumonia"
            " — a mass, a focal pneumonia or another focal process, for a radiologist")


def partial_note(findings: Sequence[SliceFinding], gap_factor: float = GAP_FACTOR) -> str | None:
    """What a series too short to call shows, for people: its longest lesion focus on two or more slices (1-based
    slices, image quadrant of its largest box, the patient's side, its largest box side on DICOM), or None. No zone:
    an excerpt's thirds are not the lung's. An excerpt around a nodule shows part of it; the rest may lie beyond."""
    longest = next((m for m in focus_members(findings, gap_factor) if len({i for i, _ in m}) >= 2), None)
    if longest is None:
        return None
    first, last = longest[0][0], longest[-1][0]
    big = max((findings[i].boxes[j] for i, j in longest), key=lambda b: b.rect.height * b.rect.width)
    size, _ = focus_size(findings, longest)
    side, _, ap = patient_side(big.quadrant).partition(" ")
    across = f", about {size:.0f} mm across" if size else ""
    return (f"lesion seen on slices {first + 1}–{last + 1}{across} (patient's {side}, {ap}, image "
            f"{big.quadrant}): too few slices here to call a pattern — a nodule or a patch that may continue beyond "
            "this series, for a radiologist")


def texture_note(flat: int, kept: int) -> str | None:
    """A positive's grade reason when most of the series' lesion boxes were left out as no denser than the lung
    (appliance.pipeline.opacity): the lung is textured (emphysema, noise) where the model saw lesion, and the boxes
    that remain may be more of the same. None when the boxes left out are fewer than those kept."""
    if flat <= kept:
        return None
    return (f"mostly on normal lung ({flat} of {flat + kept} lesion boxes left out as no denser than the lung:"
            " emphysema or noise texture — read with care)")


def decide(findings: Sequence[SliceFinding], rule: CaseRule, *, final: bool = True) -> SeriesVerdict:
    """Verdict for findings sorted in series order, under `rule`.

    positive: a run fired and the lesions form ≥ `min_foci` foci that each span a qualifying run (foci a solid
    lesion or a mass explains left out), one of them peaking at ≥ `min_peak`. A run with fewer foci: negative, the run reported as `focal` with a reason
    (a focal lesion for a radiologist, not the COVID-19 pattern; a mass, when one was left out, is `focal` and named
    first). negative: no run, at least `min_slices` slices and some lung seen. Otherwise indeterminate, with the
    reason. A verdict before the series is complete is `provisional`.
    """
    min_run, min_slices, gap_factor = rule.min_run, rule.min_slices, rule.gap_factor
    min_run_mm, min_foci = rule.min_run_mm, rule.min_foci
    need = slices_needed(findings, min_run, min_run_mm)
    counted, solids = explain_foci(findings, gap_factor) if rule.other_findings else (list(findings), [])
    counted, mass_foci = explain_masses(counted, need, gap_factor) if rule.other_findings else (counted, [])
    ev = find_evidence(counted, min_run, gap_factor, min_run_mm)
    spanning = [m for m in focus_members(counted, gap_factor) if m[-1][0] - m[0][0] + 1 >= need]
    n_foci = len(spanning)
    peak = max((counted[i].boxes[j].score for m in spanning for i, j in m), default=0.0)
    focal, faint = None, None
    if ev is not None and n_foci < min_foci:
        focal, ev = ev, None
    elif ev is not None and peak < rule.min_peak:  # only faint foci: strays on vessels or noise, not a pattern
        faint, ev = (f"{n_foci} lesion foci, all faint (the most confident peaks at {peak:.2f}, below "
                     f"{rule.min_peak:g}): not a confident COVID-19 pattern — for a radiologist"), None
    n = len(findings)
    lung = sum(1 for f in findings if f.lung is not None)
    lesion = sum(1 for f in findings if f.has_lesion)
    gaps = int((~links([f.position for f in findings], gap_factor)).sum()) if n > 1 else 0
    reason = None
    if ev is not None:
        result = "positive"
    elif n < min_slices:
        result, reason = "indeterminate", f"only {n} slice(s), fewer than the {min_slices} needed for a negative"
    elif lung == 0:
        result, reason = "indeterminate", "no lung found on any slice (not a chest series?)"
    else:
        result = "negative"
    notes = [focal_note(findings, mf.run, mf.core) for mf in mass_foci] if result != "positive" else []
    if focal is not None:
        notes.append(focal_note(findings, focal))
    if faint is not None:
        notes.append(faint)
    if notes:
        reason = "; ".join([reason, *notes] if reason else notes)
    if mass_foci and result != "positive":  # the mass is the finding a negative names first
        focal = mass_foci[0].run
    masses = [mf.mass for mf in mass_foci]
    named = sorted(solids + masses, key=lambda s: (-s.diameter_mm, s.first_slice))
    if solids and result != "positive":
        note = "lesion seen around " + "; ".join(s.describe() for s in solids)
        reason = f"{reason}; {note}" if reason else note
    if result == "indeterminate" and focal is None and not named and (note := partial_note(counted, gap_factor)):
        reason = f"{reason}; {note}"
    graded = None
    if (ev is not None or focal is not None or named) and any(f.measures is not None for f in findings):
        # a nodule or mass shapes the pattern when it is the finding (no focus left) or a mass; an incidental small
        # one beside many foci is named (others) but does not make the pattern atypical
        shaping = named if n_foci == 0 or any(s.kind == "mass" for s in named) else []
        graded = grade([f.measures for f in findings], n_foci, [f.position for f in findings], shaping).to_dict()
    flat = sum(f.flat_boxes for f in findings)
    acq = acquisition([f.noise for f in findings], sum(1 for f in findings if f.smoothed > 0), rule.noise_limit,
                      flat)
    note = texture_note(flat, sum(len(f.boxes) for f in findings)) if result == "positive" else None
    if graded is not None and note:  # a caution leads: the tile's reason line is cut at its width
        graded = {**graded, "reasons": [note, *graded.get("reasons", [])]}
    positions = Counter(f.patient_position for f in findings if f.patient_position)
    return SeriesVerdict(result=result, state="final" if final else "provisional", evidence=ev, slices=n,
                         lung_slices=lung, lesion_slices=lesion, reason=reason, gaps=gaps, focal=focal,
                         foci=n_foci, others=[s.to_dict() for s in named], grade=graded, acquisition=acq,
                         patient_position=positions.most_common(1)[0][0] if positions else "")


# -- the study verdict over its series -----------------------------------------------------------------------------
@dataclass
class SeriesSummary:
    """What the study verdict needs to know about one series."""

    series_key: str
    verdict: SeriesVerdict
    description: str = ""
    updated: float = 0.0

    def as_dict(self) -> dict:
        return {"series_key": self.series_key, "result": self.verdict.result, "state": self.verdict.state,
                "slices": self.verdict.slices, "description": self.description}


RESULT_RANK = {"positive": 2, "negative": 1, "indeterminate": 0}
PRONE_CLEAR = "prone images: no lesion run (the posterior finding may be dependent density — for a radiologist)"
PRONE_PERSISTS = "prone images: lesion persists"
PRONE_NOTES = (PRONE_CLEAR, PRONE_PERSISTS)


def prone(position: str) -> bool:
    """Whether a DICOM PatientPosition is prone (HFP, FFP, and the rarer LFP / RFP ...: it ends in P)."""
    return position.endswith("P")


def prone_note(series: Sequence["SeriesSummary"]) -> str | None:
    """What a study's prone series say when one of its supine positives carries the prone-images advice
    (appliance.pipeline.grading: a mild, mostly posterior pattern, which dependent density on a supine scan looks
    like): `PRONE_PERSISTS` when a prone series shows a lesion run too (positive, or one focal lesion), `PRONE_CLEAR`
    when no prone series that saw lung does (a short, limited prone series counts); None without such a positive
    or without such a series. Information for the reader, never a change of result: the flag stays (a prone
    series may also miss a faint lesion)."""
    advised = any(s.verdict.result == "positive" and not prone(s.verdict.patient_position)
                  and any(DEPENDENT_ADVICE in r for r in (s.verdict.grade or {}).get("reasons") or [])
                  for s in series)
    looked = [s.verdict for s in series if prone(s.verdict.patient_position) and s.verdict.lung_slices > 0]
    if not advised or not looked:
        return None
    return PRONE_PERSISTS if any(v.evidence is not None or v.focal is not None for v in looked) else PRONE_CLEAR


NOISY_ONLY = "only the noisy series is positive"


def noise_note(series: Sequence["SeriesSummary"]) -> str | None:
    """A caution when a study is positive only on series the noise check marked noisy (a sharp lung kernel, a thin
    reconstruction, low dose: the lesion model reads strong noise as ground glass) while a smoother supine series of
    the same study, one that saw enough lung to be called, is negative — a site that exports both the lung-kernel
    and the soft-tissue series of one scan. None otherwise. Information for the reader, never a change of result:
    the thin noisy series may also show a faint lesion the smoother one blurs away."""
    positives = [s.verdict for s in series if s.verdict.result == "positive"]
    if not positives or not all((v.acquisition or {}).get("noisy") for v in positives):
        return None
    quiet = [float(a["noise"]) for s in series
             if s.verdict.result == "negative" and (a := s.verdict.acquisition) and not a.get("noisy")
             and isinstance(a.get("noise"), (int, float)) and not prone(s.verdict.patient_position)]
    if not quiet:  # (a stored verdict without a measured figure is no reference)
        return None
    calm = min(quiet)
    # the detail in brackets (the tile shows the words before); the noisy series' own figure is in its noisy-scan note
    return (f"{NOISY_ONLY} (the study's smoother series, noise {calm:.3f}, is negative: the boxes may be noise — "
            "read with care)")


def reader_notes(grade: dict | None) -> list[str]:
    """The notes a study's other series add to a positive's grade (`prone_note`, `noise_note`)."""
    return [r for r in (grade or {}).get("reasons") or [] if r in PRONE_NOTES or r.startswith(NOISY_ONLY)]


def note_kind(note: str) -> str:
    """A reader note without its figures: the noise note's figure may move as series arrive, its news does not."""
    return NOISY_ONLY if note.startswith(NOISY_ONLY) else note


def study_verdict(series: Sequence[SeriesSummary]) -> tuple[SeriesVerdict, SeriesSummary]:
    """(study verdict, lead series): what the appliance publishes and `evaluate` counts per patient.

    Positive when any series is; negative when none is and at least one is negative; else indeterminate. Final
    when every series is final. A positive whose grade advises prone images also says what the study's prone
    series show (`prone_note`), as one more reason of its grade; one positive only on noisy series beside a smoother
    negative series of the study says so first (`noise_note`). The lead series (whose evidence, counts and key
    are reported) is the positive one with the longest run; for a negative, the one naming the longest single
    focal lesion, else the most recently updated one with the study's result."""
    if not series:
        raise ValueError("a study verdict needs at least one series")
    result = max((s.verdict.result for s in series), key=RESULT_RANK.__getitem__)
    state = "final" if all(s.verdict.state == "final" for s in series) else "provisional"
    same = [s for s in series if s.verdict.result == result]
    if result == "positive":
        lead = max(same, key=lambda s: (s.verdict.evidence.run if s.verdict.evidence else 0, s.updated))
    else:
        lead = max(same, key=lambda s: (s.verdict.focal.run if s.verdict.focal else 0, s.updated))
    lv = lead.verdict
    graded = lv.grade
    if graded and result == "positive" and (note := prone_note(series)):
        graded = {**graded, "reasons": [*graded.get("reasons", []), note]}
    if graded and result == "positive" and (note := noise_note(series)):  # a caution leads (the tile cuts the line)
        graded = {**graded, "reasons": [note, *graded.get("reasons", [])]}
    v = SeriesVerdict(result=result, state=state, evidence=lv.evidence, slices=lv.slices,  # type: ignore[arg-type]
                      lung_slices=lv.lung_slices, lesion_slices=lv.lesion_slices, reason=lv.reason, gaps=lv.gaps,
                      focal=lv.focal, foci=lv.foci, others=lv.others, grade=graded, acquisition=lv.acquisition,
                      patient_position=lv.patient_position)
    return v, lead
