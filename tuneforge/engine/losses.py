"""Built-in losses as pure tensor functions of per-token target logprobs.

Every loss maps `lp` (the current model's log-probability of each target token, shape `[N]`, or
`[N, K]` for cross-entropy) and the datum's `loss_fn_inputs` to an elementwise loss of the same
shape. The request's loss is the plain sum over tokens and datums (Tinker's convention: sums, not
means), so the gradient of a datum never depends on what else is in the batch. Notation below:
`q` = the `logprobs` input (the sampler's logprobs), `A` = `advantages`, `r = exp(lp - q)`,
`sg` = stop-gradient.

    cross_entropy        -lp * w                                   (w = `weights`, default 1)
    importance_sampling  -r * A
    ppo                  -min(r * A, clip(r, lo, hi) * A)          (lo, hi default 0.8, 1.2)
    cispo                -sg(clip(r, lo, hi)) * lp * A             (lo, hi default 0.0, 4.0)
    dro                  -(lp * A - beta / 2 * (lp - q)^2)         (`beta` required)
    gspo                 -min(s_t * A, clip(s_t, lo, hi) * A), s_t = sg(s) * exp(lp - sg(lp)),
                         s = exp(mean over `sequence_ratio_mask` of (sg(lp) - q))
                         (lo, hi required; the mask defaults to the positions with A != 0)

Clip thresholds are ratio bounds. They come from `loss_fn_config`, and a datum may override them
per token with `clip_low_threshold` / `clip_high_threshold` inputs. Tinker documents no default
for DRO's beta nor for GSPO's thresholds, so those must be given. `stable_reinforce` needs
sampling-side stability records whose objective Tinker has not published: it is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from tuneforge.errors import Unsupported, UserError

LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float]], torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    config_defaults: Mapping[str, float | None] = field(default_factory=dict)
    """Accepted `loss_fn_config` keys; None marks a key that must be given."""
    two_d: bool = False  # accepts [N, K] targets


def cross_entropy(lp, inputs, config):
    weights = inputs.get("weights")
    return -lp if weights is None else -lp * weights


def _ratio(lp, inputs):
    return torch.exp(lp - inputs["logprobs"])


def _bounds(inputs, config):
    lo = inputs.get("clip_low_threshold", config["clip_low_threshold"])
    hi = inputs.get("clip_high_threshold", config["clip_high_threshold"])
    return lo, hi


def _clip(x, lo, hi):
    # torch.clamp with tensor bounds; gradient is zero where the bound is active
    return torch.minimum(torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype)),
                         torch.as_tensor(hi, dtype=x.dtype))


def importance_sampling(lp, inputs, config):
    return -_ratio(lp, inputs) * inputs["advantages"]


def ppo(lp, inputs, config):
    ratio, adv = _ratio(lp, inputs), inputs["advantages"]
    lo, hi = _bounds(inputs, config)
    return -torch.minimum(ratio * adv, _clip(ratio, lo, hi) * adv)


def cispo(lp, inputs, config):
    lo, hi = _bounds(inputs, config)
    weight = _clip(_ratio(lp, inputs), lo, hi).detach()
    return -weight * lp * inputs["advantages"]


def dro(lp, inputs, config):
    beta = config["beta"]
    return -(lp * inputs["advantages"] - 0.5 * beta * (lp - inputs["logprobs"]) ** 2)


def gspo(lp, inputs, config):
    adv = inputs["advantages"]
    mask = inputs.get("sequence_ratio_mask")
    selected = (adv != 0) if mask is None else (mask != 0)
    log_ratio = (lp.detach() - inputs["logprobs"])[selected]
    seq_log_ratio = log_ratio.mean() if log_ratio.numel() else torch.zeros((), dtype=lp.dtype)
    ratio = torch.exp(seq_log_ratio + lp - lp.detach())
    lo, hi = _bounds(inputs, config)
    return -torch.minimum(ratio * adv, _clip(ratio, lo, hi) * adv)


_RL_INPUTS = ("target_tokens", "logprobs", "advantages")
_CLIP_INPUTS = ("clip_low_threshold", "clip_high_threshold")

LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, ("target_tokens",), ("weights",), two_d=True),
    "importance_sampling": LossSpec(importance_sampling, _RL_INPUTS),
    "ppo": LossSpec(ppo, _RL_INPUTS, _CLIP_INPUTS,
                    {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    "cispo": LossSpec(cispo, _RL_INPUTS, _CLIP_INPUTS,
                      {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),
    "dro": LossSpec(dro, _RL_INPUTS, config_defaults={"beta": None}),
    "gspo": LossSpec(gspo, _RL_INPUTS, (*_CLIP_INPUTS, "sequence_ratio_mask"),
                     {"clip_low_threshold": None, "clip_high_threshold": None}),
}

# Names the SDK knows that this server does not compute (refused with a clear message).
KNOWN_UNSUPPORTED = {
    "stable_reinforce": "it needs sampling-side stability records and Tinker has not published "
                        "its objective",
    "custom": "server-side custom losses are off (forward_backward_custom runs client-side)",
}


def get_loss(name: str) -> LossSpec:
    if name in LOSSES:
        return LOSSES[name]
    supported = ", ".join(sorted(LOSSES))
    if name in KNOWN_UNSUPPORTED:
        raise Unsupported(f"loss_fn '{name}' is not supported: {KNOWN_UNSUPPORTED[name]} "
                          f"(supported: {supported})")
    raise UserError(f"loss_fn '{name}' is unknown (supported: {supported})")


def resolve_config(spec: LossSpec, name: str, given: Mapping[str, float | str]) -> dict[str, float]:
    """`loss_fn_config` with defaults applied; unknown, missing or non-numeric keys refused."""
    unknown = sorted(set(given) - set(spec.config_defaults))
    if unknown:
        raise Unsupported(f"loss_fn_config keys {unknown} are not used by loss_fn '{name}' "
                          f"(accepted: {sorted(spec.config_defaults)})")
    config: dict[str, float] = {}
    for key, default in spec.config_defaults.items():
        value = given.get(key, default)
        if value is None:
            raise UserError(f"loss_fn '{name}' requires loss_fn_config['{key}'] "
                            "(no default is documented)")
        if not isinstance(value, int | float):
            raise UserError(f"loss_fn_config['{key}'] must be a number, got {value!r}")
        config[key] = float(value)
    lo, hi = config.get("clip_low_threshold"), config.get("clip_high_threshold")
    if lo is not None and hi is not None and not 0 <= lo <= hi:
        raise UserError(f"loss_fn_config: need 0 <= clip_low_threshold <= clip_high_threshold, "
                        f"got {lo} and {hi}")
    return config


def check_inputs(spec: LossSpec, name: str, inputs: Mapping[str, torch.Tensor], index: int) -> None:
    """Exactly the inputs the loss uses, float inputs shaped like `target_tokens`."""
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
    if len(shape) == 2 and not spec.two_d:
        raise UserError(f"data[{index}].loss_fn_inputs['target_tokens'] is 2-D {list(shape)}; "
                        f"loss_fn '{name}' takes one target per position ([N])")
    for key, value in inputs.items():
        if tuple(value.shape) != shape:
            raise UserError(
                f"data[{index}].loss_fn_inputs['{key}'] has shape {list(value.shape)}, "
                f"but target_tokens has shape {list(shape)}"
            )
