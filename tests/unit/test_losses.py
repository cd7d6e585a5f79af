"""Every built-in loss: value and gradient w.r.t. the per-token logprobs against a float64
reference written out here in numpy, with closed-form gradients (no autograd)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from tuneforge.engine import losses
from tuneforge.errors import Unsupported, UserError


def ref_cross_entropy(lp, d, c):
    w = d.get("weights", np.ones_like(lp))
    return -(lp * w).sum(), -w


def ref_importance_sampling(lp, d, c):
    r = np.exp(lp - d["logprobs"])
    return -(r * d["advantages"]).sum(), -r * d["advantages"]


def _bounds(d, c):
    return (d.get("clip_low_threshold", c["clip_low_threshold"]),
            d.get("clip_high_threshold", c["clip_high_threshold"]))


def ref_ppo(lp, d, c):
    r, a = np.exp(lp - d["logprobs"]), d["advantages"]
    lo, hi = _bounds(d, c)
    unclipped, clipped = r * a, np.clip(r, lo, hi) * a
    grad = np.where(unclipped <= clipped, -r * a, 0.0)  # the clipped branch is flat in lp
    return -np.minimum(unclipped, clipped).sum(), grad


def ref_cispo(lp, d, c):
    lo, hi = _bounds(d, c)
    weight = np.clip(np.exp(lp - d["logprobs"]), lo, hi)  # treated as a constant
    return -(weight * lp * d["advantages"]).sum(), -weight * d["advantages"]


def ref_dro(lp, d, c):
    a, q, beta = d["advantages"], d["logprobs"], c["beta"]
    value = -(lp * a - 0.5 * beta * (lp - q) ** 2).sum()
    return value, -(a - beta * (lp - q))


def ref_gspo(lp, d, c):
    a = d["advantages"]
    mask = d.get("sequence_ratio_mask", (a != 0).astype(np.float64)) != 0
    s = float(np.exp((lp - d["logprobs"])[mask].mean())) if mask.any() else 1.0
    lo, hi = _bounds(d, c)
    unclipped, clipped = s * a, np.clip(s, lo, hi) * a
    grad = np.where(unclipped <= clipped, -s * a, 0.0)  # d s_t / d lp_t = s, own token only
    return -np.minimum(unclipped, clipped).sum(), grad


REFERENCES = {"cross_entropy": ref_cross_entropy, "importance_sampling": ref_importance_sampling,
              "ppo": ref_ppo, "cispo": ref_cispo, "dro": ref_dro, "gspo": ref_gspo}


def case(rng: np.random.Generator, n: int, spread: float, zero_adv: bool = False) -> dict:
    lp = -rng.exponential(1.0, n)
    q = lp + rng.normal(0, spread, n)  # spread controls how many ratios leave the clip range
    adv = np.zeros(n) if zero_adv else rng.normal(0, 1, n)
    adv[: n // 4] = 0.0  # prompt-like positions
    return {"lp": lp, "logprobs": q, "advantages": adv, "weights": rng.normal(0, 1, n),
            "target_tokens": rng.integers(0, 100, n)}


def inputs_for(name: str, c: dict, extra: dict | None = None) -> dict:
    keys = {"cross_entropy": ["target_tokens", "weights"]}.get(
        name, ["target_tokens", "logprobs", "advantages"])
    return {k: c[k] for k in keys} | (extra or {})


def run(name: str, lp: np.ndarray, inputs: dict, config: dict) -> tuple[float, np.ndarray]:
    spec = losses.get_loss(name)
    resolved = losses.resolve_config(spec, name, config)
    t = torch.tensor(lp, dtype=torch.float32, requires_grad=True)
    tensors = {k: torch.tensor(v, dtype=torch.int64 if k == "target_tokens" else torch.float32)
               for k, v in inputs.items()}
    losses.check_inputs(spec, name, tensors, 0)
    elementwise = spec.fn(t, tensors, resolved)
    assert elementwise.shape == t.shape
    total = elementwise.sum()
    total.backward()
    return float(total.detach()), t.grad.double().numpy()


CONFIGS = {"cross_entropy": {}, "importance_sampling": {}, "ppo": {}, "cispo": {},
           "dro": {"beta": 0.3},
           "gspo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}}
DEFAULTS = {"ppo": (0.8, 1.2), "cispo": (0.0, 4.0)}


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("spread, zero_adv", [(0.01, False), (0.5, False), (0.5, True)],
                         ids=["near-on-policy", "clipped-ratios", "zero-advantages"])
def test_value_and_gradient_match_float64_reference(name, spread, zero_adv):
    rng = np.random.default_rng(zlib.crc32(f"{name}-{spread}-{zero_adv}".encode()))
    c = case(rng, 40, spread, zero_adv)
    inputs = inputs_for(name, c)
    value, grad = run(name, c["lp"], inputs, CONFIGS[name])
    ref_inputs = {k: np.asarray(v, dtype=np.float64) for k, v in inputs.items()}
    lo_hi = DEFAULTS.get(name)
    config = {**CONFIGS[name], **({"clip_low_threshold": lo_hi[0], "clip_high_threshold": lo_hi[1]}
                                  if lo_hi else {})}
    ref_value, ref_grad = REFERENCES[name](np.asarray(c["lp"], dtype=np.float64), ref_inputs,
                                           config)
    assert value == pytest.approx(ref_value, rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)
    if zero_adv and name != "cross_entropy":
        expected_zero = name != "dro"  # DRO's quadratic penalty does not vanish with A = 0
        assert (value == 0.0) == expected_zero


def test_clipping_really_happens_in_the_clipped_case():
    rng = np.random.default_rng(0)
    c = case(rng, 200, 0.5)
    r = np.exp(c["lp"] - c["logprobs"])
    assert ((r < 0.8) | (r > 1.2)).mean() > 0.3  # the test data exercises both clip sides
    _, grad = run("ppo", c["lp"], inputs_for("ppo", c), {})
    assert (grad == 0).sum() > (c["advantages"] == 0).sum()  # clipped tokens get no gradient


def test_per_token_clip_thresholds_override_the_config():
    rng = np.random.default_rng(1)
    c = case(rng, 30, 0.5)
    lo, hi = np.full(30, 0.5), np.full(30, 2.0)
    extra = {"clip_low_threshold": lo, "clip_high_threshold": hi}
    value, grad = run("ppo", c["lp"], inputs_for("ppo", c, extra), {})
    ref_value, ref_grad = ref_ppo(c["lp"], inputs_for("ppo", c, extra),
                                  {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})
    assert not np.allclose(ref_grad, ref_ppo(c["lp"], inputs_for("ppo", c), {
        "clip_low_threshold": 0.8, "clip_high_threshold": 1.2})[1])  # the override matters
    assert value == pytest.approx(ref_value, rel=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_gspo_sequence_ratio_mask_and_all_masked():
    rng = np.random.default_rng(2)
    c = case(rng, 20, 0.3)
    mask = np.zeros(20)
    mask[5:12] = 1.0
    cfg = CONFIGS["gspo"]
    for m in (mask, np.zeros(20)):  # an all-masked datum has sequence ratio 1
        inputs = inputs_for("gspo", c, {"sequence_ratio_mask": m})
        value, grad = run("gspo", c["lp"], inputs, cfg)
        ref_value, ref_grad = ref_gspo(c["lp"], inputs, cfg)
        assert value == pytest.approx(ref_value, rel=1e-5)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_cross_entropy_two_d_targets_and_all_zero_weights():
    rng = np.random.default_rng(3)
    lp = -rng.exponential(1.0, (6, 3))
    w = rng.normal(size=(6, 3))
    value, grad = run("cross_entropy", lp, {"target_tokens": rng.integers(0, 9, (6, 3)),
                                            "weights": w}, {})
    assert value == pytest.approx(-(lp * w).sum(), rel=1e-5)
    np.testing.assert_allclose(grad, -w, rtol=1e-6)
    value, grad = run("cross_entropy", lp, {"target_tokens": np.zeros((6, 3), np.int64),
                                            "weights": np.zeros((6, 3))}, {})
    assert value == 0.0 and not grad.any()


def test_inputs_and_config_are_validated_with_clear_messages():
    t = {"target_tokens": torch.zeros(4, dtype=torch.int64)}
    with pytest.raises(UserError, match="requires 'advantages'"):
        losses.check_inputs(losses.get_loss("ppo"), "ppo", {**t, "logprobs": torch.zeros(4)}, 0)
    with pytest.raises(UserError, match="'weights' is not an input of loss_fn 'ppo'"):
        losses.check_inputs(losses.get_loss("ppo"), "ppo",
                            {**t, "logprobs": torch.zeros(4), "advantages": torch.zeros(4),
                             "weights": torch.zeros(4)}, 0)
    with pytest.raises(UserError, match="takes one target per position"):
        losses.check_inputs(losses.get_loss("importance_sampling"), "importance_sampling",
                            {"target_tokens": torch.zeros(4, 2, dtype=torch.int64),
                             "logprobs": torch.zeros(4, 2), "advantages": torch.zeros(4, 2)}, 0)
    with pytest.raises(UserError, match=r"requires loss_fn_config\['beta'\]"):
        losses.resolve_config(losses.get_loss("dro"), "dro", {})
    with pytest.raises(Unsupported, match="not used by loss_fn 'ppo'"):
        losses.resolve_config(losses.get_loss("ppo"), "ppo", {"beta": 1.0})
    with pytest.raises(UserError, match="clip_low_threshold <= clip_high_threshold"):
        losses.resolve_config(losses.get_loss("ppo"), "ppo", {"clip_low_threshold": 1.5})
    with pytest.raises(Unsupported, match="stable_reinforce"):
        losses.get_loss("stable_reinforce")
    with pytest.raises(UserError, match="unknown"):
        losses.get_loss("nope")
