"""AdamW with Tinker's per-call hyperparameters against a float64 reference written out here."""

from __future__ import annotations

import math

import pytest
import torch

from tuneforge.engine.optim import AdamParams, AdamW

STEPS = [
    AdamParams(learning_rate=1e-2),
    AdamParams(learning_rate=5e-3, beta1=0.8, beta2=0.99, eps=1e-8),
    AdamParams(learning_rate=2e-2, weight_decay=0.1),
    AdamParams(learning_rate=1e-2, grad_clip_norm=0.5),  # the gradients below exceed this norm
    AdamParams(learning_rate=0.0, weight_decay=0.5),
    AdamParams(learning_rate=3e-3, beta1=0.0, beta2=0.0, eps=1e-3, grad_clip_norm=100.0),
]


def reference_adamw(params, grads_per_step, steps):
    """Decoupled-weight-decay Adam with bias correction, global-norm clipping first."""
    p = [x.double().clone() for x in params]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    for t, (grads, hp) in enumerate(zip(grads_per_step, steps, strict=True), start=1):
        g = [x.double() for x in grads]
        norm = math.sqrt(sum(float((x * x).sum()) for x in g))
        if hp.grad_clip_norm > 0 and norm > hp.grad_clip_norm:
            g = [x * (hp.grad_clip_norm / (norm + 1e-6)) for x in g]
        for i in range(len(p)):
            p[i] = p[i] * (1 - hp.learning_rate * hp.weight_decay)
            m[i] = hp.beta1 * m[i] + (1 - hp.beta1) * g[i]
            v[i] = hp.beta2 * v[i] + (1 - hp.beta2) * g[i] ** 2
            m_hat = m[i] / (1 - hp.beta1**t)
            v_hat = v[i] / (1 - hp.beta2**t)
            p[i] = p[i] - hp.learning_rate * m_hat / (v_hat.sqrt() + hp.eps)
    return p


def test_every_hyperparameter_is_honoured():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen).requires_grad_(True),
              torch.randn(7, generator=gen).requires_grad_(True)]
    grads = [[torch.randn(x.shape, generator=gen) for x in params] for _ in STEPS]
    expected = reference_adamw([x.detach() for x in params], grads, STEPS)
    opt = AdamW(params)
    for g, hp in zip(grads, STEPS, strict=True):
        for x, gx in zip(params, g, strict=True):
            x.grad = gx.clone()
        metrics = opt.step(hp)
        assert metrics["grad_norm:mean"] == pytest.approx(
            math.sqrt(sum(float((gx.double() ** 2).sum()) for gx in g)), rel=1e-5)
        assert all(x.grad is None for x in params)  # the step consumed the gradient
    for ours, ref in zip(params, expected, strict=True):
        torch.testing.assert_close(ours.detach().double(), ref, atol=1e-6, rtol=1e-5)


def test_step_without_gradient_moves_nothing_and_bad_values_are_refused():
    x = torch.ones(4, requires_grad=True)
    AdamW([x]).step(AdamParams(learning_rate=1.0))
    assert torch.equal(x.detach(), torch.ones(4))
    for field, value in [("learning_rate", -1.0), ("beta1", 1.0), ("eps", float("nan")),
                         ("weight_decay", -0.1), ("grad_clip_norm", -1.0)]:
        with pytest.raises(ValueError, match=f"adam_params.{field}"):
            AdamParams(**{field: value})


def test_non_finite_gradient_is_refused_and_cleared():
    x = torch.ones(3, requires_grad=True)
    opt = AdamW([x])
    x.grad = torch.tensor([1.0, float("inf"), 0.0])
    with pytest.raises(ValueError, match="not finite"):
        opt.step(AdamParams())
    assert x.grad is None and torch.equal(x.detach(), torch.ones(3))
