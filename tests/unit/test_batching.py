"""Requests of several adapters served in one shared pass give what each gets alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tuneforge.engine.engine import Engine
from tuneforge.engine.lora import LoRAConfig
from tuneforge.engine.optim import AdamParams
from tuneforge.engine.types import Datum, ForwardBackwardInput
from tuneforge.errors import UserError
from tuneforge.settings import Limits

MODEL = "tuneforge/tiny-qwen3"
CONFIGS = {
    "a": LoRAConfig(rank=1, alpha=32.0, train_mlp=False, train_unembed=False, seed=1),
    "b": LoRAConfig(rank=8, alpha=32.0, train_attn=False, seed=2),
    "c": LoRAConfig(rank=64, alpha=32.0, seed=3),
    "d": LoRAConfig(rank=4, alpha=32.0, train_attn=False, train_mlp=False, seed=4),
}


def data(seed: int, n: int) -> list[Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for length in rng.integers(3, 40, n):
        tokens = rng.integers(0, 8192, length + 1)
        out.append(Datum(tokens=tokens[:-1], inputs={"target_tokens": tokens[1:],
                                                     "weights": rng.normal(size=length)
                                                     .astype(np.float32)}))
    return out


def engine_with_models(registry) -> Engine:
    engine = Engine(registry, Limits())
    for name, config in CONFIGS.items():
        tm = engine.model(engine.create_model(name, MODEL, config).model_id)
        with torch.no_grad():  # non-zero B so that every adapter changes the outputs
            for b in tm.adapter.B.values():
                b.normal_(0, 0.02, generator=torch.Generator().manual_seed(config.seed))
    return engine


def requests() -> list[tuple[str, ForwardBackwardInput]]:
    return [(name, ForwardBackwardInput(data=data(i, 2 + i), loss_fn="cross_entropy",
                                        forward_only=(name == "d")))
            for i, name in enumerate(CONFIGS)]


def test_mixed_batch_equals_each_adapter_alone(registry):
    together, alone = engine_with_models(registry), engine_with_models(registry)
    reqs = requests()
    batched = together.forward_backward_batch(reqs)
    solo = [alone.forward_backward(name, inp) for name, inp in reqs]
    for (name, _), got, want in zip(reqs, batched, solo, strict=True):
        assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], abs=1e-4,
                                                        rel=1e-6)
        for o1, o2 in zip(got.outputs, want.outputs, strict=True):
            np.testing.assert_allclose(o1["logprobs"], o2["logprobs"], atol=1e-5)
        p1, p2 = (e.model(name).adapter.parameters() for e in (together, alone))
        for x, y in zip(p1, p2, strict=True):
            if name == "d":  # forward only: no gradient
                assert x.grad is None and y.grad is None
            else:
                torch.testing.assert_close(x.grad, y.grad, atol=1e-5 * float(y.grad.abs().max()),
                                           rtol=0)
    for name in ("a", "b", "c"):  # and the Adam updates that follow are the same
        before = [p.detach().clone() for p in alone.model(name).adapter.parameters()]
        grads = [p.grad.clone() for p in alone.model(name).adapter.parameters()]
        for e in (together, alone):
            e.optim_step(name, AdamParams(learning_rate=1e-3, eps=1e-8))
        for x, y, b, g in zip(together.model(name).adapter.parameters(),
                              alone.model(name).adapter.parameters(), before, grads, strict=True):
            dx, dy = (x - b).detach(), (y - b).detach()
            # Adam divides by |g|: where a gradient entry is at rounding level, rounding-level
            # differences between two correct computations become visible in its update, so
            # entries are compared where the gradient is well above rounding, the rest in norm.
            solid = g.abs() > 1e-4 * g.abs().max()
            torch.testing.assert_close(dx[solid], dy[solid], atol=1e-5, rtol=0)
            assert float((dx - dy).norm() / dy.norm()) < 1e-2


def test_a_bad_request_fails_alone_in_a_shared_pass(registry, monkeypatch):
    import tuneforge.engine.passes as passes_module

    engine = engine_with_models(registry)
    reqs = requests()
    bad = Datum(tokens=np.array([1, 99999]), inputs={"target_tokens": np.array([2, 3])})
    reqs[1] = ("b", ForwardBackwardInput(data=[bad], loss_fn="cross_entropy"))
    monkeypatch.setattr(passes_module, "MICROBATCH_TOKENS", 64)  # several passes, split jobs
    outcomes = engine.forward_backward_batch(reqs)
    assert isinstance(outcomes[1], UserError) and "99999" in str(outcomes[1])
    assert engine.model("b").adapter.parameters()[0].grad is None
    reference = engine_with_models(registry)
    for i in (0, 2, 3):
        name, inp = reqs[i]
        want = reference.forward_backward(name, inp)
        assert outcomes[i].metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"],
                                                                abs=1e-4, rel=1e-6)
