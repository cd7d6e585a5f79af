"""Bad requests fail their own future with a message naming the field and the limit; the
server keeps serving and a failed request leaves no gradient behind."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tinker
from tinker import types
from tinker.lib.public_interfaces.training_client import TrainingClient

from tests.integration.server import ServerProcess

MODEL = "tuneforge/tiny-qwen3"
VOCAB = 8192


@pytest.fixture(scope="module")
def limited(tmp_path_factory, models_dir) -> Iterator[ServerProcess]:
    env = {
        "TUNEFORGE_LIMIT_MAX_TOKENS_PER_REQUEST": "64",
        "TUNEFORGE_LIMIT_MAX_DATUMS_PER_REQUEST": "4",
        "TUNEFORGE_LIMIT_MAX_SAMPLE_TOKENS": "16",
        "TUNEFORGE_LIMIT_MAX_SAMPLES_PER_REQUEST": "4",
    }
    proc = ServerProcess(tmp_path_factory.mktemp("limited"), models_dir, env=env).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(limited):
    sc = tinker.ServiceClient(base_url=limited.base_url, api_key=limited.api_key)
    return sc.create_lora_training_client(base_model=MODEL, rank=4, seed=0).result()


def datum(tokens, targets=None, weights=None) -> types.Datum:
    targets = list(tokens[1:]) + [0] if targets is None else targets
    weights = np.ones(len(targets), np.float32) if weights is None else weights
    return types.Datum(model_input=types.ModelInput.from_ints(list(tokens)),
                       loss_fn_inputs={"target_tokens": np.array(targets, dtype=np.int64),
                                       "weights": np.asarray(weights, dtype=np.float32)})


GOOD = datum([5, 6, 7, 8, 9])


def failure(future) -> str:
    with pytest.raises(tinker.RequestFailedError) as info:
        future.result()
    return str(info.value)


def probe_loss(client) -> float:
    return client.forward([GOOD], "cross_entropy").result().metrics["loss:sum"]


@pytest.mark.parametrize(
    "data, loss_fn, expected",
    [
        ([datum([5, 6, VOCAB + 7])], "cross_entropy",
         ["data[0].model_input", f"token id {VOCAB + 7}", f"[0, {VOCAB})"]),
        ([datum([5, 6, 7], targets=[6, 7, -3])], "cross_entropy",
         ["target_tokens", "token id -3", "vocabulary"]),
        ([datum([5, 6, 7], targets=[6, 7])], "cross_entropy",
         ["target_tokens", "[2]", "3 tokens"]),
        ([datum([5, 6, 7], weights=[1.0, 1.0])], "cross_entropy",
         ["weights", "[2]", "[3]"]),
        ([datum(list(range(1, 101)))], "cross_entropy",
         ["100 tokens", "max_tokens_per_request=64"]),
        ([GOOD] * 5, "cross_entropy", ["5 datums", "max_datums_per_request=4"]),
        ([GOOD], "not_a_loss", ["loss_fn 'not_a_loss'", "cross_entropy"]),
        ([GOOD], "ppo", ["loss_fn 'ppo' requires 'logprobs'"]),
        ([GOOD], "stable_reinforce", ["loss_fn 'stable_reinforce' is not supported"]),
        ([datum([5, 6, 7], weights=[1.0, float("nan"), 1.0])], "cross_entropy",
         ["weights", "NaN"]),
    ],
    ids=["token-out-of-vocab", "negative-target", "target-length", "weights-length",
         "over-token-limit", "over-datum-limit", "unknown-loss", "missing-input",
         "unsupported-loss", "nan-weight"],
)
def test_bad_forward_backward_fails_its_future_and_leaves_no_gradient(
        client, limited, data, loss_fn, expected):
    before = probe_loss(client)
    message = failure(client.forward_backward(data, loss_fn))
    for fragment in expected:
        assert fragment in message, message
    # No gradient was accumulated: a fresh-moment Adam step on a zero gradient moves nothing.
    client.optim_step(types.AdamParams(learning_rate=0.1)).result()
    assert probe_loss(client) == before
    assert limited.healthy()


def test_bad_optimizer_hyperparameters(client):
    message = failure(client.optim_step(types.AdamParams(learning_rate=-1.0)))
    assert "adam_params.learning_rate" in message
    message = failure(client.optim_step(types.AdamParams(beta2=1.5)))
    assert "adam_params.beta2" in message and "[0, 1)" in message


def test_bad_sampling_requests(client):
    sampler = client.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints([5, 6, 7])
    cases = [
        (prompt, 1, types.SamplingParams(max_tokens=17), ["max_tokens", "max_sample_tokens=16"]),
        (prompt, 5, types.SamplingParams(max_tokens=2),
         ["num_samples", "max_samples_per_request=4"]),
        (types.ModelInput.from_ints([5, VOCAB]), 1, types.SamplingParams(max_tokens=2),
         ["prompt", f"token id {VOCAB}"]),
        (prompt, 1, types.SamplingParams(max_tokens=2, top_p=0.0), ["top_p", "(0, 1]"]),
        (prompt, 1, types.SamplingParams(max_tokens=2, temperature=-1), ["temperature"]),
    ]
    for model_input, n, params, expected in cases:
        message = failure(sampler.sample(model_input, n, params))
        for fragment in expected:
            assert fragment in message, message
    ok = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=3)).result()
    assert len(ok.sequences[0].tokens) <= 3


def test_unknown_model_id_fails_the_future(limited, client):
    holder = tinker.ServiceClient(base_url=limited.base_url, api_key=limited.api_key).holder
    ghost = TrainingClient(holder, 7, "s-nobody:train:7", info=client.get_info())
    message = failure(ghost.forward([GOOD], "cross_entropy"))
    assert "s-nobody:train:7" in message and "not a training model" in message
    assert limited.healthy()


def test_unknown_base_model_fails_clearly(limited):
    sc = tinker.ServiceClient(base_url=limited.base_url, api_key=limited.api_key)
    with pytest.raises(tinker.RequestFailedError) as info:
        sc.create_lora_training_client(base_model="/nonexistent/model-dir", rank=4).result()
    assert "base_model '/nonexistent/model-dir'" in str(info.value)
    with pytest.raises(tinker.RequestFailedError) as info:
        sc.create_lora_training_client(base_model=MODEL, rank=4096).result()
    assert "max_lora_rank=128" in str(info.value)


@pytest.mark.parametrize("key", [None, "tml-not-a-real-key"])
def test_missing_or_wrong_api_key_is_401_json(limited, key):
    headers = {"X-API-Key": key} if key else {}
    r = httpx.post(f"{limited.base_url}/api/v1/create_session", headers=headers,
                   json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"})
    assert r.status_code == 401
    assert "API key" in r.json()["detail"]


def test_sdk_with_wrong_key_gets_authentication_error(limited):
    sc = tinker.ServiceClient(base_url=limited.base_url, api_key="tml-wrong")
    with pytest.raises(tinker.AuthenticationError):
        sc.create_lora_training_client(base_model=MODEL, rank=4).result()
    assert limited.healthy()
