"""`ctriage demo`'s CT console: two SYNTHETIC phantom studies written once, then exported into the watch folder
slice by slice the way a console does (a temporary dot-name, then a rename; a short pause between slices)."""
from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class DemoStudy:
    """One synthetic study to export: where its files are and what it was built to show."""

    number: int
    name: str  # folder name in the export
    label: str  # what the phantom has, for the technician
    expected: str  # the verdict the phantom was built for
    files: list[Path]
    study_key: str = ""


def write_sample_studies(out: Path, slices: int = 60) -> list[DemoStudy]:
    """Two SYNTHETIC studies (one series each, so the display shows two tiles): two lesion foci (one per lung) over
    consecutive slices, and clear lungs."""
    from appliance.phantom import PhantomSpec, write_phantom

    specs = [(1, "study1-lesions", "lesions in both lungs", "positive",
              PhantomSpec(slices=slices, lesion=True, seed=7)),
             (2, "study2-clear", "clear lungs", "negative", PhantomSpec(slices=slices, lesion=False, seed=8))]
    return [DemoStudy(n, name, label, expected, write_phantom(out / name, spec, series_number=1))
            for n, name, label, expected, spec in specs]


def export_slice(src: Path, dest_dir: Path) -> Path:
    """Copy one slice the way a console exports: a temporary dot-name (ignored by the watch folder), then rename."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest_dir / f".{src.name}.part"
    shutil.copyfile(src, tmp)
    final = dest_dir / src.name
    os.replace(tmp, final)
    return final


def export_studies(studies: list[DemoStudy], export: Path, slices: int, pause: float, stop: threading.Event,
                   say: Callable[[str], None]) -> None:
    """Export every study into export/<study name>/, saying how far it got; returns early once stop is set."""
    every = max(1, round(slices / 6))
    for s in studies:
        if stop.is_set():
            break
        say(f"CT console: exporting study {s.number} of 2 (SYNTHETIC, {s.label}), {slices} slices, "
            f"{pause:g} s apart")
        for i, f in enumerate(s.files, 1):
            if stop.is_set():
                break
            export_slice(f, export / s.name)
            if i == 1 or i % every == 0 or i == len(s.files):
                say(f"  slice {i}/{len(s.files)} exported")
            if pause and stop.wait(pause):
                break
