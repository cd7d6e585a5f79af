"""Data-parallel arithmetic without Ray: two in-process engines holding replicas of one adapter,
each given one shard of a batch, gradients summed between them before the step, give the losses,
logprobs, gradients and Adam updates of one engine given the whole batch (the Ray group,
engine/data_parallel.py, does the same across processes; tests/integration/test_ray.py checks it
end to end)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tuneforge.engine.data_parallel import _merge, _shard
from tuneforge.engine.engine import Engine
from tuneforge.engine.lora import LoRAConfig
from tuneforge.engine.optim import AdamParams
from tuneforge.engine.types import Datum, ForwardBackwardInput, ForwardBackwardResult
from tuneforge.errors import UserError
from tuneforge.settings import Limits

MODEL = "tuneforge/tiny-qwen3"
HP = AdamParams(learning_rate=1e-2, grad_clip_norm=5.0)


def data(n: int, seed: int) -> list[Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = 5 + (i * 3) % 7
        out.append(Datum(tokens=rng.integers(0, 8192, length),
                         inputs={"target_tokens": rng.integers(0, 8192, length),
                                 "weights": rng.random(length).astype(np.float32)}))
    return out


def replica(registry) -> Engine:
    engine = Engine(registry, Limits())
    engine.create_model("m", MODEL, LoRAConfig(rank=4, alpha=32.0, seed=3))
    with torch.no_grad():  # non-zero B, the same on every replica
        gen = torch.Generator().manual_seed(9)
        for b in engine.model("m").adapter.B.values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    return engine


def test_shards_are_consecutive_and_balanced():
    assert _shard(list(range(7)), 2) == [[0, 1, 2, 3], [4, 5, 6]]
    assert _shard(list(range(2)), 3) == [[0], [1], []]
    assert sum(_shard(list(range(10)), 4), []) == list(range(10))


def test_two_replicas_with_summed_gradients_equal_one_engine(registry):
    one, replicas = replica(registry), [replica(registry), replica(registry)]
    for step in range(2):
        batch = data(7, step)
        whole = one.forward_backward("m", ForwardBackwardInput(batch, "cross_entropy"))
        parts = [eng.forward_backward_batch(
            [("m", ForwardBackwardInput(shard, "cross_entropy"))], hold=True)[0]
            for eng, shard in zip(replicas, _shard(batch, 2), strict=True)]
        merged = _merge(parts)
        for eng in replicas:
            eng.settle({"m": True})
        assert merged.metrics["loss:sum"] == pytest.approx(whole.metrics["loss:sum"], rel=1e-6)
        for a, b in zip(merged.outputs, whole.outputs, strict=True):
            np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-6)

        params = [eng.model("m").adapter.parameters() for eng in replicas]
        summed = [pa.grad + pb.grad for pa, pb in zip(*params, strict=True)]
        for p, g in zip(one.model("m").adapter.parameters(), summed, strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-5)

        def all_reduce(ps, summed=summed):  # what the group's all-reduce leaves everywhere
            for p, g in zip(ps, summed, strict=True):
                p.grad = g.clone()

        want = one.optim_step("m", HP)
        got = [eng.optim_step("m", HP, reduce=all_reduce) for eng in replicas]
        assert got[0]["grad_norm:mean"] == pytest.approx(want["grad_norm:mean"], rel=1e-5)
    for eng in replicas:
        for p, q in zip(eng.model("m").adapter.parameters(),
                        one.model("m").adapter.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def test_a_dropped_share_leaves_the_gradient_as_it_was(registry):
    engine = replica(registry)
    engine.forward_backward("m", ForwardBackwardInput(data(2, 0), "cross_entropy"))
    before = [p.grad.clone() for p in engine.model("m").adapter.parameters()]
    out = engine.forward_backward_batch([("m", ForwardBackwardInput(data(3, 1),
                                                                   "cross_entropy"))], hold=True)
    assert not isinstance(out[0], Exception)
    engine.settle({"m": False})
    for p, g in zip(engine.model("m").adapter.parameters(), before, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_a_failed_shard_fails_the_whole_request():
    ok = ForwardBackwardResult(outputs=[{}], metrics={"loss:sum": 1.0})
    failed = UserError("data[0]: bad")
    assert _merge([ok, failed]) is failed
    merged = _merge([ok, ForwardBackwardResult(outputs=[{}, {}], metrics={"loss:sum": 2.0})])
    assert merged.metrics == {"loss:sum": 3.0} and len(merged.outputs) == 3
