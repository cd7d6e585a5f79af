"""QLoRA through the real SDK: SmolLM2-135M-Instruct served 4-bit (NF4) under an operator alias.

One server serves the 4-bit alias `smollm2-4bit`, the same model unquantized (to compare
memory) and a cookbook model name aliased to the 4-bit model (the cookbook's recipes need a name
they know). Every test drives it with the `tinker` SDK, or runs the cookbook unmodified.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import tinker
from tinker import types

from tests.integration import cookbook_offline as offline
from tests.integration.server import ServerProcess
from tests.integration.test_cookbook import checkpoint, env_for, recipe, tuneforge
from tests.integration.test_smollm2 import CHATS, chat_datum

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALIAS = "smollm2-4bit"
COOKBOOK_AS = "Qwen/Qwen3-30B-A3B-Instruct-2507"  # a name the cookbook knows, served 4-bit
NF4 = {"model": MODEL, "quantization": "nf4"}
ALIASES = {ALIAS: NF4, COOKBOOK_AS: NF4}
ADAM = types.AdamParams(learning_rate=1e-3)
# Embeddings stay fp32 (transformers quantizes linear layers only; SmolLM2's lm_head is tied to
# them), so 4-bit SmolLM2-135M holds about 0.31 of the fp32 model's bytes, not 1/8.
MAX_BYTES_RATIO = 0.45
# Two clients batched into one pass get their solo results up to float32 rounding (the bounds
# of test_multi_tenant.py: equal weights → losses within 1e-6; after Adam steps, which divide
# by each gradient entry, within 1e-4). Seen here: equal. One step moves the loss by >50%.
LOSS_RTOL, STEP_RTOL = 1e-6, 1e-4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory, models_dir) -> Iterator[tuple[ServerProcess, dict]]:
    """The server, and the environment the cookbook runs in (its no_robots = short chats)."""
    hf_home = tmp_path_factory.mktemp("hf-qlora")
    env = env_for(hf_home, ALIASES)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
             "category": "chat"} for q, a in CHATS * 4]
    offline.install_dataset(hf_home, "HuggingFaceH4/no_robots", "default", rows)
    server = ServerProcess(tmp_path_factory.mktemp("qlora-server"), models_dir,
                           env={k: env[k] for k in ("HF_HOME", "TUNEFORGE_MODEL_ALIASES")},
                           preload=(ALIAS, MODEL, COOKBOOK_AS)).start()
    yield server, env
    server.stop()


@pytest.fixture(scope="module")
def server(setup) -> ServerProcess:
    return setup[0]


@pytest.fixture(scope="module")
def sc(server) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)


def base_bytes(server: ServerProcess) -> dict[str, float]:
    prefix = 'tuneforge_base_model_bytes{base_model="'
    return {k[len(prefix):-2]: v for k, v in server.metrics().items() if k.startswith(prefix)}


def batch_counts(server: ServerProcess) -> tuple[float, float]:
    """(requests, passes) the engine has run: more requests than passes = some shared a pass."""
    m = server.metrics()
    return m["tuneforge_batch_requests_sum"], m["tuneforge_batch_requests_count"]


def short_datum(tok, i: int = 0) -> types.Datum:
    return chat_datum(tok, *CHATS[i])


def step(tc, data: list[types.Datum]) -> float:
    fb = tc.forward_backward(data, "cross_entropy")
    tc.optim_step(ADAM).result()
    return fb.result().metrics["loss:sum"]


def run_losses(tc, data: list[types.Datum], steps: int = 2) -> list[float]:
    """The loss of each of `steps` steps, then the loss after the last."""
    losses = [step(tc, data) for _ in range(steps)]
    return losses + [tc.forward(data, "cross_entropy").result().metrics["loss:sum"]]


def failure(call) -> Exception:
    """What a bad request raises: at once (400) or from its future."""
    with pytest.raises(tinker.TinkerError) as info:
        out = call()
        if hasattr(out, "result"):
            out.result()
    return info.value


def test_capabilities_list_the_alias_and_4_bit_is_smaller(server, capsys):
    rest = tinker.RestClient(base_url=server.base_url, api_key=server.api_key)
    names = [m.model_name for m in rest.get_server_capabilities().result().supported_models]
    assert ALIAS in names and COOKBOOK_AS in names
    sizes = base_bytes(server)
    ratio = sizes[ALIAS] / sizes[MODEL]
    with capsys.disabled():
        print(f"\nbase_model_bytes: {ALIAS} {sizes[ALIAS] / 2**20:.0f} MiB, {MODEL} "
              f"{sizes[MODEL] / 2**20:.0f} MiB (ratio {ratio:.3f})")
    assert sizes[ALIAS] == sizes[COOKBOOK_AS]
    assert 0.2 < ratio <= MAX_BYTES_RATIO


@dataclass
class Sft:
    tc: object
    tok: object
    data: list[types.Datum]
    n_tokens: float
    losses: list[float]  # per token


@pytest.fixture(scope="module")
def sft(sc) -> Sft:
    tc = sc.create_lora_training_client(base_model=ALIAS, rank=8, seed=0).result()
    tok = tc.get_tokenizer()
    data = [chat_datum(tok, q, a) for q, a in CHATS]
    n_tokens = sum(float(d.loss_fn_inputs["weights"].to_numpy().sum()) for d in data)
    losses = [step(tc, data) / n_tokens for _ in range(5)]
    return Sft(tc, tok, data, n_tokens, losses)


def test_sft_lowers_the_loss_and_samples_text(sft, capsys):
    sampler = sft.tc.save_weights_and_get_sampling_client().result()
    prompt = sft.tok.apply_chat_template([{"role": "user", "content": "What do bees make?"}],
                                         add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
    seq = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                         types.SamplingParams(max_tokens=16, temperature=0.0)).result().sequences[0]
    text = sft.tok.decode(seq.tokens, skip_special_tokens=True)
    with capsys.disabled():
        print(f"\n{ALIAS} SFT per-token loss: {[round(x, 3) for x in sft.losses]}; "
              f"'What do bees make?' -> {text!r} ({seq.stop_reason})")
    assert sft.losses[-1] < 0.7 * sft.losses[0]
    assert text.strip() and seq.stop_reason in ("stop", "length")
    if seq.stop_reason == "stop":
        assert seq.tokens[-1] == sft.tok.convert_tokens_to_ids("<|im_end|>")


def test_resume_with_optimizer_continues_exactly(sc, sft, capsys):
    """[the step's loss, the loss after it] of the original client continuing, of a client
    resumed from its state with the optimizer, and of one resumed without it."""
    path = sft.tc.save_state("qlora-resume").result().path
    resumed = sc.create_training_client_from_state_with_optimizer(path).result()
    fresh = sc.create_training_client_from_state(path).result()
    data = sft.data[:2]
    continued, again, without = (run_losses(tc, data, 1) for tc in (sft.tc, resumed, fresh))
    with capsys.disabled():
        print(f"\nresume: original {continued}, with optimizer {again}, without {without}")
    np.testing.assert_allclose(again, continued, rtol=1e-6, atol=0)
    assert without[0] == pytest.approx(continued[0], rel=1e-6)  # the same weights, ...
    assert abs(without[1] - continued[1]) > 1e-3 * continued[1]  # ... the optimizer state mattered


def test_cookbook_sl_loop_trains_on_the_4_bit_model(setup, sc, tmp_path, capsys):
    server, env = setup
    before = base_bytes(server)
    tuneforge(env, server, "cache-tokenizer", COOKBOOK_AS)
    metrics = recipe("sl_loop", server, env, tmp_path / "sl", model_name=COOKBOOK_AS,
                     batch_size=4, max_steps=3, learning_rate=2e-3, lora_rank=8,
                     max_length=64)
    nll = [m["train_mean_nll"] for m in metrics]
    with capsys.disabled():
        print(f"\nsl_loop on {COOKBOOK_AS} (SmolLM2 nf4): train_mean_nll "
              f"{[round(x, 3) for x in nll]}")
    assert len(nll) == 3 and all(0 < x < 20 for x in nll)
    assert nll[-1] < 0.8 * nll[0]  # seen: 1.48 -> 0.53, 0.57 (the recipe seeds nothing)
    final = checkpoint(tmp_path / "sl")
    run = tinker.RestClient(base_url=server.base_url, api_key=server.api_key) \
        .get_training_run_by_tinker_path(final).result()
    assert run.base_model == COOKBOOK_AS
    assert base_bytes(server) == before  # trained on the preloaded 4-bit copy


@pytest.fixture(scope="module")
def solo(sc) -> dict[int, list[float]]:
    """Two short runs alone, seeds 1 and 2: the losses concurrent and checkpointed runs must
    reproduce."""
    out = {}
    for seed in (1, 2):
        tc = sc.create_lora_training_client(base_model=ALIAS, rank=8, seed=seed).result()
        out[seed] = run_losses(tc, [short_datum(tc.get_tokenizer(), seed)])
    return out


def test_two_concurrent_clients_share_the_base_and_get_their_solo_losses(server, sc, sft, solo,
                                                                         capsys):
    """Both clients' requests are queued together behind a slower request of a third, so the
    engine runs each of their steps as one shared pass over the one 4-bit copy."""
    before, counts = base_bytes(server), batch_counts(server)
    clients = {seed: sc.create_lora_training_client(base_model=ALIAS, rank=8, seed=seed)
               .result() for seed in (1, 2)}
    data = {seed: [short_datum(tc.get_tokenizer(), seed)] for seed, tc in clients.items()}
    got: dict[int, list[float]] = {seed: [] for seed in clients}
    for i in range(3):  # two steps, then the loss after them, as in `run_losses`
        busy = sft.tc.forward(sft.data, "cross_entropy")
        time.sleep(0.2)  # the engine is on `busy` now
        passes = {seed: tc.forward_backward(data[seed], "cross_entropy") if i < 2
                  else tc.forward(data[seed], "cross_entropy") for seed, tc in clients.items()}
        steps = [tc.optim_step(ADAM) for tc in clients.values()] if i < 2 else []
        busy.result()
        for seed, future in passes.items():
            got[seed].append(future.result().metrics["loss:sum"])
        for future in steps:
            future.result()
    requests, passes_run = (a - b for a, b in zip(batch_counts(server), counts, strict=True))
    with capsys.disabled():
        print(f"\nconcurrent {got}\nsolo       {solo}\n{requests:.0f} forward(_backward) "
              f"requests in {passes_run:.0f} passes")
    for seed in got:
        np.testing.assert_allclose(got[seed][0], solo[seed][0], rtol=LOSS_RTOL, atol=0)
        np.testing.assert_allclose(got[seed][1:], solo[seed][1:], rtol=STEP_RTOL, atol=0)
    assert abs(got[1][0] - got[2][0]) > 1.0  # the two runs are told apart
    assert requests > passes_run  # they did share passes
    assert base_bytes(server) == before  # one 4-bit copy for both


def test_gradient_checkpointing_gives_the_same_losses(sc, solo, capsys):
    tc = sc.create_lora_training_client(base_model=ALIAS, rank=8, seed=1,
                                        user_metadata={"gradient_checkpointing": "true"}
                                        ).result()
    losses = run_losses(tc, [short_datum(tc.get_tokenizer(), 1)])
    with capsys.disabled():
        print(f"\ngradient checkpointing {losses}, without {solo[1]}")
    np.testing.assert_allclose(losses, solo[1], rtol=1e-6, atol=0)


def test_bad_quantizations_and_metadata_are_clear_errors(server, sc, sft):
    probe = sft.data[:1]
    before = sft.tc.forward(probe, "cross_entropy").result().metrics["loss:sum"]
    q3 = failure(lambda: sc.create_lora_training_client(base_model=f"{MODEL}@q3", rank=8))
    assert "quantization" in str(q3) and "'q3'" in str(q3), q3
    int8 = failure(lambda: sc.create_lora_training_client(base_model=f"{MODEL}@int8", rank=8))
    assert "int8" in str(int8) and "CUDA" in str(int8), int8
    maybe = failure(lambda: sc.create_lora_training_client(
        base_model=ALIAS, rank=8, user_metadata={"gradient_checkpointing": "maybe"}))
    assert getattr(maybe, "status_code", None) == 400, maybe
    assert "user_metadata.gradient_checkpointing" in str(maybe), maybe
    # the server keeps serving: the trained client still answers, on the same weights
    assert sft.tc.forward(probe, "cross_entropy").result().metrics["loss:sum"] == before
    assert math.isfinite(before) and server.healthy()
    assert f"{MODEL}@q3" not in base_bytes(server) and f"{MODEL}@int8" not in base_bytes(server)



def test_an_sft_job_with_quantization_nf4_trains_on_the_4_bit_base(server, capsys):
    """A declarative job asks for the 4-bit copy by `quantization: nf4`; its run trains on
    `MODEL@nf4` and learns."""
    import httpx

    rows = [{"prompt": q, "response": a} for q, a in CHATS * 2]
    spec = {"type": "sft", "name": "qlora-sft", "base_model": MODEL, "quantization": "nf4",
            "renderer": "qwen3_instruct", "data": rows, "lora_rank": 8, "learning_rate": 1e-3,
            "batch_size": 5, "epochs": 3, "eval_samples": 0}
    jobs = httpx.Client(base_url=f"{server.base_url}/api/jobs",
                        headers={"X-API-Key": server.api_key}, timeout=60)
    answer = jobs.post("", json=spec)
    assert answer.status_code == 200, answer.text
    job_id = answer.json()["id"]
    deadline = time.monotonic() + 300
    while (job := jobs.get(f"/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job["status"] == "completed", (job["error"], server.log())
    result = job["result"]
    with capsys.disabled():
        print(f"\nSFT job on {MODEL}@nf4: train loss {result['first_train_loss']:.3f} -> "
              f"{result['last_train_loss']:.3f} in {result['steps']} steps")
    assert result["last_train_loss"] < 0.5 * result["first_train_loss"]
    runs = jobs.get(f"/{job_id}/metrics").json()["runs"]
    rest = tinker.RestClient(base_url=server.base_url, api_key=server.api_key)
    assert runs and all(rest.get_training_run(r).result().base_model == f"{MODEL}@nf4"
                        for r in runs)
