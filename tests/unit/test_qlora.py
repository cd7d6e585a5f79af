"""4-bit base models (bitsandbytes NF4/FP4) in the engine: the same math as a dense twin that
holds the dequantized weights, a packed base nothing changes, gradient checkpointing that
changes no result, and loud refusals of what cannot work."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from tuneforge.engine import checkpointing, hardware, lora, quantized
from tuneforge.engine.engine import Engine
from tuneforge.engine.lora import LoRAConfig
from tuneforge.engine.models import ModelRegistry
from tuneforge.engine.optim import AdamParams
from tuneforge.engine.sampler import SampleRequest, SamplingParams
from tuneforge.engine.types import Datum, ForwardBackwardInput
from tuneforge.errors import Unsupported, UserError
from tuneforge.settings import Limits, ModelSpec, Settings

TINY = "tuneforge/tiny-qwen3"
NF4 = f"{TINY}@nf4"


def data(seed: int, lengths=(9, 14, 5)) -> list[Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        weights = rng.uniform(0.0, 1.0, n).astype(np.float32)
        out.append(Datum(tokens=rng.integers(0, 8192, n),
                         inputs={"target_tokens": rng.integers(0, 8192, n), "weights": weights}))
    return out


def fb(engine: Engine, model_id: str, rows: list[Datum], forward_only: bool = False):
    return engine.forward_backward(model_id, ForwardBackwardInput(
        data=rows, loss_fn="cross_entropy", forward_only=forward_only))


def perturb(adapter: lora.Adapter, seed: int = 1) -> None:
    """Non-zero B, so gradients reach A and the adapter changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in adapter.B.values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)


def grads(adapter: lora.Adapter) -> list[torch.Tensor]:
    return [p.grad.clone() for p in adapter.parameters()]


def assert_grads_close(ours, theirs, rel: float) -> None:
    for a, b in zip(ours, theirs, strict=True):
        scale = float(b.abs().max()) + 1e-12
        assert float((a - b).abs().max()) <= rel * scale


@pytest.fixture(scope="module")
def registry(models_dir) -> ModelRegistry:
    return ModelRegistry(models_dir, torch.device("cpu"))


@pytest.fixture()
def engine(registry) -> Engine:
    return Engine(registry, Limits())


def twin_registry(registry: ModelRegistry, name: str) -> ModelRegistry:
    """A registry serving, under `name`, the dense twin of the quantized base: the same model
    with every 4-bit layer replaced by an fp32 linear holding its dequantized weight."""
    twin = ModelRegistry(registry.models_dir, registry.device)
    base = copy.copy(registry.get(name))
    base.model = quantized.dequantize(registry.load_copy(name))
    base.router, base.targets = lora.inject(base.model)
    checkpointing.install(base.model, base.router)
    base.quantization = None
    twin._loaded[name] = base
    return twin


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_4bit_loss_logprobs_and_lora_gradients_equal_the_dense_twin(registry, kind):
    name = f"{TINY}@{kind}"
    q_engine = Engine(registry, Limits())
    d_engine = Engine(twin_registry(registry, name), Limits())
    rows = data(0)
    results = []
    for eng in (q_engine, d_engine):
        tm = eng.model(eng.create_model("m", name, LoRAConfig(rank=4, alpha=32.0, seed=0)).model_id)
        perturb(tm.adapter)
        results.append((fb(eng, "m", rows), grads(tm.adapter)))
    (q_out, q_grads), (d_out, d_grads) = results
    assert q_engine.models["m"].base.quantization == kind
    assert q_out.metrics["loss:sum"] == pytest.approx(d_out.metrics["loss:sum"], rel=1e-5)
    for a, b in zip(q_out.outputs, d_out.outputs, strict=True):
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-5)
    assert_grads_close(q_grads, d_grads, rel=1e-5)


def test_the_base_is_really_quantized_and_smaller(registry):
    dense, nf4, fp4 = registry.get(TINY), registry.get(NF4), registry.get(f"{TINY}@fp4")
    layers = quantized.quantized_layers(nf4.model)
    adapted = {p for g in ("attn", "mlp") for p in nf4.targets[g]}
    assert {p.removesuffix(".base") for p, _ in layers} == adapted
    head = nf4.model.get_output_embeddings()
    assert type(getattr(head, "base", head)) is torch.nn.Linear  # lm_head stays full precision

    def rel_error(base):
        errs = []
        for path, layer in quantized.quantized_layers(base.model):
            w = dense.model.get_submodule(path).weight  # path ends in the wrapper's .base
            errs.append(float((quantized.dequantized_weight(layer) - w).norm() / w.norm()))
        return float(np.mean(errs))

    # NF4 on Gaussian weights: ~9 % relative error; FP4 ~11 %; 0 would mean not quantized
    assert 0.06 < rel_error(nf4) < 0.105 < rel_error(fp4) < 0.13
    packed = sum(quantized.nbytes(layer) for _, layer in layers)
    full = sum(layer.in_features * layer.out_features * 4 for _, layer in layers)
    assert packed <= 0.14 * full
    # everything else (embeddings, lm_head, norms) stays as it was
    assert nf4.nbytes == dense.nbytes - full + packed


def test_packed_base_is_bit_identical_after_optim_step(engine, registry):
    base = registry.get(NF4)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    engine.create_model("m", NF4, LoRAConfig(rank=8, alpha=32.0, seed=0))
    for _ in range(2):
        fb(engine, "m", data(1))
        engine.optim_step("m", AdamParams(learning_rate=1e-2))
    after = base.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert engine.models["m"].adapter.A[base.targets["attn"][0]].dtype == torch.float32


def test_sampling_between_steps_leaves_training_unchanged(registry):
    """The decoder reads the same 4-bit weights under no_grad; on CPUs with AVX512-BF16 that
    once repacked them into a layout with no backward (see engine/quantized.py)."""
    rows, prompt = data(2), [5, 6, 7, 8]
    alone = Engine(registry, Limits())
    tm = alone.model(alone.create_model("m", NF4, LoRAConfig(rank=4, alpha=32.0, seed=0)).model_id)
    perturb(tm.adapter)
    fb(alone, "m", rows)
    expected = grads(tm.adapter)

    mixed = Engine(registry, Limits())
    tm = mixed.model(mixed.create_model("m", NF4, LoRAConfig(rank=4, alpha=32.0, seed=0)).model_id)
    perturb(tm.adapter)
    mixed.add_sampler_snapshot("s", "m")
    mixed.add_sampler_for_base("b", NF4)
    request = SampleRequest(prompt=prompt, num_samples=1,
                            params=SamplingParams(max_tokens=6, temperature=0.0))
    first = mixed.sample("s", request).sequences[0].tokens
    mixed.sample("b", request)
    fb(mixed, "m", rows)
    assert_grads_close(grads(tm.adapter), expected, rel=1e-6)
    assert mixed.sample("s", request).sequences[0].tokens == first


def test_mixed_pass_of_adapters_on_the_4bit_base_equals_each_alone(registry):
    configs = {"a": (1, True, True), "b": (8, True, False), "c": (16, False, True)}
    rows = {k: data(10 + i, lengths=(6 + 3 * i, 4)) for i, k in enumerate(configs)}

    def make(eng: Engine, key: str) -> lora.Adapter:
        rank, attn, mlp = configs[key]
        eng.create_model(key, NF4, LoRAConfig(rank=rank, alpha=32.0, train_attn=attn,
                                              train_mlp=mlp, train_unembed=False, seed=3))
        tm = eng.model(key)
        perturb(tm.adapter, seed=rank)
        return tm.adapter

    together = Engine(registry, Limits())
    adapters = {k: make(together, k) for k in configs}
    outs = together.forward_backward_batch(
        [(k, ForwardBackwardInput(data=rows[k], loss_fn="cross_entropy")) for k in configs])
    for key, out in zip(configs, outs, strict=True):
        alone = Engine(registry, Limits())
        adapter = make(alone, key)
        solo = fb(alone, key, rows[key])
        # fp32 rounding differs with the batch shape (measured up to 1.3e-5 of the largest
        # gradient); a row routed to the wrong adapter would be off by O(1)
        assert out.metrics["loss:sum"] == pytest.approx(solo.metrics["loss:sum"], rel=1e-5)
        assert_grads_close(grads(adapters[key]), grads(adapter), rel=1e-4)


@pytest.mark.parametrize("name", [TINY, NF4])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(registry, name):
    results = []
    for checkpoint in (False, True):
        eng = Engine(registry, Limits())
        tm = eng.model(eng.create_model("m", name, LoRAConfig(rank=4, alpha=32.0, seed=0),
                              gradient_checkpointing=checkpoint).model_id)
        perturb(tm.adapter)
        results.append((fb(eng, "m", data(4)).metrics["loss:sum"], grads(tm.adapter)))
    (loss, g), (loss_ckpt, g_ckpt) = results
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert_grads_close(g_ckpt, g, rel=1e-6)


def test_gradient_checkpointing_recomputes_in_the_backward_pass(registry):
    """Checkpointed layers really run their forward twice (once more in the backward pass)."""
    eng = Engine(registry, Limits())
    eng.create_model("m", NF4, LoRAConfig(rank=4, alpha=32.0, seed=0),
                     gradient_checkpointing=True)
    eng.create_model("plain", NF4, LoRAConfig(rank=4, alpha=32.0, seed=0))
    layer = checkpointing.decoder_layers(registry.get(NF4).model)[0]
    calls = []
    hook = layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        fb(eng, "plain", data(5, lengths=(6,)))
        plain = len(calls)
        fb(eng, "m", data(5, lengths=(6,)))
    finally:
        hook.remove()
    assert (plain, len(calls) - plain) == (1, 2)


def test_bad_quantization_requests_fail_alone(engine, registry):
    with pytest.raises(UserError, match="quantization.*'q3'.*nf4, fp4, int8"):
        engine.create_model("x", f"{TINY}@q3", LoRAConfig(rank=4, alpha=32.0))
    with pytest.raises(Unsupported, match="int8 needs a CUDA device"):
        engine.create_model("y", f"{TINY}@int8", LoRAConfig(rank=4, alpha=32.0))
    assert "x" not in engine.models and "y" not in engine.models
    engine.create_model("z", NF4, LoRAConfig(rank=4, alpha=32.0, seed=0))
    assert fb(engine, "z", data(6)).metrics["loss:sum"] > 0
    with pytest.raises(Exception, match="model_aliases"):
        Settings(model_aliases={"q": {"model": TINY, "quantization": "nf3"}})


def first_quantized(model):
    return quantized.quantized_layers(model)[0][1]


@pytest.mark.parametrize("move", [
    lambda m: m.to("cpu"), lambda m: m.cpu(), lambda m: first_quantized(m).to(torch.float32),
    lambda m: first_quantized(m).float()], ids=["model.to", "model.cpu", "layer.to", "layer.float"])
def test_moving_a_quantized_base_is_refused_not_corrupted(registry, move):
    base = registry.get(NF4)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    with pytest.raises(Unsupported, match=r"quantization=nf4.*\.to.*corrupt"):
        move(base.model)
    after = base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_alias_objects_name_a_quantized_base(models_dir):
    reg = ModelRegistry(models_dir, torch.device("cpu"), aliases={
        "tiny-4bit": ModelSpec(model=TINY, quantization="nf4", gradient_checkpointing=True),
        "plain": NF4})
    assert reg.spec("tiny-4bit").quantized == "nf4"
    assert reg.spec("plain") == ModelSpec(model=TINY, quantization="nf4")
    assert reg.resolve("tiny-4bit") == reg.resolve(TINY)
    base = reg.get("tiny-4bit")
    assert (base.quantization, base.gradient_checkpointing) == ("nf4", True)
    assert "tiny-4bit" in reg.offered()


def test_checkpoints_of_a_4bit_run_resume_on_the_4bit_base(engine, tmp_path):
    engine.create_model("m", NF4, LoRAConfig(rank=4, alpha=32.0, seed=0))
    fb(engine, "m", data(7))
    engine.optim_step("m", AdamParams(learning_rate=1e-2))
    engine.save("m", tmp_path / "ck", "weights", "ck")
    meta = json.loads((tmp_path / "ck" / "tuneforge.json").read_text())
    assert (meta["base_model"], meta["quantization"]) == (NF4, "nf4")
    resumed = engine.model(engine.load_model("r", tmp_path / "ck", with_optimizer=True).model_id)
    assert resumed.base is engine.models["m"].base
    for eng_id in ("m", "r"):
        fb(engine, eng_id, data(8))
        engine.optim_step(eng_id, AdamParams(learning_rate=1e-2))
    for p, q in zip(engine.models["m"].adapter.parameters(),
                    engine.models["r"].adapter.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(("setting", "device", "flags", "chosen"), [
    ("auto", "cpu", {"avx2", "avx512f", "avx512_bf16"}, "bf16"),
    ("auto", "cpu", {"avx2", "amx_bf16"}, "bf16"),
    ("auto", "cpu", {"avx2", "avx512f"}, "fp32"),
    ("auto", "cuda", set(), "bf16"),
    ("fp32", "cuda", set(), "fp32"),
    ("bf16", "cpu", set(), "bf16"),
])
def test_dtype_auto_picks_bf16_only_where_it_is_fast(setting, device, flags, chosen):
    dtype, why = hardware.choose_dtype(setting, torch.device(device), flags)
    assert dtype == chosen and why


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert hardware.cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert hardware.cpu_flags(tmp_path / "missing") == set()


def test_a_pre_quantized_checkpoint_is_refused_with_the_way_out(registry, tmp_path):
    import shutil

    folder = tmp_path / "prequantized"
    shutil.copytree(registry.resolve(TINY), folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(Unsupported, match="pre-quantized checkpoint.*@nf4"):
        registry.get(str(folder))
