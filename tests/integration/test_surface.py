"""The rest of the Tinker surface through the real SDK: RL losses and numerics, DPO with
forward_backward_custom, sampling extras for distillation, refusals of what is not served."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
import torch
from tinker import types

MODEL = "tuneforge/tiny-qwen3"
PROMPTS = [[11, 12, 13, 14], [21, 22, 23], [31, 32, 33, 34, 35], [41, 42]]
WARM_STEPS = 3
GOOD_TOKEN = 500  # the toy task: say this token as often as possible


def rl_datum(prompt, tokens, logprobs, advantage):
    ob = len(prompt) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(prompt + tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": np.array([0] * ob + tokens, dtype=np.int64),
            "logprobs": np.array([0.0] * ob + logprobs, dtype=np.float32),
            "advantages": np.array([0.0] * ob + [advantage] * len(tokens), dtype=np.float32)},
    )


def test_rl_numerics_and_importance_sampling_learns(service_client, capsys):
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=16, seed=0).result()
    # a warm start: a little SFT makes the good token likely enough to be sampled at all
    warm = [types.Datum(model_input=types.ModelInput.from_ints(p + [GOOD_TOKEN] * 5),
                        loss_fn_inputs={"target_tokens": np.array(p[1:] + [GOOD_TOKEN] * 6),
                                        "weights": np.array([0.0] * (len(p) - 1) + [1.0] * 6,
                                                            dtype=np.float32)})
            for p in PROMPTS]
    for _ in range(WARM_STEPS):
        tc.forward_backward(warm, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    params = types.SamplingParams(max_tokens=6, temperature=1.0, stop=[])
    rewards, kls = [], []
    for _ in range(12):
        sampler = tc.save_weights_and_get_sampling_client().result()
        futures = [sampler.sample(types.ModelInput.from_ints(p), 8, params) for p in PROMPTS]
        data, step_rewards, sampled_lp = [], [], []
        for prompt, fut in zip(PROMPTS, futures, strict=True):
            seqs = fut.result().sequences
            group = [float(np.mean(np.array(s.tokens) == GOOD_TOKEN)) for s in seqs]
            mean = float(np.mean(group))
            step_rewards += group
            for s, r in zip(seqs, group, strict=True):
                data.append(rl_datum(prompt, s.tokens, s.logprobs, r - mean))
                sampled_lp.append(np.array(s.logprobs))
        # the trainer scores the very tokens the sampler produced, with the same weights
        fwd = tc.forward(data, "importance_sampling").result()
        diffs = np.concatenate([q - out["logprobs"].to_numpy()[-len(q):]
                                for q, out in zip(sampled_lp, fwd.loss_fn_outputs, strict=True)])
        kl = float(np.mean(diffs))  # E_q[log q - log p] over the sampled tokens
        kls.append((kl, float(np.abs(diffs).max())))
        tc.forward_backward(data, "importance_sampling")
        tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()
        rewards.append(float(np.mean(step_rewards)))
    with capsys.disabled():
        for step, ((kl, worst), r) in enumerate(zip(kls, rewards, strict=True)):
            print(f"\nRL step {step}: sampler-vs-trainer KL {kl:+.2e} (max |dlogp| {worst:.1e}), "
                  f"mean reward {r:.3f}", end="")
        print()
    assert all(abs(kl) < 1e-3 and worst < 1e-3 for kl, worst in kls)
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.15


@pytest.mark.parametrize("loss_fn, config", [
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("cispo", None), ("dro", {"beta": 0.05}),
    ("gspo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
])
def test_policy_losses_run_and_return_what_the_sdk_reads(service_client, loss_fn, config):
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=1).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = PROMPTS[0]
    seq = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                         types.SamplingParams(max_tokens=5, stop=[], seed=0)).result().sequences[0]
    datum = rl_datum(prompt, seq.tokens, seq.logprobs, 1.0)
    out = tc.forward_backward([datum], loss_fn, loss_fn_config=config).result()
    lp = out.loss_fn_outputs[0]["logprobs"].to_numpy()
    assert lp.shape == (len(prompt) - 1 + len(seq.tokens),)
    np.testing.assert_allclose(lp[-len(seq.tokens):], seq.logprobs, atol=1e-4)
    # on-policy with A = 1 on every sampled token: each loss is minus the number of them
    # (DRO: minus the sampled logprob sum, its penalty is zero at q = p; prompt positions,
    # with q = 0, carry DRO's penalty only)
    if loss_fn == "dro":
        prompt_lp = lp[: len(prompt) - 1]
        expected = -float(np.sum(seq.logprobs)) + 0.025 * float(np.sum(prompt_lp ** 2))
        assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-3)
    elif loss_fn == "cispo":
        assert out.metrics["loss:sum"] == pytest.approx(-float(np.sum(seq.logprobs)), rel=1e-3)
    else:
        assert out.metrics["loss:sum"] == pytest.approx(-len(seq.tokens), rel=1e-3)


def test_dpo_with_forward_backward_custom_grows_the_margin(service_client):
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=8, seed=2).result()
    reference = tc.save_weights_and_get_sampling_client().result()
    pairs = [([5, 6, 7], [100, 101, 102], [200, 201, 202]),
             ([8, 9], [110, 111], [210, 211]),
             ([15, 16, 17, 18], [120, 121, 122], [220, 221, 222])]
    data, ref_sums = [], []
    for prompt, chosen, rejected in pairs:
        for completion in (chosen, rejected):
            full = prompt + completion
            weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
            data.append(types.Datum(
                model_input=types.ModelInput.from_ints(full[:-1]),
                loss_fn_inputs={"target_tokens": np.array(full[1:]),
                                "weights": np.array(weights, dtype=np.float32)}))
            lp = reference.compute_logprobs(types.ModelInput.from_ints(full)).result()
            ref_sums.append(sum(lp[len(prompt):]))
    beta = 0.5

    def dpo_loss(batch, logprobs_list):
        sums = torch.stack([(lp * torch.tensor(d.loss_fn_inputs["weights"].to_numpy())).sum()
                            for d, lp in zip(batch, logprobs_list, strict=True)])
        rewards = sums - torch.tensor(ref_sums)
        margins = rewards[0::2] - rewards[1::2]
        loss = -torch.nn.functional.logsigmoid(beta * margins).sum()
        return loss, {"margin:mean": float(margins.mean().detach())}

    margins = []
    for _ in range(5):
        out = tc.forward_backward_custom(data, dpo_loss).result()
        margins.append(out.metrics["margin:mean"])
        tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()
    print("DPO margins:", [round(m, 3) for m in margins])
    assert abs(margins[0]) < 1e-4  # starts at the reference
    assert margins[-1] > margins[0] + 1.0
    assert all(b > a for a, b in zip(margins, margins[1:], strict=False))


def test_distillation_sampling_extras(service_client):
    sampler = service_client.create_sampling_client(base_model=MODEL).result()
    prompt = types.ModelInput.from_ints([40, 41, 42, 43, 44, 45])
    one = types.SamplingParams(max_tokens=1)
    plain = sampler.sample(prompt, 1, one, include_prompt_logprobs=True,
                           topk_prompt_logprobs=2).result()
    top1 = [row[0][0] for row in plain.topk_prompt_logprobs[1:]]
    ids = torch.tensor([[41, top1[0]], [42, -1], [43, top1[2]], [44, -1], [45, top1[4]]])
    expected = [[plain.prompt_logprobs[i + 1], plain.topk_prompt_logprobs[i + 1][0][1]
                 if ids[i, 1] >= 0 else 0.0] for i in range(5)]
    for tensor in (types.TensorData.from_torch(ids),
                   types.TensorData.from_torch_sparse(ids, pad_value=-1)):
        res = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=1),
                             target_prompt_logprobs=tensor).result()
        got = res.target_prompt_logprobs.to_numpy()
        assert got.shape == (5, 2)
        np.testing.assert_allclose(got, np.array(expected, dtype=np.float32), atol=1e-5)
    alt = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=1, seed=4),
                         prompt_alt_tokens_k=3).result().prompt_alt_tokens
    tokens, logprobs = alt.tokens.to_numpy(), alt.logprobs.to_numpy()
    assert tokens.shape == logprobs.shape == (5, 3)
    assert np.all(logprobs <= 0) and np.all(tokens >= 0)
    last = sampler.sample(prompt, 1, one, include_prompt_logprobs=True,
                          prompt_logprobs_last_n=2).result().prompt_logprobs
    assert last[:4] == [None] * 4 and last[4:] == plain.prompt_logprobs[4:]


def test_unserved_options_are_refused_by_name(service_client):
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=2).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    image = types.ModelInput(chunks=[types.ImageChunk(data=b"\x89PNG", format="png")])
    with pytest.raises(tinker.RequestFailedError, match="image chunks are not supported"):
        sampler.sample(image, 1, types.SamplingParams(max_tokens=1)).result()
    with pytest.raises(tinker.RequestFailedError, match="optimizer 'dimuon' is not supported"):
        tc.optim_step(types.DimuonParams(learning_rate=1e-3)).result()
    with pytest.raises(tinker.RequestFailedError, match="'dimuon' is not supported"):
        service_client.create_lora_training_client(
            base_model=MODEL, rank=2, optimizer=types.DimuonOptimizerConfig()).result()


def test_many_concurrent_samples(service_client):
    sampler = service_client.create_sampling_client(base_model=MODEL).result()
    params = [types.SamplingParams(max_tokens=5, seed=i, stop=[]) for i in range(32)]
    prompt = types.ModelInput.from_ints([7, 8, 9])
    futures = [sampler.sample(prompt, 2, p) for p in params]  # all in flight at once
    results = [f.result() for f in futures]
    assert all(len(r.sequences) == 2 and all(len(s.tokens) == 5 for s in r.sequences)
               for r in results)
    again = sampler.sample(prompt, 2, params[17]).result()
    assert [s.tokens for s in again.sequences] == [s.tokens for s in results[17].sequences]
