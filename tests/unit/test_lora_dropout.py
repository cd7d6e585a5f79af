"""LoRA dropout as PEFT's `LoraLayer` applies it, in training passes only.

`y = W x + s * B A dropout(x)`, inverted dropout (mask / (1 - p)). Checked against PEFT itself
in float64 (same weights, same mask), and through the engine: `forward`, sampling and prompt
logprobs never drop; p = 0 computes exactly what it computed before dropout existed; an adapter
with dropout leaves the other adapters of its pass untouched; gradient checkpointing recomputes
the same masks; the run's alpha and dropout travel with its checkpoints.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import peft
import pytest
import torch
from torch import nn

from tests.unit.test_lora import random_adapter, small_qwen3
from tuneforge.engine import lora, losses, passes
from tuneforge.engine.lora import LoRAConfig
from tuneforge.engine.optim import AdamParams
from tuneforge.engine.sampler import SampleRequest, SamplingParams
from tuneforge.engine.types import Datum, ForwardBackwardInput
from tuneforge.errors import UserError
from tuneforge.storage import checkpoints

MODEL = "tuneforge/tiny-qwen3"


class FixedNoise(nn.Module):
    """Stands in for PEFT's `nn.Dropout`: multiplies by our noise for this module path."""

    def __init__(self, p: float, key: int, path: str) -> None:
        super().__init__()
        self.p, self.key, self.path = p, key, path

    def forward(self, x):
        return x * lora.dropout_noise(x.shape, self.p, lora.mix(self.key, lora.mix(self.path)),
                                      x.device, x.dtype)


def test_noise_is_nn_dropouts_noise():
    """Our draw with key k is exactly what `F.dropout` draws after `torch.manual_seed(k)`."""
    x = torch.randn(4, 33, 48, dtype=torch.float64) + 3  # no zeros in x itself
    for p in (0.05, 0.5):
        torch.manual_seed(1234)
        theirs = nn.functional.dropout(x, p, training=True)
        ours = x * lora.dropout_noise(x.shape, p, 1234, x.device, x.dtype)
        assert torch.equal(ours, theirs)
        noise = lora.dropout_noise(x.shape, p, 99, x.device, x.dtype)
        assert set(noise.unique().tolist()) == {0.0, 1 / (1 - p)}
        assert abs(float((noise == 0).double().mean()) - p) < 0.02  # 6336 draws


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_linear_matches_peft_float64(p):
    """One linear in float64: PEFT's Linear in train mode (its own nn.Dropout, the global RNG
    seeded with our key) against LoRALinear: outputs and A, B gradients."""
    torch.manual_seed(0)
    base = nn.Linear(24, 40, dtype=torch.float64)
    holder = nn.Module()
    holder.layer = copy.deepcopy(base)
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=32, lora_dropout=p,
                                                 target_modules=["layer"]), holder)
    theirs = holder.layer.double().train()
    assert isinstance(theirs.lora_dropout["default"], nn.Dropout)
    router = lora.Router()
    ours = lora.LoRALinear(base, "layer", router)
    config = LoRAConfig(rank=4, alpha=32.0, dropout=p, seed=0)
    a = (torch.randn(4, 24, dtype=torch.float64) * 0.3).requires_grad_(True)
    b = (torch.randn(40, 4, dtype=torch.float64) * 0.3).requires_grad_(True)
    adapter = lora.Adapter(config, A={"layer": a}, B={"layer": b})
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(a)
        theirs.lora_B["default"].weight.copy_(b)
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    key = 777
    with lora.activate(router, [lora.Segment(adapter, 0, 3, key)]):
        y = ours(x)
    torch.manual_seed(lora.mix(key, lora.mix("layer")))  # the seed of our mask's draw
    y_ref = theirs(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(a.grad, theirs.lora_A["default"].weight.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.grad, theirs.lora_B["default"].weight.grad, rtol=0, atol=1e-12)
    with lora.activate(router, [lora.Segment(adapter, 0, 3)]):
        plain = ours(x)
    assert float((plain - y).detach().abs().max()) > 1e-3  # the mask really changed something


def test_model_matches_peft_float64():
    """The whole small Qwen3 in float64, every target module dropping: logits and every A, B
    gradient equal PEFT's (its dropout modules given the masks our keys draw)."""
    p, key = 0.1, 4242
    model = small_qwen3().double()
    reference = copy.deepcopy(model)
    router, targets = lora.inject(model)
    config = LoRAConfig(rank=4, alpha=16.0, dropout=p, seed=3)
    adapter = random_adapter(model, targets, config, seed=4)
    for store in (adapter.A, adapter.B):
        for path in store:
            store[path] = store[path].detach().double().requires_grad_(True)
    modules = sorted({path.rsplit(".", 1)[-1] for path in adapter.A})
    peft_model = peft.get_peft_model(reference, peft.LoraConfig(
        r=4, lora_alpha=16.0, lora_dropout=p, target_modules=modules))
    layers = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            path = name.removeprefix("base_model.model.")
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(adapter.A[path])
                module.lora_B["default"].weight.copy_(adapter.B[path])
            module.lora_dropout["default"] = FixedNoise(p, key, path)
            layers[path] = module
    assert layers.keys() == adapter.A.keys()
    peft_model.train()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    with lora.activate(router, [lora.Segment(adapter, 0, 2, key)]):
        ours = model(input_ids=ids).logits
    theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
    w = torch.randn_like(ours)
    (ours * w).sum().backward()
    (theirs * w).sum().backward()
    for path, module in layers.items():
        torch.testing.assert_close(adapter.A[path].grad, module.lora_A["default"].weight.grad,
                                   rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(adapter.B[path].grad, module.lora_B["default"].weight.grad,
                                   rtol=1e-9, atol=1e-12)


def test_zero_dropout_is_the_plain_path():
    """p = 0: a training key changes nothing, bit for bit, and the delta is s * B A x."""
    torch.manual_seed(0)
    base = nn.Linear(16, 20)
    router = lora.Router()
    layer = lora.LoRALinear(base, "m", router)
    config = LoRAConfig(rank=2, alpha=32.0, seed=0)
    a = torch.randn(2, 16, requires_grad=True)
    b = torch.randn(20, 2, requires_grad=True)
    adapter = lora.Adapter(config, A={"m": a}, B={"m": b})
    x = torch.randn(3, 5, 16)
    out = []
    for key in (None, 12345):
        with lora.activate(router, [lora.Segment(adapter, 0, 3, key)]):
            y = layer(x)
        ga, gb = torch.autograd.grad(y.square().sum(), [a, b])
        out.append((y, ga, gb))
    for got, want in zip(out[0], out[1], strict=True):
        assert torch.equal(got, want)
    assert torch.equal(out[0][0], base(x) + ((x @ a.t()) * 16.0) @ b.t())


# ---- through passes and the engine --------------------------------------------------------

@pytest.fixture(scope="module")
def base(registry):
    return registry.get(MODEL)


def adapter_pair(base, dropout: float) -> tuple[lora.Adapter, lora.Adapter]:
    """A rank-8 adapter with `dropout` and a rank-4 one without, both with non-zero B."""
    out = []
    for seed, rank, p in ((1, 8, dropout), (2, 4, 0.0)):
        a = lora.new_adapter(LoRAConfig(rank=rank, alpha=32.0, seed=seed, dropout=p),
                             base.targets, base.model, base.device)
        with torch.no_grad():
            for t in a.B.values():
                t.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
        out.append(a)
    return out[0], out[1]


def rows(seed: int, lengths: list[int]) -> list[passes.Row]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        tokens = torch.from_numpy(rng.integers(0, 200, n))
        out.append((tokens, {"target_tokens": torch.from_numpy(rng.integers(0, 200, n)),
                             "weights": torch.ones(n)}))
    return out


def run(base, items, checkpoint=False, packed=True, monkeypatch=None):
    """items: (adapter, rows, dropout_key, forward_only) per job; the jobs after the pass."""
    if monkeypatch is not None:
        monkeypatch.setattr(passes, "PACKED", packed)
    spec = losses.get_loss("cross_entropy")
    jobs = [passes.Job(a, r, spec, {}, forward_only, checkpoint=checkpoint, dropout_key=key)
            for a, r, key, forward_only in items]
    passes.run(base, jobs, "fp32", commit_grads=False)
    return jobs


def same(x: passes.Job, y: passes.Job) -> bool:
    return x.loss == y.loss and all(
        (g is None and h is None) or torch.equal(g, h) for g, h in zip(x.grads, y.grads,
                                                                        strict=True))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "reference"])
def test_mixed_pass_leaves_the_other_adapter_alone(base, monkeypatch, packed):
    drop, plain = adapter_pair(base, 0.05)
    r1, r2 = rows(1, [12, 12]), rows(2, [12])
    mixed = run(base, [(drop, r1, 7, False), (plain, r2, 8, False)], monkeypatch=monkeypatch,
                packed=packed)
    no_drop = run(base, [(drop, r1, None, False), (plain, r2, 8, False)])
    assert same(mixed[1], no_drop[1])  # the p = 0 adapter: bit for bit, whatever its neighbour
    assert mixed[0].loss != no_drop[0].loss  # while its neighbour's dropout is on
    alone = run(base, [(plain, r2, None, False)])[0]
    assert mixed[1].loss == pytest.approx(alone.loss, rel=1e-5)
    for g, h in zip(mixed[1].grads, alone.grads, strict=True):
        torch.testing.assert_close(g, h, rtol=0, atol=5e-4 * float(h.abs().max()))
    # the dropping adapter's masks are its own key's: the same alone as beside another
    drop_alone = run(base, [(drop, r1, 7, False)])[0]
    assert mixed[0].loss == pytest.approx(drop_alone.loss, rel=1e-5)
    for g, h in zip(mixed[0].grads, drop_alone.grads, strict=True):
        torch.testing.assert_close(g, h, rtol=0, atol=5e-4 * float(h.abs().max()))


def test_zero_dropout_job_with_a_key_is_unchanged(base):
    _, plain = adapter_pair(base, 0.0)
    r = rows(3, [9, 17])
    assert same(run(base, [(plain, r, 5, False)])[0], run(base, [(plain, r, None, False)])[0])


def test_forward_only_jobs_never_drop(base):
    drop, _ = adapter_pair(base, 0.3)
    r = rows(4, [10, 14])
    with_key = run(base, [(drop, r, 11, True)])[0]
    without = run(base, [(drop, r, None, True)])[0]
    assert with_key.loss == without.loss
    training = run(base, [(drop, r, 11, False)])[0]
    assert training.loss != without.loss


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "reference"])
def test_checkpointing_recomputes_the_same_masks(base, monkeypatch, packed):
    drop, plain = adapter_pair(base, 0.1)
    r1, r2 = rows(5, [16, 9]), rows(6, [16])
    items = [(drop, r1, 21, False), (plain, r2, None, False)]
    direct = run(base, items, monkeypatch=monkeypatch, packed=packed)
    recomputed = run(base, items, checkpoint=True)
    for x, y in zip(recomputed, direct, strict=True):
        assert x.loss == pytest.approx(y.loss, rel=1e-6)
        for g, h in zip(x.grads, y.grads, strict=True):
            torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7 * float(h.abs().max()))
    other = run(base, [(drop, r1, 22, False)], checkpoint=True)[0]  # another mask: other grads
    gap = max(float((g - h).abs().max() / h.abs().max())
              for g, h in zip(other.grads, direct[0].grads, strict=True))
    assert gap > 1e-3


def datums(seed: int, n: int = 3, length: int = 12) -> list[Datum]:
    rng = np.random.default_rng(seed)
    return [Datum(tokens=rng.integers(0, 200, length).astype(np.int64),
                  inputs={"target_tokens": rng.integers(0, 200, length).astype(np.int64),
                          "weights": np.ones(length, dtype=np.float32)})
            for _ in range(n)]


HP = AdamParams(learning_rate=5e-3)


def trained(engine, model_id: str, dropout: float, seed: int = 0, steps: int = 2):
    engine.create_model(model_id, MODEL, LoRAConfig(rank=4, alpha=16.0, dropout=dropout,
                                                    seed=seed))
    for step in range(steps):
        engine.forward_backward(model_id, ForwardBackwardInput(datums(step), "cross_entropy"))
        engine.optim_step(model_id, HP)


def test_engine_runs_are_reproducible_and_steps_draw_new_masks(engine):
    trained(engine, "a", 0.1)
    trained(engine, "b", 0.1)
    ta, tb = engine.model("a").adapter, engine.model("b").adapter
    for path in ta.A:
        assert torch.equal(ta.A[path], tb.A[path]) and torch.equal(ta.B[path], tb.B[path])
    # two training requests on the same weights and data: two masks, two losses
    first = engine.forward_backward("a", ForwardBackwardInput(datums(9), "cross_entropy"))
    second = engine.forward_backward("a", ForwardBackwardInput(datums(9), "cross_entropy"))
    assert first.metrics["loss:sum"] != second.metrics["loss:sum"]


def test_forward_and_sampling_never_drop(engine, tmp_path):
    trained(engine, "d", 0.3)
    folder = tmp_path / "ckpt"
    engine.save("d", folder, "weights", "ckpt")
    engine.load_model("n", folder, with_optimizer=False, dropout=0.0)  # same weights, no dropout
    assert engine.model_info("n").lora.dropout == 0.0
    fwd = ForwardBackwardInput(datums(7), "cross_entropy", forward_only=True)
    d1, d2, n = (engine.forward_backward(m, fwd) for m in ("d", "d", "n"))
    for x, y, z in zip(d1.outputs, d2.outputs, n.outputs, strict=True):
        assert np.array_equal(x["logprobs"], y["logprobs"])
        assert np.array_equal(x["logprobs"], z["logprobs"])
    train = engine.forward_backward("d", ForwardBackwardInput(datums(7), "cross_entropy"))
    assert train.metrics["loss:sum"] != d1.metrics["loss:sum"]  # training passes do drop
    engine.add_sampler_snapshot("sd", "d")
    engine.add_sampler_snapshot("sn", "n")
    prompt = [int(t) for t in datums(8, 1)[0].tokens]
    results = []
    for sampler in ("sd", "sd", "sn"):
        request = SampleRequest(prompt=prompt, params=SamplingParams(max_tokens=4, seed=3),
                                num_samples=1, prompt_logprobs=True)
        results.append(engine.sample(sampler, request))
    for r in results[1:]:
        np.testing.assert_array_equal(r.prompt_logprobs, results[0].prompt_logprobs)
        assert [s.tokens for s in r.sequences] == [s.tokens for s in results[0].sequences]


def test_checkpoints_carry_alpha_and_dropout(engine, tmp_path):
    trained(engine, "c", 0.05, steps=1)
    folder = tmp_path / "c"
    engine.save("c", folder, "weights", "c")
    config = json.loads((folder / checkpoints.CONFIG_FILE).read_text())
    assert (config["lora_alpha"], config["lora_dropout"]) == (16.0, 0.05)
    loaded = peft.PeftConfig.from_pretrained(str(folder))
    assert (loaded.lora_alpha, loaded.lora_dropout) == (16.0, 0.05)
    info = engine.load_model("c2", folder, with_optimizer=True)
    assert (info.lora.alpha, info.lora.dropout, info.steps) == (16.0, 0.05, 1)
    assert engine.load_model("c3", folder, False, alpha=16.0).lora.alpha == 16.0
    with pytest.raises(UserError, match="lora_alpha 32.0 does not match"):
        engine.load_model("c4", folder, False, alpha=32.0)
    assert "c4" not in engine.models
    # a resumed run draws the masks the original draws at the same step
    for model_id in ("c", "c2"):
        engine.forward_backward(model_id, ForwardBackwardInput(datums(5), "cross_entropy"))
    ga = [p.grad for p in engine.model("c").adapter.parameters()]
    gb = [p.grad for p in engine.model("c2").adapter.parameters()]
    for g, h in zip(ga, gb, strict=True):
        assert torch.equal(g, h)


def test_merged_export_uses_the_adapters_own_alpha(engine, registry, tmp_path):
    """A run with alpha 8 (not the server's 32) merged by the export: the merged model's
    logprobs are the run's own `forward` logprobs."""
    from tuneforge.export.merged import merged_model

    trained(engine, "e", 0.05, steps=2)
    folder = tmp_path / "e"
    engine.save("e", folder, "sampler_weights", "e")
    assert json.loads((folder / checkpoints.CONFIG_FILE).read_text())["lora_alpha"] == 16.0
    data = datums(6, n=2)
    ours = engine.forward_backward("e", ForwardBackwardInput(data, "cross_entropy",
                                                             forward_only=True))
    model, _, _ = merged_model(folder, registry)
    with torch.no_grad():
        for d, out in zip(data, ours.outputs, strict=True):
            logits = model(input_ids=torch.from_numpy(d.tokens)[None]).logits[0].double()
            lp = torch.log_softmax(logits, -1).gather(
                -1, torch.from_numpy(d.inputs["target_tokens"])[:, None])[:, 0]
            np.testing.assert_allclose(lp.numpy(), out["logprobs"], rtol=0, atol=1e-4)


def test_config_refuses_bad_alpha_and_dropout():
    for bad in (-0.1, 1.0, math.nan):
        with pytest.raises(UserError, match=r"lora_dropout must be in the range \[0, 1\)"):
            LoRAConfig(rank=4, alpha=32.0, dropout=bad)
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(UserError, match="lora_alpha must be a finite number > 0"):
            LoRAConfig(rank=4, alpha=bad)
