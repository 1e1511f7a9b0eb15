"""Shared fixtures: the real data folder beside the repository, seeded RNGs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    return Path(os.environ.get("STPREDICT_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``../shared/data`` (or ``$STPREDICT_DATA_DIR``); tests that need it skip where it is absent."""
    path = _data_dir()
    if not path.is_dir():
        pytest.skip(f"real test data not found at {path}; set STPREDICT_DATA_DIR")
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
