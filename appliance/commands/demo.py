"""Generate a sample study — a SYNTHETIC chest phantom written as DICOM, not a patient — and analyse it with the
shipped models, printing the verdict table.

The phantom is made of ellipses (body, lungs, heart, spine), random vessels and, in the first series, patchy
ground-glass opacities in one quadrant over consecutive slices; the second series has clear lungs.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from appliance.commands.common import add_backend_arguments, add_config_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", help="where to write the synthetic study (default: a temporary folder)")
    p.add_argument("--slices", type=int, default=60, help="slices per series (default 60)")
    p.add_argument("--overlays", metavar="DIR", help="also write overlay PNGs here")
    add_backend_arguments(p)
    add_config_argument(p)


def write_sample_study(out: Path, slices: int = 60) -> Path:
    """Two synthetic series of one study: with lesions in one quadrant, and with clear lungs."""
    from pydicom.uid import generate_uid

    from appliance.phantom import PhantomSpec, write_phantom

    study = generate_uid()
    write_phantom(out / "series1-lesion", PhantomSpec(slices=slices, lesion=True, seed=7), study_uid=study, series_number=1)
    write_phantom(out / "series2-clear", PhantomSpec(slices=slices, lesion=False, seed=8), study_uid=study, series_number=2)
    return out


def run(args: argparse.Namespace) -> int:
    from appliance.commands import analyze as analyze_cmd

    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ctriage-demo-"))
    print(f"Writing a SYNTHETIC chest CT phantom study (not a patient) to {base} …")
    write_sample_study(base, args.slices)
    ns = argparse.Namespace(path=str(base), json=False, overlays=args.overlays, progress=None,
                            backend=args.backend, precision=args.precision, bundles=args.bundles,
                            threads=args.threads, config=args.config)
    return analyze_cmd.run(ns)
