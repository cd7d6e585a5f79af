"""Engine bookkeeping: sampler eviction to disk and back, and releasing a finished session."""

from __future__ import annotations

import numpy as np
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


def train_step(engine, model_id):
    tokens = np.arange(10, 30, dtype=np.int64)
    engine.forward_backward(model_id, ForwardBackwardInput(
        data=[Datum(tokens=tokens[:-1], inputs={"target_tokens": tokens[1:]})],
        loss_fn="cross_entropy"))
    engine.optim_step(model_id, AdamParams(learning_rate=1e-2))


def test_evicted_snapshots_are_spilled_and_reload_exactly(registry, tmp_path):
    engine = Engine(registry, Limits(), spill_dir=tmp_path, max_resident_samplers=2)
    engine.create_model("s1:train:0", MODEL, LoRAConfig(rank=4, alpha=32.0, seed=0))
    scores = {}
    for i in range(3):
        train_step(engine, "s1:train:0")
        engine.add_sampler_snapshot(f"s1:sample:{i}", "s1:train:0")
        scores[i] = engine.sample(f"s1:sample:{i}", PROBE).prompt_logprobs
    assert list(engine.samplers) == ["s1:sample:1", "s1:sample:2"]
    spilled = engine.spilled_sampler("s1:sample:0")
    assert spilled is not None and (spilled / "adapter_model.safetensors").exists()
    engine.add_sampler_from_checkpoint("s1:sample:0", spilled)
    again = engine.sample("s1:sample:0", PROBE).prompt_logprobs
    np.testing.assert_array_equal(again, scores[0])
    assert not np.array_equal(scores[0], scores[2])  # the snapshots really differ


def test_drop_session_forgets_only_that_session(registry, tmp_path):
    engine = Engine(registry, Limits(), spill_dir=tmp_path, max_resident_samplers=1)
    for session in ("a", "b"):
        engine.create_model(f"{session}:train:0", MODEL, LoRAConfig(rank=2, alpha=32.0))
        engine.add_sampler_snapshot(f"{session}:sample:0", f"{session}:train:0")
    assert engine.spilled_sampler("a:sample:0") is not None  # evicted when b's was added
    engine.drop_session("a")
    assert list(engine.models) == ["b:train:0"] and list(engine.samplers) == ["b:sample:0"]
    assert engine.spilled_sampler("a:sample:0") is None
    assert torch.is_tensor(engine.models["b:train:0"].adapter.parameters()[0])
