"""The real SDK trains and samples a LoRA adapter on the built-in tiny Qwen3."""

from __future__ import annotations

import numpy as np
import pytest
from tinker import types

MODEL = "tuneforge/tiny-qwen3"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Paris is the capital of France.",
]


def datum(ids: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": np.array(ids[1:], dtype=np.int64),
                        "weights": np.ones(len(ids) - 1, dtype=np.float32)},
    )


@pytest.fixture(scope="module")
def trained(service_client):
    """A client trained 30 steps on three fixed sequences, with its loss history."""
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=16, seed=0).result()
    tok = tc.get_tokenizer()
    seqs = [tok.encode(t) for t in TEXTS]
    data = [datum(s) for s in seqs]
    losses = []
    for _ in range(30):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=3e-3))
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    return tc, tok, seqs, data, losses


def test_loss_falls_below_a_quarter(trained, capsys):
    *_, losses = trained
    with capsys.disabled():
        print("\ntiny-qwen3 loss over 30 steps:", [round(x, 1) for x in losses])
    assert losses[-1] < losses[0] / 4
    assert all(np.isfinite(losses))


def test_greedy_sampling_reproduces_memorized_completions(trained):
    tc, tok, seqs, *_ = trained
    sampler = tc.save_weights_and_get_sampling_client().result()
    for ids in seqs:
        prompt, completion = ids[:4], ids[4:]
        res = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                             types.SamplingParams(max_tokens=len(completion), temperature=0.0,
                                                  stop=[])).result()
        seq = res.sequences[0]
        print(repr(tok.decode(prompt)), "->", repr(tok.decode(seq.tokens)))
        assert seq.tokens == completion
        assert seq.stop_reason == "length"
        assert len(seq.logprobs) == len(seq.tokens)


def test_seed_makes_samples_reproducible(trained):
    tc, tok, seqs, *_ = trained
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(seqs[2][:3])

    def draw(seed):
        params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=seed, stop=[])
        return [s.tokens for s in sampler.sample(prompt, 2, params).result().sequences]

    a, b, c = draw(1234), draw(1234), draw(99)
    assert a == b
    assert a != c
    assert a[0] != a[1]  # the samples of one request are independent draws


def test_forward_logprobs_equal_sampler_prompt_logprobs(trained):
    tc, _tok, seqs, data, _ = trained
    sampler = tc.save_weights_and_get_sampling_client().result()
    fwd = tc.forward(data, "cross_entropy").result()
    for ids, out in zip(seqs, fwd.loss_fn_outputs, strict=True):
        prompt_lp = sampler.compute_logprobs(types.ModelInput.from_ints(ids)).result()
        assert prompt_lp[0] is None
        train_lp = out["logprobs"].to_numpy()
        assert np.max(np.abs(np.array(prompt_lp[1:], dtype=np.float64) - train_lp)) <= 1e-4


def test_chunked_forward_keeps_datum_order(trained):
    # The server tells the SDK to send 2 datums per request: 5 datums arrive as 3 concurrent
    # chunks, and each datum's output must still be its own.
    tc, _tok, seqs, _data, _ = trained
    data = [datum(s[: 6 + i]) for i, s in enumerate(seqs + seqs[:2])]
    together = tc.forward(data, "cross_entropy").result()
    assert len(together.loss_fn_outputs) == len(data)
    for d, out in zip(data, together.loss_fn_outputs, strict=True):
        alone = tc.forward([d], "cross_entropy").result().loss_fn_outputs[0]
        np.testing.assert_allclose(out["logprobs"].to_numpy(), alone["logprobs"].to_numpy(),
                                   atol=1e-5)


def test_sampler_sees_only_the_weights_saved_for_it(service_client):
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=8, seed=1).result()
    tok = tc.get_tokenizer()
    ids = tok.encode(TEXTS[0])
    probe = types.ModelInput.from_ints(ids)
    first = tc.save_weights_and_get_sampling_client().result()
    before = first.compute_logprobs(probe).result()
    for _ in range(3):
        tc.forward_backward([datum(ids)], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = first.compute_logprobs(probe).result()
    assert after == before  # the snapshot did not move
    second = tc.save_weights_and_get_sampling_client().result()
    newer = second.compute_logprobs(probe).result()
    assert sum(newer[1:]) > sum(before[1:])  # the new one sees the trained weights


def test_named_sampler_checkpoint_and_training_state_roundtrip(service_client):
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=2).result()
    ids = tc.get_tokenizer().encode(TEXTS[1])
    for _ in range(2):
        tc.forward_backward([datum(ids)], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    probe = types.ModelInput.from_ints(ids)
    live = tc.forward([datum(ids)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]

    path = tc.save_weights_for_sampler("roundtrip").result().path
    assert path.endswith("/sampler_weights/roundtrip")
    from_path = service_client.create_sampling_client(model_path=path).result()
    lp = from_path.compute_logprobs(probe).result()
    np.testing.assert_allclose(np.array(lp[1:]), live.to_numpy(), atol=1e-4)

    state_path = tc.save_state("roundtrip-state").result().path
    restored = service_client.create_training_client_from_state(state_path).result()
    again = restored.forward([datum(ids)], "cross_entropy").result().loss_fn_outputs[0]
    np.testing.assert_allclose(again["logprobs"].to_numpy(), live.to_numpy(), atol=1e-6)
    assert restored.get_info().model_data.model_name == MODEL


def test_base_model_sampling_client_and_capabilities(service_client, server):
    import tinker

    sampler = service_client.create_sampling_client(base_model=MODEL).result()
    res = sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 3,
                         types.SamplingParams(max_tokens=4, seed=0)).result()
    assert len(res.sequences) == 3
    assert all(len(s.tokens) <= 4 for s in res.sequences)
    assert all(s.sequence_id for s in res.sequences)
    rest = tinker.RestClient(base_url=server.base_url, api_key=server.api_key)
    caps = rest.get_server_capabilities().result()
    names = [m.model_name for m in caps.supported_models]
    assert MODEL in names and "tuneforge/tiny-qwen3-l" in names


def test_load_state_into_an_existing_client_continues_exactly(service_client):
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=3).result()
    d = datum(tc.get_tokenizer().encode(TEXTS[0]))
    adam = types.AdamParams(learning_rate=1e-2)
    for _ in range(2):
        tc.forward_backward([d], "cross_entropy")
        tc.optim_step(adam).result()
    path = tc.save_state("mid").result().path
    tc.forward_backward([d], "cross_entropy")
    tc.optim_step(adam).result()
    expected = tc.forward([d], "cross_entropy").result().metrics["loss:sum"]

    other = service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=9).result()
    other.load_state_with_optimizer(path).result()
    other.forward_backward([d], "cross_entropy")
    other.optim_step(adam).result()
    assert other.forward([d], "cross_entropy").result().metrics["loss:sum"] == \
        pytest.approx(expected, abs=1e-5)


def test_forward_backward_custom_gets_signed_weights_right(service_client):
    import torch

    tc = service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=4).result()
    d = datum(tc.get_tokenizer().encode(TEXTS[2]))

    def mean_logprob(_data, logprobs_list):  # maximise the mean logprob: a custom objective
        loss = -torch.cat([lp.flatten() for lp in logprobs_list]).mean()
        return loss, {"custom:sum": float(loss.detach())}

    before = tc.forward([d], "cross_entropy").result().metrics["loss:sum"]
    out = tc.forward_backward_custom([d], mean_logprob).result()
    assert out.metrics["loss:sum"] == pytest.approx(before / (len(d.model_input.to_ints())),
                                                    rel=1e-4)
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert tc.forward([d], "cross_entropy").result().metrics["loss:sum"] < before


@pytest.mark.parametrize("flags, modules", [
    (dict(train_attn=True, train_mlp=False, train_unembed=False),
     ["k_proj", "o_proj", "q_proj", "v_proj"]),
    (dict(train_attn=False, train_mlp=True, train_unembed=True),
     ["down_proj", "gate_proj", "lm_head", "up_proj"]),
])
def test_lora_switches_choose_the_adapted_modules(service_client, server, flags, modules):
    import json

    tc = service_client.create_lora_training_client(base_model=MODEL, rank=3, **flags).result()
    path = tc.save_weights_for_sampler("targets").result().path
    run, kind, name = path.removeprefix("tinker://").split("/")
    config = json.loads((server.data_dir / "checkpoints" / run / kind / name /
                         "adapter_config.json").read_text())
    assert config["target_modules"] == modules
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (3, 32.0,
                                                                                      MODEL)


def test_rest_client_lists_gets_and_deletes(service_client, server):
    import tinker

    tc = service_client.create_lora_training_client(
        base_model=MODEL, rank=2, user_metadata={"purpose": "rest"}).result()
    state_path = tc.save_state("rest-state").result().path
    sampler_path = tc.save_weights_for_sampler("rest-sampler").result().path
    rest = tinker.RestClient(base_url=server.base_url, api_key=server.api_key)

    run = rest.get_training_run_by_tinker_path(state_path).result()
    assert (run.training_run_id, run.base_model, run.lora_rank) == (tc.model_id, MODEL, 2)
    assert run.user_metadata == {"purpose": "rest"}
    assert run.last_checkpoint.tinker_path == state_path
    assert run.last_sampler_checkpoint.tinker_path == sampler_path
    listed = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert {(c.checkpoint_type, c.tinker_path) for c in listed} == {
        ("training", state_path), ("sampler", sampler_path)}
    info = rest.get_weights_info_by_tinker_path(state_path).result()
    assert (info.base_model, info.lora_rank, info.is_lora) == (MODEL, 2, True)
    assert tc.model_id in [r.training_run_id for r in rest.list_training_runs(limit=100)
                           .result().training_runs]

    rest.delete_checkpoint_from_tinker_path(sampler_path).result()
    left = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert [c.tinker_path for c in left] == [state_path]
    run_dir = server.data_dir / "checkpoints" / tc.model_id
    assert not (run_dir / "sampler_weights" / "rest-sampler").exists()
    assert (run_dir / "weights" / "rest-state" / "optimizer.pt").exists()
