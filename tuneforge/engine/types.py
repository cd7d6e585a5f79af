"""The engine's own request and result types (wire formats are converted in server/wire.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Datum:
    """One training example: `tokens[i]` is scored against `inputs['target_tokens'][i]`."""

    tokens: np.ndarray  # int64 [N]
    inputs: dict[str, np.ndarray]  # target_tokens int64 [N] or [N, K]; float32 tensors alike


@dataclass
class ForwardBackwardInput:
    data: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, float | str] = field(default_factory=dict)
    forward_only: bool = False


@dataclass
class ForwardBackwardResult:
    outputs: list[dict[str, np.ndarray]]  # per datum: "logprobs", "elementwise_loss"
    metrics: dict[str, float]  # keys "name:reduction"
