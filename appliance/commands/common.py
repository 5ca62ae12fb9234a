"""Helpers shared by subcommands: config loading, analyzer construction, progress bars, tables."""
from __future__ import annotations

import argparse
import sys

from appliance import config as config_mod
from appliance.config import Config
from appliance.service.analyzer_factory import make_analyzer  # noqa: F401 - the commands import it from here


def add_config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration (default: built-in defaults or $CTRIAGE_CONFIG)")


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["auto", "openvino", "onnxruntime"], help="inference runtime (default: config, auto)")
    p.add_argument("--precision", choices=["int8", "fp32"], help="model precision (default: config, int8)")
    p.add_argument("--bundles", metavar="DIR", help="directory holding the model bundles (default: the shipped ones)")
    p.add_argument("--threads", type=int, help="inference threads (default: all cores)")
    p.add_argument("--workers", type=int, help="batches analysed at once, each on its own inference stream "
                                                "(default: config; 0 = 2 with 2+ threads)")


def load_config(args: argparse.Namespace) -> Config:
    cfg = config_mod.load(getattr(args, "config", None))
    if getattr(args, "backend", None):
        cfg.analysis.backend = args.backend
    if getattr(args, "precision", None):
        cfg.analysis.precision = args.precision
    if getattr(args, "bundles", None):
        cfg.analysis.bundle_dir = args.bundles
    if getattr(args, "threads", None):
        cfg.analysis.threads = args.threads
    if getattr(args, "workers", None) is not None:
        cfg.analysis.workers = args.workers
        cfg.analysis.validate("command line")  # says which value is out of range
    if getattr(args, "state_dir", None):
        cfg.state_dir = args.state_dir
    return cfg


def progress_bar(total: int | None, desc: str, enabled: bool | None = None):
    """A tqdm bar on stderr when it is a terminal (or when forced); a no-op object otherwise."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        class _Null:
            def update(self, n: int = 1) -> None: ...
            def close(self) -> None: ...
            total = None

        return _Null()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="slice", file=sys.stderr, leave=False, dynamic_ncols=True)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
