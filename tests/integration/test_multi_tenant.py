"""Many tenants at once on one base model: concurrent clients are batched together and still
get exactly what they get alone; the server reports its load at /metrics."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

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
                         env={"TUNEFORGE_MAX_MODELS_PER_KEY": "256"}).start()
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


ADAM = types.AdamParams(learning_rate=1e-2, eps=1e-8)
# A shared pass and a solo one over the same weights differ only in float32 rounding (seen:
# logprobs one ulp apart, 1e-6; gradient norms 7e-8 relative; losses equal). Another
# adapter's delta, another row or stale weights move them by far more.
LOSS_RTOL, LOGPROB_ATOL, GRAD_NORM_RTOL = 1e-6, 1e-5, 1e-5
# One Adam step from one state, taken with the shared pass's gradient or with the solo pass's:
# Adam divides by each gradient entry's magnitude, so the rounding difference can grow in the
# step (entries near zero may flip sign). Seen: 6e-8 relative in the next loss; 6e-6 with
# noise of 1e-7 of the largest entry added to every gradient entry. A lost, repeated or
# reordered step moves the loss by a whole step instead, more than 3 * STEP_RTOL (checked;
# the smallest step here moves it by 1.5e-3).
STEP_RTOL = 1e-4


@dataclass
class Step:
    """What one client got at one step of the concurrent run."""

    state: str  # save_state path of the weights and AdamW state the step started from
    loss: float
    logprobs: list[np.ndarray]
    grad_norm: float


def outputs(out: types.ForwardBackwardOutput) -> tuple[float, list[np.ndarray]]:
    return (out.metrics["loss:sum"],
            [o["logprobs"].to_numpy().astype(np.float64) for o in out.loss_fn_outputs])


def train_together(sc: tinker.ServiceClient, i: int, barrier: threading.Barrier,
                   runs: dict[int, tuple[list[Step], float]]) -> None:
    """Client i's ten steps, saving its state before each; then the final weights' loss."""
    tc = sc.create_lora_training_client(base_model=MODEL, rank=RANKS[i % len(RANKS)], seed=i,
                                        **TARGETS[i % len(TARGETS)]).result()
    data = client_data(i)
    barrier.wait(60)
    steps = []
    for k in range(STEPS):
        save = tc.save_state(f"client{i}-step{k}")
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(ADAM)
        steps.append(Step(save.result().path, *outputs(fb.result()),
                          opt.result().metrics["grad_norm:mean"]))
    runs[i] = (steps, tc.forward(data, "cross_entropy").result().metrics["loss:sum"])


def test_sixteen_concurrent_clients_match_their_solo_runs(busy_server, capsys):
    """Sixteen clients (ranks 1 to 128, four target sets) train ten steps at once, so their
    requests share passes; each step's forward_backward must give what a solo one gives from
    the same weights, and each step must follow from the one before.

    Not by comparing with a solo rerun of the whole loop: a shared pass runs the base model's
    matmuls over a batch of every client's rows, padded to the longest, and GEMMs of other
    shapes block and sum their products in another order, so a result can differ from the
    solo one in the last float32 bits (which clients share a pass, and so those bits, depends
    on timing). Adam then amplifies such a difference chaotically: it divides by each
    gradient entry's magnitude, so entries near zero step by up to the learning rate either
    way. A 1e-7 relative change of the first step's gradients moves client 8's loss by 0.2%
    at step 8 and client 9's by 1% at step 9; under CPU load, with passes made up otherwise,
    a whole-loop comparison saw client 8 0.3% off at steps 5 to 8.

    So the concurrent run saves its state before every step, and a fresh solo client made
    from each saved state (with its AdamW moments) replays that step: its forward_backward
    must match the shared pass's tightly (same weights, only rounding differs), and after its
    own Adam step its loss must match the next step's loss within one step's amplification
    of rounding, far below what a lost, repeated or reordered step would change."""
    sc = tinker.ServiceClient(base_url=busy_server.base_url, api_key=busy_server.api_key)
    runs: dict[int, tuple[list[Step], float]] = {}
    barrier = threading.Barrier(CLIENTS)
    threads = [threading.Thread(target=train_together, args=(sc, i, barrier, runs))
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert sorted(runs) == list(range(CLIENTS))
    batched = busy_server.metrics()
    passes = batched["tuneforge_batch_requests_count"]
    mean_requests = batched["tuneforge_batch_requests_sum"] / passes
    assert mean_requests > 2  # requests of different tenants really shared passes

    worst = {"loss": 0.0, "logprob": 0.0, "grad norm": 0.0, "next loss": 0.0}
    with tinker.ServiceClient(base_url=busy_server.base_url,
                              api_key=busy_server.api_key) as solo_sc:
        for i in range(CLIENTS):
            steps, final = runs[i]
            assert len(steps) == STEPS
            data = client_data(i)
            made = [solo_sc.create_training_client_from_state_with_optimizer(s.state)
                    for s in steps]
            replays = [m.result() for m in made]
            nexts = [s.loss for s in steps[1:]] + [final]
            for k, (step, rc, nxt) in enumerate(zip(steps, replays, nexts, strict=True)):
                what = f"client {i} step {k}"
                # every step moves the loss by more than the next-loss check could miss
                assert abs(nxt - step.loss) > 3 * STEP_RTOL * abs(nxt), what
                # this client's requests only, one after another: no pass is shared
                fb = rc.forward_backward(data, "cross_entropy")
                opt = rc.optim_step(ADAM)
                fwd = rc.forward(data, "cross_entropy")
                loss, logprobs = outputs(fb.result())
                grad_norm = opt.result().metrics["grad_norm:mean"]
                stepped = fwd.result().metrics["loss:sum"]
                assert loss == pytest.approx(step.loss, rel=LOSS_RTOL), what
                for a, b in zip(logprobs, step.logprobs, strict=True):
                    np.testing.assert_allclose(a, b, rtol=0, atol=LOGPROB_ATOL, err_msg=what)
                assert grad_norm == pytest.approx(step.grad_norm, rel=GRAD_NORM_RTOL), what
                assert stepped == pytest.approx(nxt, rel=STEP_RTOL), what
                worst["loss"] = max(worst["loss"], abs(loss / step.loss - 1))
                worst["logprob"] = max(worst["logprob"], *(
                    float(np.abs(a - b).max())
                    for a, b in zip(logprobs, step.logprobs, strict=True)))
                worst["grad norm"] = max(worst["grad norm"], abs(grad_norm / step.grad_norm - 1))
                worst["next loss"] = max(worst["next loss"], abs(stepped / nxt - 1))
    with capsys.disabled():
        print(f"\n{CLIENTS} clients x {STEPS} steps: {int(passes)} shared passes, "
              f"{mean_requests:.1f} requests per pass on average; largest difference from "
              "solo: " + ", ".join(f"{name} {value:.1e}" for name, value in worst.items()))


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
