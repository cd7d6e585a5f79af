from __future__ import annotations

import pytest
import torch

from tuneforge.engine.engine import Engine
from tuneforge.engine.models import ModelRegistry
from tuneforge.settings import Limits


@pytest.fixture(scope="session")
def registry(models_dir) -> ModelRegistry:
    return ModelRegistry(models_dir, torch.device("cpu"))


@pytest.fixture()
def engine(registry) -> Engine:
    return Engine(registry, Limits())
