"""Domain objects of the data path: plain dataclasses, no I/O.

SliceImage (one decoded axial slice in display orientation) → SliceFinding (lung box, lesion boxes) →
SeriesVerdict (the case rule applied to a series' findings).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

Quadrant = Literal["upper-left", "upper-right", "lower-left", "lower-right"]
QUADRANTS: tuple[Quadrant, ...] = ("upper-left", "upper-right", "lower-left", "lower-right")
Result = Literal["positive", "negative", "indeterminate"]
State = Literal["provisional", "final"]


@dataclass(frozen=True)
class Rect:
    """Axis-aligned rectangle in pixel coordinates: rows y0..y1, columns x0..x1 (end exclusive)."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def center(self) -> tuple[float, float]:
        return (self.y0 + self.y1) / 2.0, (self.x0 + self.x1) / 2.0

    def as_list(self) -> list[int]:
        return [self.y0, self.x0, self.y1, self.x1]


@dataclass
class SliceImage:
    """One axial slice: HU in radiological display orientation (anterior up, patient right on image left).

    For lung-window crop images (no HU), `hu` is None and `window01` holds the [0, 1] crop; the lung box is then
    the whole image.
    """

    key: str  # file path or SOPInstanceUID: unique within the run
    series_uid: str
    study_uid: str
    position: float  # mm along the slice normal (or the natural order index for images)
    hu: np.ndarray | None = None
    window01: np.ndarray | None = None
    pixel_spacing: tuple[float, float] = (1.0, 1.0)
    thickness: float | None = None
    instance: int | None = None
    sop_uid: str | None = None
    series_description: str = ""
    manufacturer: str = ""
    transfer_syntax: str = ""
    expected_count: int | None = None  # from ImagesInAcquisition / NumberOfSlices when present
    patient_position: str = ""  # DICOM PatientPosition: HFS (head first, supine), HFP (prone), …; "" unknown
    # the parsed header of a header-only read, kept until its pixels are decoded (so the file is parsed once)
    source: object | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        a = self.hu if self.hu is not None else self.window01
        assert a is not None
        return a.shape  # type: ignore[return-value]


@dataclass(frozen=True)
class Box:
    """A lesion component: rectangle in slice pixels, area at 512² scale, score (max probability), quadrant."""

    rect: Rect
    area_512: float
    score: float
    quadrant: Quadrant

    def normalised(self, shape: tuple[int, int]) -> list[float]:
        """[y0, x0, y1, x1] in [0, 1] of the slice."""
        h, w = shape
        r = self.rect
        return [round(r.y0 / h, 4), round(r.x0 / w, 4), round(r.y1 / h, 4), round(r.x1 / w, 4)]


@dataclass(frozen=True)
class Solid:
    """A soft-tissue component in the lung envelope on one slice (appliance.pipeline.solid): rect in slice pixels;
    `pixel_mm` the slice's in-plane pixel size."""

    rect: Rect
    area_mm2: float
    diameter_mm: float  # largest in-plane extent (Feret diameter over 4 directions)
    mean_hu: float
    attached: bool  # connected to the soft tissue of the chest wall or mediastinum
    pixel_mm: float = 1.0
    rim_air: float = 0.0  # share of aerated lung in the `RIM_MM` around it (a vessel in aerated lung: high)

    def to_dict(self) -> dict[str, Any]:
        """Compact and JSON-safe: {"r": [y0, x0, y1, x1], "a": mm², "d": mm, "hu", "att": 0|1, "mm", "air"}."""
        return {"r": self.rect.as_list(), "a": round(self.area_mm2, 1), "d": round(self.diameter_mm, 1),
                "hu": round(self.mean_hu), "att": int(self.attached), "mm": round(self.pixel_mm, 4),
                "air": round(self.rim_air, 2)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Solid":
        return cls(Rect(*d["r"]), float(d["a"]), float(d["d"]), float(d["hu"]), bool(d["att"]),
                   float(d.get("mm", 1.0)), float(d.get("air", 0.0)))


@dataclass(frozen=True)
class Core:
    """Soft tissue a lesion's halo wraps on one slice (appliance.pipeline.halo_core): the unmarked core of a lesion
    the model rings, such as a mass broad-based on the chest wall. rect in slice pixels."""

    rect: Rect
    area_mm2: float
    thick_mm: float  # largest inscribed diameter
    mean_hu: float

    def to_dict(self) -> dict[str, Any]:
        """Compact and JSON-safe: {"r": [y0, x0, y1, x1], "a": mm², "t": mm, "hu"}."""
        return {"r": self.rect.as_list(), "a": round(self.area_mm2, 1), "t": round(self.thick_mm, 1),
                "hu": round(self.mean_hu)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Core":
        return cls(Rect(*d["r"]), float(d["a"]), float(d["t"]), float(d["hu"]))


@dataclass
class SliceMeasures:
    """Lung and lesion pixel counts on one slice for the grade (appliance.pipeline.grading; display orientation; sides are the patient's: right = image left). Counts are
    at the measuring scale: one pixel is `pixel_mm2` mm²."""

    pixel_mm2: float
    lung_right: int = 0
    lung_left: int = 0
    lesion_right: int = 0
    lesion_left: int = 0
    ggo: int = 0  # lesion pixels of ground-glass density
    consolidation: int = 0  # lesion pixels of consolidation density
    peripheral: int = 0  # lesion pixels in the outer third
    central: int = 0
    posterior: int = 0  # lesion pixels in the posterior (dependent, supine) third of their side's lung

    @property
    def lung(self) -> int:
        return self.lung_right + self.lung_left

    @property
    def lesion(self) -> int:
        return self.lesion_right + self.lesion_left

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pixel_mm2"] = round(self.pixel_mm2, 4)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SliceMeasures":
        return cls(float(d["pixel_mm2"]), *(int(d.get(k, 0)) for k in (
            "lung_right", "lung_left", "lesion_right", "lesion_left", "ggo", "consolidation", "peripheral",
            "central", "posterior")))


@dataclass
class SliceFinding:
    """What the pipeline found on one slice."""

    key: str
    position: float
    shape: tuple[int, int]
    lung: Rect | None  # None: no lung on this slice (skipped, counts as negative)
    boxes: list[Box] = field(default_factory=list)
    max_prob: float = 0.0
    lesion_fraction: float = 0.0  # lesion pixels / lung-box pixels
    timings_ms: dict[str, float] = field(default_factory=dict)
    prob: np.ndarray | None = None  # lesion probability map at model scale over `crop` (kept only on request)
    crop: Rect | None = None  # the region the lesion model saw: the lung box, grown to a minimum size (None: = lung)
    solids: list[Solid] = field(default_factory=list)  # soft-tissue components in the lung envelope (HU slices)
    cores: list[Core] = field(default_factory=list)  # soft tissue the lesion halos wrap (HU slices)
    measures: SliceMeasures | None = None  # lung and lesion pixel counts for the grade (HU slices)
    noise: float | None = None  # noise at the lesion model's input (appliance.pipeline.noise; HU slices)
    smoothed: float = 0.0  # Gaussian sigma applied to the crop before the lesion model (0: none)
    flat_boxes: int = 0  # lesion boxes dropped as no denser than the aerated lung (appliance.pipeline.opacity)
    pixel_mm: float | None = None  # in-plane pixel size (mm) of a DICOM slice; None for crop images
    patient_position: str = ""  # the slice's DICOM PatientPosition (prone: ends in P); "" unknown or an image

    @property
    def prob_rect(self) -> Rect | None:
        """Where `prob` lies in the slice."""
        return self.crop or self.lung

    @property
    def has_lesion(self) -> bool:
        return bool(self.boxes)

    @property
    def quadrants(self) -> set[Quadrant]:
        return {b.quadrant for b in self.boxes}


@dataclass(frozen=True)
class Evidence:
    """The run that made a series positive: slice indices are 0-based positions in the sorted series."""

    quadrant: Quadrant
    first_slice: int
    last_slice: int
    run: int

    def as_dict(self) -> dict:
        return {"quadrant": self.quadrant, "first_slice": self.first_slice, "last_slice": self.last_slice,
                "run": self.run}


@dataclass
class SeriesVerdict:
    result: Result
    state: State
    evidence: Evidence | None
    slices: int
    lung_slices: int
    lesion_slices: int
    reason: str | None = None  # why indeterminate, if it is; or the note on a negative with a focal lesion
    gaps: int = 0  # breaks in the slice sequence (missing slices)
    focal: Evidence | None = None  # a negative's single-focus run (Chen et al.'s rule fired on one lesion focus)
    foci: int = 0  # lesion foci that each span a qualifying run (those a solid lesion explains left out)
    others: list[dict] = field(default_factory=list)  # solid nodules/masses that explained lesion foci (to_dict)
    grade: dict | None = None  # the viral-pneumonia-pattern grade of a positive (appliance.pipeline.grading)
    acquisition: dict | None = None  # the series' image noise, and whether it is outside the validated range
    patient_position: str = ""  # the series' DICOM PatientPosition (most slices'); "" unknown
