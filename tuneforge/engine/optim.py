"""Per-adapter AdamW with Tinker's per-call hyperparameters.

Tinker sends every Adam hyperparameter with every `optim_step` (schedules live on the client), so
the parameter group is rewritten before each step. Semantics are those of `torch.optim.AdamW`
(bias-corrected moments, decoupled weight decay `p -= lr * wd * p`), preceded by clipping of the
global gradient norm when `grad_clip_norm > 0`. The gradient used is the sum accumulated by every
`forward_backward` since the previous step; afterwards it is reset to zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tuneforge.errors import UserError


@dataclass(frozen=True)
class AdamParams:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        checks = {
            "learning_rate": self.learning_rate >= 0,
            "beta1": 0 <= self.beta1 < 1,
            "beta2": 0 <= self.beta2 < 1,
            "eps": self.eps >= 0,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip_norm": self.grad_clip_norm >= 0,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if not ok or not math.isfinite(value):
                limit = "in [0, 1)" if name.startswith("beta") else ">= 0 and finite"
                raise UserError(f"adam_params.{name} must be {limit}, got {value}")


class AdamW:
    """AdamW over one adapter's tensors, whose `.grad` holds the accumulated gradient."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step(self, hp: AdamParams) -> dict[str, float]:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        grad_norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        if not math.isfinite(grad_norm):
            self.zero_grad()
            raise UserError(
                f"optim_step: the accumulated gradient is not finite (norm {grad_norm}); "
                "the step was skipped and the gradient cleared"
            )
        if hp.grad_clip_norm > 0 and grad_norm > hp.grad_clip_norm:
            torch._foreach_mul_(grads, hp.grad_clip_norm / (grad_norm + 1e-6))
        group = self.optimizer.param_groups[0]
        group.update(lr=hp.learning_rate, betas=(hp.beta1, hp.beta2), eps=hp.eps,
                     weight_decay=hp.weight_decay)
        self.optimizer.step()
        self.zero_grad()
        return {"grad_norm:mean": grad_norm, "learning_rate:mean": hp.learning_rate}

    def rebind(self, params: list[torch.Tensor]) -> None:
        """Continue with new tensors for the same parameters (e.g. moved to another device);
        the moments and step count carry over, cast to the new tensors' device."""
        state = self.optimizer.state_dict()
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
        self.optimizer.load_state_dict(state)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
