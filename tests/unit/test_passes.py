"""The packed loss path gives what the reference path gives.

`passes.packed_losses` (decoder hidden states of the real positions, lm_head + log-softmax in
chunks) against `passes.reference_losses` (full [B, T, V] logits): losses, per-token logprobs
and elementwise losses to 1e-5 relative in fp32. Gradients sum many tokens'
contributions of both signs, and the fp32 reference path itself is up to 1.3e-4 of a tensor's
largest entry away from float64 there, so every adapter's gradient is checked against a float64
run of the reference path: the packed path no further from it than the fp32 reference (and
within 5e-4 of the fp32 reference directly).
"""

from __future__ import annotations

from copy import deepcopy

import numpy as np
import pytest
import torch

from tuneforge.engine import lora, losses, passes

MODEL = "tuneforge/tiny-qwen3"
CONFIGS = [
    lora.LoRAConfig(rank=1, alpha=32.0, train_mlp=False, train_unembed=False, seed=1),
    lora.LoRAConfig(rank=8, alpha=16.0, train_attn=False, seed=2),
    lora.LoRAConfig(rank=16, alpha=32.0, seed=3),
    lora.LoRAConfig(rank=4, alpha=8.0, train_attn=False, train_mlp=False, seed=4),
    lora.LoRAConfig(rank=8, alpha=32.0, train_unembed=False, seed=5),
]


@pytest.fixture(scope="module")
def base(registry):
    return registry.get(MODEL)


@pytest.fixture(scope="module")
def base64(base):
    """A float64 copy of the base model, with its own router and LoRA wrappers."""
    copy = deepcopy(base)
    copy.model.double()
    return copy


def adapters(base, n: int) -> list[lora.Adapter]:
    out = []
    for config in CONFIGS[:n]:
        adapter = lora.new_adapter(config, base.targets, base.model, base.device)
        with torch.no_grad():  # non-zero B so that every adapter changes the outputs
            for b in adapter.B.values():
                b.normal_(0, 0.05, generator=torch.Generator().manual_seed(config.seed))
        out.append(adapter)
    return out


def rows(seed: int, lengths: list[int], loss: str = "cross_entropy", k: int = 0
         ) -> list[passes.Row]:
    """Random datums; `k` > 0: K targets per position on every other row."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        tokens = torch.from_numpy(rng.integers(0, 8192, n))
        shape = (n, k) if k and i % 2 == 0 else (n,)
        inputs = {"target_tokens": torch.from_numpy(rng.integers(0, 8192, shape))}
        if loss == "cross_entropy":
            inputs["weights"] = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
        else:
            inputs["logprobs"] = torch.from_numpy(
                -rng.uniform(5, 12, shape).astype(np.float32))
            inputs["advantages"] = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
        out.append((tokens, inputs))
    return out


def run(base, monkeypatch, adapter_list, row_lists, optimised: bool, loss: str = "cross_entropy",
        config=None, forward_only=(), checkpoint: bool = False):
    monkeypatch.setattr(passes, "PACKED", optimised)
    spec = losses.get_loss(loss)
    config = losses.resolve_config(spec, loss, config or {})
    jobs = [passes.Job(a, r, spec, config, forward_only=i in forward_only, checkpoint=checkpoint)
            for i, (a, r) in enumerate(zip(adapter_list, row_lists, strict=True))]
    passes.run(base, jobs, "fp32", commit_grads=False)
    return jobs


def assert_same(got: list[passes.Job], want: list[passes.Job]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.loss == pytest.approx(w.loss, rel=1e-5, abs=1e-4)
        for o1, o2 in zip(g.outputs, w.outputs, strict=True):
            for key in ("logprobs", "elementwise_loss"):
                assert o1[key].shape == o2[key].shape
                np.testing.assert_allclose(o1[key], o2[key], rtol=1e-5,
                                           atol=1e-5 * np.abs(o2[key]).max())
        for x, y in zip(g.grads, w.grads, strict=True):
            if y is None:
                assert x is None
                continue
            assert float(y.abs().max()) > 0
            torch.testing.assert_close(x, y, rtol=0, atol=5e-4 * float(y.abs().max()))


def grad_error(jobs: list[passes.Job], gold: list[passes.Job]) -> float:
    """The largest gradient error against `gold`, relative to each tensor's largest entry."""
    return max(float((x.double() - y).abs().max() / y.abs().max())
               for job, ref in zip(jobs, gold, strict=True)
               for x, y in zip(job.grads, ref.grads, strict=True) if y is not None)


def compare(base, float64, monkeypatch, n_adapters: int, row_lists, **kw) -> None:
    ads = adapters(base, n_adapters)
    want = run(base, monkeypatch, ads, row_lists, optimised=False, **kw)
    got = run(base, monkeypatch, ads, row_lists, optimised=True, **kw)
    assert_same(got, want)
    doubles = [lora.Adapter(a.config,
                            {k: v.detach().double().requires_grad_() for k, v in a.A.items()},
                            {k: v.detach().double().requires_grad_() for k, v in a.B.items()})
               for a in ads]
    gold = run(float64, monkeypatch, doubles, row_lists, optimised=False, **kw)
    if any(not job.forward_only for job in got):
        assert grad_error(got, gold) <= max(1.5 * grad_error(want, gold), 2e-5)


def test_mixed_adapters_with_right_padding_and_a_forward_only_job(base, base64, monkeypatch):
    # ranks 1-16, attention only / no attention / all / lm_head only / no lm_head
    row_lists = [rows(i, lengths) for i, lengths in
                 enumerate([[5, 40], [33], [17, 2, 29], [40], [11, 11]])]
    compare(base, base64, monkeypatch, 5, row_lists, forward_only={3})


def test_passes_longer_than_one_lm_head_chunk(base, base64, monkeypatch):
    # equal rows, and two rows per adapter in a pass longer than one chunk of lm_head rows
    compare(base, base64, monkeypatch, 5, [rows(10 + i, [24]) for i in range(5)])
    monkeypatch.setattr(passes, "CHUNK_TOKENS", 16)
    compare(base, base64, monkeypatch, 3, [rows(20 + i, [24, 24]) for i in range(3)])


def test_two_d_targets_mixed_with_one_d(base, base64, monkeypatch):
    row_lists = [rows(30, [9, 14, 3], k=3), rows(31, [20], k=4), rows(32, [6, 6])]
    compare(base, base64, monkeypatch, 3, row_lists)


@pytest.mark.parametrize("loss,config", [
    ("importance_sampling", {}),
    ("ppo", {}),
    ("cispo", {}),
    ("dro", {"beta": 0.1}),
    ("gspo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
])
def test_every_policy_loss(base, base64, monkeypatch, loss, config):
    row_lists = [rows(40 + i, lengths, loss=loss) for i, lengths in
                 enumerate([[12, 30], [25], [7, 7, 19]])]
    compare(base, base64, monkeypatch, 3, row_lists, loss=loss, config=config)


def test_gradient_checkpointing(base, base64, monkeypatch):
    row_lists = [rows(50 + i, lengths) for i, lengths in enumerate([[8, 21], [21], [13]])]
    compare(base, base64, monkeypatch, 3, row_lists, checkpoint=True, forward_only={1})
    compare(base, base64, monkeypatch, 3, [rows(60 + i, [16]) for i in range(3)], checkpoint=True)


def test_bf16_packed_path_stays_close_to_reference(base, monkeypatch):
    ads = adapters(base, 3)
    row_lists = [rows(70 + i, lengths) for i, lengths in enumerate([[10, 30], [30], [4]])]
    results = []
    spec = losses.get_loss("cross_entropy")
    for optimised in (False, True):
        monkeypatch.setattr(passes, "PACKED", optimised)
        jobs = [passes.Job(a, r, spec, {}, False) for a, r in zip(ads, row_lists, strict=True)]
        passes.run(base, jobs, "bf16", commit_grads=False)
        results.append(jobs)
    for got, want in zip(results[1], results[0], strict=True):
        assert got.loss == pytest.approx(want.loss, rel=1e-2)
        for x, y in zip(got.grads, want.grads, strict=True):
            if y is not None:
                assert float((x - y).norm() / y.norm()) < 0.05
