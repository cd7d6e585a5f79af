"""Many tenants at once on one base model: concurrent clients are batched together and still
get exactly what they get alone; the server reports its load at /metrics."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.integration.server import ServerProcess

MODEL = "tuneforge/tiny-qwen3"
CLIENTS, STEPS = 16, 10
RANKS = [1, 2, 4, 8, 16, 32, 64, 128]
TARGETS = [dict(), dict(train_mlp=False), dict(train_attn=False, train_unembed=False),
           dict(train_attn=False, train_mlp=False)]


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory, models_dir) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("tenants"), models_dir,
                         env={"TUNEFORGE_MAX_MODELS_PER_KEY": "64"}).start()
    yield proc
    proc.stop()


def client_data(i: int) -> list[types.Datum]:
    rng = np.random.default_rng(i)
    out = []
    for length in (12 + i, 20):
        tokens = rng.integers(0, 8192, length + 1)
        out.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
                               loss_fn_inputs={"target_tokens": tokens[1:]}))
    return out


def train(sc: tinker.ServiceClient, i: int, losses: dict, barrier=None) -> None:
    tc = sc.create_lora_training_client(base_model=MODEL, rank=RANKS[i % len(RANKS)], seed=i,
                                        **TARGETS[i % len(TARGETS)]).result()
    data = client_data(i)
    if barrier is not None:
        barrier.wait(60)
    mine = []
    for _ in range(STEPS):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=1e-2, eps=1e-8))
        mine.append(fb.result().metrics["loss:sum"])
        opt.result()
    losses[i] = mine


def test_sixteen_concurrent_clients_match_their_solo_runs(busy_server, capsys):
    sc = tinker.ServiceClient(base_url=busy_server.base_url, api_key=busy_server.api_key)
    together: dict[int, list[float]] = {}
    barrier = threading.Barrier(CLIENTS)
    threads = [threading.Thread(target=train, args=(sc, i, together, barrier))
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert sorted(together) == list(range(CLIENTS))
    batched = busy_server.metrics()
    passes = batched["tuneforge_batch_requests_count"]
    mean_requests = batched["tuneforge_batch_requests_sum"] / passes

    alone: dict[int, list[float]] = {}
    for i in range(CLIENTS):  # the same clients, one after another
        train(sc, i, alone)
    with capsys.disabled():
        print(f"\n{CLIENTS} clients x {STEPS} steps: {int(passes)} shared passes, "
              f"{mean_requests:.1f} requests per pass on average")
    assert mean_requests > 2  # requests of different tenants really shared passes
    for i in range(CLIENTS):
        assert len(together[i]) == STEPS
        # One shared pass equals each request alone to 1e-5 (tests/unit/test_batching.py); ten
        # Adam steps at lr 1e-2 let those rounding differences grow (up to 1.7e-5 relative
        # seen at step 10), hence rtol 1e-4. A lost, repeated or reordered step would move a
        # loss by far more: consecutive losses differ by over 1e-3 (checked here).
        steps_apart = np.abs(np.diff(alone[i])) / np.abs(np.asarray(alone[i][1:]))
        assert steps_apart.min() > 1e-3, f"client {i}: {steps_apart}"
        np.testing.assert_allclose(together[i], alone[i], rtol=1e-4, atol=1e-4,
                                   err_msg=f"client {i}")


def test_metrics_endpoint_reports_the_load(busy_server):
    text = httpx.get(f"{busy_server.base_url}/metrics").text
    for name in ("tuneforge_queue_depth", "tuneforge_trained_tokens_total",
                 "tuneforge_batch_requests_bucket", "tuneforge_sampled_tokens_total",
                 "tuneforge_training_models", "tuneforge_adapter_memory_bytes",
                 "tuneforge_base_model_bytes", "tuneforge_process_max_resident_bytes"):
        assert f"\n{name}" in "\n" + text, name
    values = {line.split()[0]: line.split()[1] for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['tuneforge_base_model_bytes{base_model="tuneforge/tiny-qwen3"}'] != "0"


def test_two_base_models_serve_at_once(busy_server):
    """Each base model has its own queue; both train and sample side by side."""
    sc = tinker.ServiceClient(base_url=busy_server.base_url, api_key=busy_server.api_key)
    results: dict[str, list[float]] = {}

    def run(base: str) -> None:
        tc = sc.create_lora_training_client(base_model=base, rank=4, seed=0).result()
        data = client_data(3)
        losses = []
        for _ in range(4):
            fb = tc.forward_backward(data, "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=3e-3)).result()
            losses.append(fb.result().metrics["loss:sum"])
        sampler = tc.save_weights_and_get_sampling_client().result()
        out = sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 2,
                             types.SamplingParams(max_tokens=4, stop=[])).result()
        assert all(len(s.tokens) == 4 for s in out.sequences)
        results[base] = losses

    bases = (MODEL, "tuneforge/tiny-qwen3-l")
    threads = [threading.Thread(target=run, args=(b,)) for b in bases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert set(results) == set(bases)
    assert all(r[-1] < r[0] for r in results.values()), results
    text = httpx.get(f"{busy_server.base_url}/metrics").text
    assert 'base_model="tuneforge/tiny-qwen3-l"' in text
