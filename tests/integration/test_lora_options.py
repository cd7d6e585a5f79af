"""A run's LoRA alpha and dropout, asked for through the SDK's user_metadata, on a real server:
the run trains with them, its checkpoints carry them (in PEFT's adapter_config.json), a state
loaded back keeps them, `forward` never drops, and bad values are refused by name."""

from __future__ import annotations

import json

import httpx
import numpy as np
import peft
import pytest
import tinker
from tinker import types

MODEL = "tuneforge/tiny-qwen3"
OPTIONS = {"lora_alpha": "8.0", "lora_dropout": "0.05"}


def datum(ids: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": np.array(ids[1:], dtype=np.int64),
                                       "weights": np.ones(len(ids) - 1, dtype=np.float32)})


DATA = [datum(list(range(5 + i, 40 + i))) for i in range(3)]


def logprobs(tc) -> list[np.ndarray]:
    out = tc.forward(DATA, "cross_entropy").result()
    return [np.asarray(o["logprobs"].data) for o in out.loss_fn_outputs]


@pytest.fixture(scope="module")
def trained(service_client):
    """A run with alpha 8 and dropout 0.05, trained 3 steps, and its saved state."""
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=16, seed=0,
                                                    user_metadata=OPTIONS).result()
    for _ in range(3):
        fb = tc.forward_backward(DATA, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        assert np.isfinite(fb.result().metrics["loss:sum"])
    path = tc.save_state("lora-options").result().path
    return tc, path


def checkpoint_folder(server, path: str):
    run_id, kind, name = path.removeprefix("tinker://").split("/")
    return server.data_dir / "checkpoints" / run_id / kind / name


def training_minus_forward(tc) -> float:
    """How far a training pass's loss is from `forward`'s, on the same weights."""
    forward_loss = tc.forward(DATA, "cross_entropy").result().metrics["loss:sum"]
    return abs(tc.forward_backward(DATA, "cross_entropy").result().metrics["loss:sum"]
               - forward_loss)


def test_forward_is_deterministic_and_training_drops(trained, service_client):
    tc, _ = trained
    first, second = logprobs(tc), logprobs(tc)
    for x, y in zip(first, second, strict=True):
        assert np.array_equal(x, y)
    # the same run without dropout: its training pass scores as `forward` does (to rounding)
    plain = service_client.create_lora_training_client(
        base_model=MODEL, rank=16, seed=0, user_metadata={"lora_alpha": "8.0"}).result()
    for _ in range(3):
        plain.forward_backward(DATA, "cross_entropy")
        plain.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    rounding = training_minus_forward(plain)
    assert training_minus_forward(tc) > 100 * rounding + 1e-3


def test_checkpoint_has_the_runs_alpha_and_dropout(trained, server):
    _, path = trained
    folder = checkpoint_folder(server, path)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["lora_alpha"], config["lora_dropout"], config["r"]) == (8.0, 0.05, 16)
    loaded = peft.PeftConfig.from_pretrained(str(folder))
    assert (loaded.lora_alpha, loaded.lora_dropout) == (8.0, 0.05)


def test_loaded_state_keeps_the_scaling(trained, service_client, server):
    tc, path = trained
    resumed = service_client.create_training_client_from_state_with_optimizer(path).result()
    # alpha 8 restored: the same outputs (the server's default alpha, 32, would change them)
    for x, y in zip(logprobs(resumed), logprobs(tc), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
    again = resumed.save_state("resumed").result().path
    config = json.loads((checkpoint_folder(server, again) / "adapter_config.json").read_text())
    assert (config["lora_alpha"], config["lora_dropout"]) == (8.0, 0.05)
    with pytest.raises(tinker.TinkerError) as info:
        service_client.create_training_client_from_state(
            path, user_metadata={"lora_alpha": "16"}).result()
    assert "lora_alpha 16.0 does not match the checkpoint's lora_alpha 8.0" in str(info.value)


@pytest.mark.parametrize("key,value,message", [
    ("lora_dropout", "1.0", "user_metadata.lora_dropout must be a number in the range [0, 1)"),
    ("lora_dropout", "-0.1", "user_metadata.lora_dropout must be a number in the range [0, 1)"),
    ("lora_dropout", "lots", "user_metadata.lora_dropout must be a number in the range [0, 1)"),
    ("lora_alpha", "0", "user_metadata.lora_alpha must be a number > 0"),
    ("lora_alpha", "nan", "user_metadata.lora_alpha must be a number > 0"),
])
def test_bad_values_are_refused_by_name(service_client, server, key, value, message):
    with pytest.raises(tinker.BadRequestError) as info:
        service_client.create_lora_training_client(base_model=MODEL, rank=4,
                                                   user_metadata={key: value}).result()
    assert message in str(info.value)
    headers = {"X-API-Key": server.api_key}
    session = httpx.post(f"{server.base_url}/api/v1/create_session", headers=headers,
                         json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"}
                         ).json()["session_id"]
    r = httpx.post(f"{server.base_url}/api/v1/create_model", headers=headers,
                   json={"session_id": session, "model_seq_id": 0, "base_model": MODEL,
                         "lora_config": {"rank": 4}, "user_metadata": {key: value}})
    assert r.status_code == 400
    assert message in r.json()["detail"]
    assert server.healthy()
