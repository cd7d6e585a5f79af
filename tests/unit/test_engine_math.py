"""Cross-entropy loss, logprobs and LoRA gradients against an independent float64 reference.

The reference merges each adapter into its base weight (`W + s * B @ A`, float64) and runs the
unmodified transformers model with those weights — no code path shared with our LoRA layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call
from transformers import AutoModelForCausalLM

from tuneforge.engine.lora import LoRAConfig
from tuneforge.engine.types import Datum, ForwardBackwardInput

MODEL = "tuneforge/tiny-qwen3"


def reference(folder, adapter, data):
    """Loss and d loss / d (A, B), float64, with merged weights."""
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float64).eval()
    A = {p: a.detach().double().requires_grad_(True) for p, a in adapter.A.items()}
    B = {p: b.detach().double().requires_grad_(True) for p, b in adapter.B.items()}
    # lm_head shares its weight with the embedding: merge into lm_head's use of it only
    merged = {f"{p}.weight": model.get_submodule(p).weight + adapter.scaling * B[p] @ A[p]
              for p in A}
    total = torch.zeros((), dtype=torch.float64)
    logprobs = []
    for d in data:
        ids = torch.from_numpy(d.tokens)[None]
        logits = functional_call(model, merged, args=(), kwargs={"input_ids": ids},
                                 tie_weights=False).logits[0]
        logp = torch.log_softmax(logits, dim=-1)
        targets = torch.from_numpy(d.inputs["target_tokens"])
        lp = torch.gather(logp, 1, targets.view(len(ids[0]), -1)).view(targets.shape)
        w = torch.from_numpy(d.inputs["weights"]).double()
        total = total - (lp * w).sum()
        logprobs.append(lp.detach().numpy())
    total.backward()
    return total.item(), logprobs, {p: A[p].grad for p in A}, {p: B[p].grad for p in B}


def random_data(seed: int, two_d: bool) -> list[Datum]:
    rng = np.random.default_rng(seed)
    data = []
    for n in (7, 12, 3):
        tokens = rng.integers(0, 8192, n)
        shape = (n, 3) if two_d else (n,)
        targets = rng.integers(0, 8192, shape)
        weights = rng.normal(size=shape).astype(np.float32)  # signed, non-binary
        weights[0] = 0.0
        data.append(Datum(tokens=tokens, inputs={"target_tokens": targets, "weights": weights}))
    return data


@pytest.mark.parametrize("two_d", [False, True], ids=["targets[N]", "targets[N,K]"])
def test_cross_entropy_loss_and_lora_gradients_match_float64(engine, two_d):
    engine.create_model("m", MODEL, LoRAConfig(rank=4, alpha=32.0, seed=0))
    tm = engine.model("m")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in tm.adapter.B.values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    data = random_data(2, two_d)
    ref_loss, ref_lp, ref_gA, ref_gB = reference(tm.base.tokenizer_dir, tm.adapter, data)

    result = engine.forward_backward("m", ForwardBackwardInput(data=data, loss_fn="cross_entropy"))
    assert result.metrics["loss:sum"] == pytest.approx(ref_loss, rel=1e-5, abs=1e-4)
    for out, lp, d in zip(result.outputs, ref_lp, data, strict=True):
        assert out["logprobs"].shape == d.inputs["target_tokens"].shape
        np.testing.assert_allclose(out["logprobs"], lp, atol=1e-4)
        np.testing.assert_allclose(out["elementwise_loss"], -lp * d.inputs["weights"], atol=1e-3)
    for path in tm.adapter.A:
        for ours, theirs in ((tm.adapter.A[path].grad, ref_gA[path]),
                             (tm.adapter.B[path].grad, ref_gB[path])):
            scale = float(theirs.abs().max()) + 1e-8
            assert float((ours.double() - theirs).abs().max()) <= 1e-4 * scale + 1e-7, path


def test_gradients_accumulate_across_calls_and_forward_adds_none(engine):
    engine.create_model("acc", MODEL, LoRAConfig(rank=2, alpha=32.0, seed=0))
    tm = engine.model("acc")
    data = random_data(3, False)
    engine.forward_backward("acc", ForwardBackwardInput(data=data[:1], loss_fn="cross_entropy"))
    engine.forward_backward("acc", ForwardBackwardInput(data=data[1:], loss_fn="cross_entropy"))
    split = [p.grad.clone() for p in tm.adapter.parameters()]
    engine.forward_backward("acc", ForwardBackwardInput(data=data, loss_fn="cross_entropy",
                                                        forward_only=True))
    after_forward = [p.grad.clone() for p in tm.adapter.parameters()]
    tm.optimizer.zero_grad()
    engine.forward_backward("acc", ForwardBackwardInput(data=data, loss_fn="cross_entropy"))
    together = [p.grad for p in tm.adapter.parameters()]
    for a, b, c in zip(split, after_forward, together, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-5 * float(c.abs().max()), rtol=0)


def test_microbatched_request_equals_single_pass(engine, monkeypatch):
    import tuneforge.engine.passes as passes_module

    data = random_data(4, False)
    engine.create_model("one", MODEL, LoRAConfig(rank=2, alpha=32.0, seed=0))
    one = engine.forward_backward("one", ForwardBackwardInput(data=data, loss_fn="cross_entropy"))
    monkeypatch.setattr(passes_module, "MICROBATCH_TOKENS", 12)  # forces one datum per pass
    engine.create_model("many", MODEL, LoRAConfig(rank=2, alpha=32.0, seed=0))
    many = engine.forward_backward("many", ForwardBackwardInput(data=data, loss_fn="cross_entropy"))
    assert many.metrics["loss:sum"] == pytest.approx(one.metrics["loss:sum"], rel=1e-6)
    for p, q in zip(engine.model("one").adapter.parameters(),
                    engine.model("many").adapter.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5 * float(q.grad.abs().max()), rtol=0)


def test_bf16_autocast_stays_close_to_fp32(registry):
    from tuneforge.engine.engine import Engine
    from tuneforge.settings import Limits

    data = random_data(5, False)
    results = {}
    for precision in ("fp32", "bf16"):
        eng = Engine(registry, Limits(), dtype=precision)
        eng.create_model("p", MODEL, LoRAConfig(rank=4, alpha=32.0, seed=0))
        tm = eng.model("p")
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for b in tm.adapter.B.values():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
        out = eng.forward_backward("p", ForwardBackwardInput(data=data, loss_fn="cross_entropy"))
        grads = torch.cat([p.grad.flatten() for p in tm.adapter.parameters()])
        results[precision] = (out.metrics["loss:sum"], grads)
    (loss32, g32), (loss16, g16) = results["fp32"], results["bf16"]
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    assert torch.isfinite(g16).all()
    assert float(torch.nn.functional.cosine_similarity(g32, g16.float(), dim=0)) > 0.99
