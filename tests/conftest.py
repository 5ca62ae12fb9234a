"""Shared fixtures: the real data folder (skip with a reason when absent), generated series, the analyzer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CTRIAGE_DATA", ROOT.parent / "shared" / "data"))


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test (printing why) when it is not there."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        reason = f"real data not available: {p} is absent (set CTRIAGE_DATA to the shared data folder)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return p


@pytest.fixture(scope="session")
def analyzer():
    from appliance.config import AnalysisConfig
    from appliance.pipeline.analyzer import Analyzer

    return Analyzer.load(AnalysisConfig(backend="auto"))


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from appliance.phantom import PhantomSpec, write_phantom

    d = tmp_path_factory.mktemp("phantom")
    write_phantom(d, PhantomSpec(slices=24))
    return d


@pytest.fixture
def mosquitto(tmp_path):
    """A fresh mosquitto on a free port (anonymous, loopback), stopped after the test."""
    from .broker import Mosquitto

    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def validators():
    """The triage display's payload validators over the shipped schemas."""
    from appliance.display.screen_state import Validators

    return Validators()


@pytest.fixture
def st(validators):
    """A fresh triage display state."""
    from appliance.display.screen_state import DisplayState

    return DisplayState(validators=validators)
