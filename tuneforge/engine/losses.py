"""Built-in losses as pure tensor functions of per-token target logprobs.

Every loss maps `lp` (the current model's log-probability of each target token, shape `[N]` or
`[N, K]`) and the datum's `loss_fn_inputs` to an elementwise loss of the same shape. The request's
loss is the plain sum over tokens and datums (Tinker's convention: sums, not means), so the
gradient of a datum never depends on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from tuneforge.errors import Unsupported, UserError

LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float]], torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    config_keys: tuple[str, ...] = ()


def cross_entropy(
    lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> torch.Tensor:
    """`-lp * w`; `weights` default to 1 and may be any real number (custom-loss backward)."""
    weights = inputs.get("weights")
    return -lp if weights is None else -lp * weights


LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, required=("target_tokens",), optional=("weights",)),
}

# Names the SDK knows that this server does not compute (refused with a clear message).
KNOWN_UNSUPPORTED = ("importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce",
                     "custom")


def get_loss(name: str) -> LossSpec:
    if name in LOSSES:
        return LOSSES[name]
    supported = ", ".join(sorted(LOSSES))
    if name in KNOWN_UNSUPPORTED:
        raise Unsupported(
            f"loss_fn '{name}' is not implemented by this server (supported: {supported})")
    raise UserError(f"loss_fn '{name}' is unknown (supported: {supported})")


def check_inputs(spec: LossSpec, name: str, inputs: Mapping[str, torch.Tensor], index: int) -> None:
    """Exactly the inputs the loss uses, with float inputs shaped like `target_tokens`."""
    for key in spec.required:
        if key not in inputs:
            raise UserError(f"data[{index}].loss_fn_inputs: loss_fn '{name}' requires '{key}'")
    allowed = set(spec.required) | set(spec.optional)
    for key in inputs:
        if key not in allowed:
            raise UserError(
                f"data[{index}].loss_fn_inputs: '{key}' is not an input of loss_fn '{name}' "
                f"(expected {sorted(allowed)})"
            )
    shape = tuple(inputs["target_tokens"].shape)
    for key, value in inputs.items():
        if tuple(value.shape) != shape:
            raise UserError(
                f"data[{index}].loss_fn_inputs['{key}'] has shape {list(value.shape)}, "
                f"but target_tokens has shape {list(shape)}"
            )
