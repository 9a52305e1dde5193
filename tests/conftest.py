"""Shared fixtures: small generated scenes, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """Real data beside the repository (override with DEEPDEM_DATA)."""
    return Path(os.environ.get("DEEPDEM_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from deepdem.synth import synth_scene

    out = tmp_path_factory.mktemp("synth") / "raw"
    synth_scene(out, seed=3, size=192)
    return out


@pytest.fixture(scope="session")
def prepared_scene(synth_dir, tmp_path_factory):
    from deepdem.prepare import prepare_from_asp_dir

    return prepare_from_asp_dir(synth_dir, tmp_path_factory.mktemp("scene") / "scene")
