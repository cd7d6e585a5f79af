"""Test-wide settings: offline, one torch thread per process, a shared model cache."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Built-in and converted models, cached across test runs (rebuilt on a clean clone)."""
    path = Path(os.environ.get("TUNEFORGE_TEST_MODELS_DIR", REPO / ".cache" / "test-models"))
    path.mkdir(parents=True, exist_ok=True)
    return path
