"""Building the Analyzer a configuration asks for: bundles from [analysis] bundle_dir, else those the fleet updater
installed (when complete), else the shipped ones. Used by the commands and the daemon; it sits above the fleet
state it reads, so the pipeline below needs no knowledge of fleets."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.config import Config
    from appliance.pipeline.analyzer import Analyzer


def make_analyzer(cfg: Config, backend: str | None = None) -> Analyzer:
    """An Analyzer loaded as cfg.analysis says; `backend` overrides its runtime."""
    from appliance.pipeline.analyzer import Analyzer

    a = cfg.analysis
    if backend:
        a = replace(a, backend=backend)
    bundle_dir = a.bundle_dir or _state_bundles(cfg)
    return Analyzer.load(a, Path(bundle_dir) if bundle_dir else None)


def _state_bundles(cfg: Config) -> str:
    """Bundles installed by the fleet updater take precedence over the shipped ones when active/ is complete."""
    from appliance.fleet.bundle_store import active_bundle_dir

    active = active_bundle_dir(cfg.state_path)
    return str(active) if active else ""
