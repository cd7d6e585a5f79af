"""Engine bookkeeping: adapters leave memory beyond the budget and come back exactly, and a
finished session is released."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tuneforge.engine.engine import Engine
from tuneforge.engine.lora import LoRAConfig
from tuneforge.engine.optim import AdamParams
from tuneforge.engine.sampler import SampleRequest, SamplingParams
from tuneforge.engine.types import Datum, ForwardBackwardInput
from tuneforge.settings import Limits

MODEL = "tuneforge/tiny-qwen3"
PROBE = SampleRequest(prompt=[3, 4, 5, 6, 7], num_samples=1, prompt_logprobs=True,
                      params=SamplingParams(max_tokens=1, temperature=0.0))


def train_step(engine, model_id, seed=0, optim=True):
    tokens = np.random.default_rng(seed).integers(0, 8192, 20)
    engine.forward_backward(model_id, ForwardBackwardInput(
        data=[Datum(tokens=tokens[:-1], inputs={"target_tokens": tokens[1:]})],
        loss_fn="cross_entropy"))
    if optim:
        engine.optim_step(model_id, AdamParams(learning_rate=1e-2, weight_decay=0.1))


def test_offloaded_training_models_come_back_exactly(registry, tmp_path):
    tiny = Engine(registry, Limits(), offload_dir=tmp_path, adapter_memory_bytes=1)
    roomy = Engine(registry, Limits(), offload_dir=tmp_path / "unused")
    for engine in (tiny, roomy):
        for i, name in enumerate(("a", "b", "c")):
            engine.create_model(name, MODEL, LoRAConfig(rank=4 + i, alpha=32.0, seed=i))
        for step in range(2):
            for name in ("a", "b", "c"):
                train_step(engine, name, seed=step)
        train_step(engine, "a", seed=9, optim=False)  # "a" leaves with a pending gradient
        train_step(engine, "b", seed=9)
    # with a 1-byte budget only the model in use stays; the others went to disk, gradient
    # and optimizer state included
    assert tiny.residency_counts() == {"device": 1, "cpu": 0, "disk": 2}
    assert tiny.models["a"].where == "disk" and (tmp_path / "a.pt").exists()
    assert roomy.residency_counts() == {"device": 3, "cpu": 0, "disk": 0}
    for engine in (tiny, roomy):
        engine.optim_step("a", AdamParams(learning_rate=1e-2, weight_decay=0.1))
        train_step(engine, "c", seed=5)
    for name in ("a", "b", "c"):
        got, want = tiny.model(name), roomy.model(name)
        for x, y in zip(got.adapter.parameters(), want.adapter.parameters(), strict=True):
            assert torch.equal(x, y)
        assert got.optimizer.state_dict()["state"].keys() == \
            want.optimizer.state_dict()["state"].keys()
        for sx, sy in zip(got.optimizer.state_dict()["state"].values(),
                          want.optimizer.state_dict()["state"].values(), strict=True):
            assert all(torch.equal(sx[k], sy[k]) for k in sx)
    for name, tm in tiny.models.items():  # a file exactly for each model that is on disk
        assert (tmp_path / f"{name}.pt").exists() == (tm.where == "disk")


def test_evicted_snapshots_are_spilled_and_reload_exactly(registry, tmp_path):
    engine = Engine(registry, Limits(), spill_dir=tmp_path, offload_dir=tmp_path / "offload")
    engine.create_model("s1:train:0", MODEL, LoRAConfig(rank=4, alpha=32.0, seed=0))
    scores = {}
    for i in range(3):
        train_step(engine, "s1:train:0", seed=i)
        engine.add_sampler_snapshot(f"s1:sample:{i}", "s1:train:0")
        scores[i] = engine.sample(f"s1:sample:{i}", PROBE).prompt_logprobs
        if i == 1:  # from now on there is room for two snapshots beside the model
            engine.budget.limit = engine.budget.used
    assert "s1:sample:0" not in engine.samplers
    assert {"s1:sample:1", "s1:sample:2"} <= set(engine.samplers)
    assert engine.models["s1:train:0"].where == "device"
    spilled = engine.spilled_sampler("s1:sample:0")
    assert spilled is not None and (spilled / "adapter_model.safetensors").exists()
    engine.add_sampler_from_checkpoint("s1:sample:0", spilled)
    np.testing.assert_array_equal(engine.sample("s1:sample:0", PROBE).prompt_logprobs, scores[0])
    assert not np.array_equal(scores[0], scores[2])  # the snapshots really differ


def test_drop_forgets_only_that_prefix(registry, tmp_path):
    engine = Engine(registry, Limits(), spill_dir=tmp_path / "spill", offload_dir=tmp_path,
                    adapter_memory_bytes=1)
    for session in ("a", "b"):
        engine.create_model(f"{session}:train:0", MODEL, LoRAConfig(rank=2, alpha=32.0))
        engine.add_sampler_snapshot(f"{session}:sample:0", f"{session}:train:0")
    assert engine.spilled_sampler("a:sample:0") is not None  # evicted: over the budget
    assert engine.models["a:train:0"].where == "disk"
    engine.drop("a:")
    assert list(engine.models) == ["b:train:0"]
    assert "b:sample:0" in engine.samplers or engine.spilled_sampler("b:sample:0") is not None
    assert engine.spilled_sampler("a:sample:0") is None
    assert not (tmp_path / "a:train:0.pt").exists()
    assert ("model", "a:train:0") not in engine.budget.sizes


def test_base_models_share_a_memory_budget(models_dir):
    from tuneforge.engine.models import ModelRegistry
    from tuneforge.errors import LimitExceeded

    small, large = "tuneforge/tiny-qwen3", "tuneforge/tiny-qwen3-l"
    probe = ModelRegistry(models_dir, torch.device("cpu"))
    sizes = {name: probe.get(name).nbytes for name in (small, large)}
    registry = ModelRegistry(models_dir, torch.device("cpu"),
                             memory_bytes=max(sizes.values()) + min(sizes.values()) // 2)
    engine = Engine(registry, Limits())
    engine.create_model("s:train:0", small, LoRAConfig(rank=2, alpha=32.0))
    with pytest.raises(LimitExceeded, match="base_memory_mb"):
        registry.get(large)  # the small one is in use: the large one does not fit beside it
    assert registry.loaded() == [small]
    engine.drop("s:")  # nothing uses the small one any more
    assert registry.get(large).name == large and registry.loaded() == [large]
    engine.create_model("t:train:0", small, LoRAConfig(rank=2, alpha=32.0))  # loaded again
    assert registry.loaded() == [small]
