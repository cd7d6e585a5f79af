"""A bf16 registry stores its linear weights in bf16: the same numbers bf16 autocast computes
with fp32 weights, bit for bit, at half the memory of those layers."""

from __future__ import annotations

import numpy as np
import torch

from tuneforge.engine.engine import Engine
from tuneforge.engine.lora import LoRAConfig
from tuneforge.engine.models import ModelRegistry
from tuneforge.engine.optim import AdamParams
from tuneforge.engine.sampler import SampleRequest, SamplingParams
from tuneforge.engine.types import Datum, ForwardBackwardInput
from tuneforge.settings import Limits

MODEL = "tuneforge/tiny-qwen3"


def batch(seed: int) -> ForwardBackwardInput:
    rng = np.random.default_rng(seed)
    data = []
    for length in (9, 23, 16):
        tokens = rng.integers(0, 8192, length + 1)
        data.append(Datum(tokens=tokens[:-1], inputs={"target_tokens": tokens[1:]}))
    return ForwardBackwardInput(data=data, loss_fn="cross_entropy")


def trained(registry: ModelRegistry) -> tuple[Engine, list]:
    engine = Engine(registry, Limits(), dtype="bf16")
    tm = engine.model(engine.create_model("m", MODEL, LoRAConfig(rank=8, alpha=16.0, seed=3))
                      .model_id)
    with torch.no_grad():
        for b in tm.adapter.B.values():
            b.normal_(0, 0.02, generator=torch.Generator().manual_seed(5))
    results = []
    for step in range(2):
        results.append(engine.forward_backward("m", batch(step)))
        engine.optim_step("m", AdamParams(learning_rate=1e-3))
    return engine, results


def test_bf16_linear_weights_compute_what_autocast_computes(models_dir):
    rounded = ModelRegistry(models_dir, torch.device("cpu"), dtype="bf16")
    full = ModelRegistry(models_dir, torch.device("cpu"), dtype="fp32")
    base = rounded.get(MODEL)
    model = base.model
    def linears(model):
        return [m.base for m in model.modules() if hasattr(m, "base") and hasattr(m, "path")]

    assert linears(model) and all(m.weight.dtype == torch.bfloat16 for m in linears(model))
    # norms and the input embedding keep fp32; a tied head has its own rounded copy
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
    def nbytes(model):
        return sum(m.weight.numel() * m.weight.element_size() for m in linears(model))

    assert 2 * nbytes(model) == nbytes(full.get(MODEL).model)

    (e1, r1), (e2, r2) = trained(rounded), trained(full)
    for a, b in zip(r1, r2, strict=True):
        assert a.metrics["loss:sum"] == b.metrics["loss:sum"]
        for o1, o2 in zip(a.outputs, b.outputs, strict=True):
            np.testing.assert_array_equal(o1["logprobs"], o2["logprobs"])
    for x, y in zip(e1.model("m").adapter.parameters(), e2.model("m").adapter.parameters(),
                    strict=True):
        assert torch.equal(x, y)

    request = SampleRequest(prompt=[5, 17, 300, 41], num_samples=1,
                            params=SamplingParams(max_tokens=12, temperature=0.0))
    for e in (e1, e2):
        e.add_sampler_snapshot("s", "m")
    s1, s2 = (e.sample("s", request).sequences[0] for e in (e1, e2))
    assert s1.tokens == s2.tokens
    assert s1.logprobs == s2.logprobs
