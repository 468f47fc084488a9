"""Shared test fixtures. Area fixtures live in fixtures_*.py and are re-exported here.

Real sample material sits in ../shared/samples (beside the repo). In CI (CI=true) a test that
needs it fails when it is missing; elsewhere it skips with a reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("DWM_SAMPLES", REPO.parent / "shared" / "samples"))


def sample_path(name: str) -> Path:
    p = SAMPLES / name
    if not p.exists():
        msg = f"sample {p} is missing (tests read real material from ../shared/samples)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return p


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    sample_path("dance_music.mp4")
    return SAMPLES


@pytest.fixture(scope="session")
def dance_video() -> Path:
    return sample_path("dance_music.mp4")


@pytest.fixture(scope="session")
def dance_face() -> Path:
    return sample_path("dance_face.png")


@pytest.fixture(scope="session")
def taesd_dir() -> Path:
    return sample_path("weights/taesd")


@pytest.fixture(scope="session")
def music_ogg() -> Path:
    return sample_path("music/vibe_ace.ogg")


from fixtures_models import *  # noqa: E402,F401,F403
from fixtures_data import *  # noqa: E402,F401,F403
from fixtures_launch import *  # noqa: E402,F401,F403
from fixtures_known_answer import *  # noqa: E402,F401,F403
