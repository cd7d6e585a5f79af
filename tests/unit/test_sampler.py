"""Sampling: filtering, stopping, seeds and prompt scores, on the built-in tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tuneforge.engine.lora import LoRAConfig
from tuneforge.engine.sampler import SampleRequest, SamplingParams, filter_logits

MODEL = "tuneforge/tiny-qwen3"


def test_top_k_and_top_p_keep_exactly_the_reference_sets():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen)
    for top_k, top_p in [(5, 1.0), (-1, 0.3), (10, 0.5), (-1, 1.0)]:
        kept = torch.isfinite(filter_logits(logits, SamplingParams(
            max_tokens=1, top_k=top_k, top_p=top_p)))
        for row in range(4):
            probs = torch.softmax(logits[row].double(), -1).numpy()
            order = np.argsort(-probs)
            allowed = order[:top_k] if top_k > 0 else order
            p = probs[allowed] / probs[allowed].sum()
            # smallest prefix whose mass reaches top_p
            n = int(np.searchsorted(np.cumsum(p), top_p - 1e-12) + 1) if top_p < 1 else len(p)
            expected = set(allowed[:n].tolist())
            assert set(torch.nonzero(kept[row]).flatten().tolist()) == expected


@pytest.fixture()
def sampler_id(engine):
    engine.create_model("m", MODEL, LoRAConfig(rank=4, alpha=32.0, seed=0))
    engine.add_sampler_snapshot("s", "m")
    return "s"


def greedy(engine, sampler_id, prompt, n_tokens, **params):
    req = SampleRequest(prompt=prompt, num_samples=1,
                        params=SamplingParams(max_tokens=n_tokens, temperature=0.0, **params))
    return engine.sample(sampler_id, req).sequences[0]


def test_stop_string_across_a_token_boundary(engine, sampler_id):
    base = engine.models["m"].base
    prompt = base.tokenizer.encode("The quick brown fox")
    free = greedy(engine, sampler_id, prompt, 12, stop_token_ids=frozenset())
    pieces = [base.decode([t]) for t in free.tokens]
    text = "".join(pieces)
    # a stop string made of the last character of one token and the first of the next, whose
    # first occurrence in the text is exactly that boundary
    i, stop = next(
        (i, pieces[i][-1] + pieces[i + 1][0]) for i in range(len(pieces) - 1)
        if pieces[i] and pieces[i + 1]
        and text.find(pieces[i][-1] + pieces[i + 1][0]) == len("".join(pieces[: i + 1])) - 1)
    first = text.find(stop)
    stopped = greedy(engine, sampler_id, prompt, 12, stop_strings=(stop,))
    assert stopped.stop_reason == "stop"
    assert stop in base.decode(stopped.tokens)
    assert stopped.tokens == free.tokens[: i + 2]  # ends with the token completing the string
    assert len(base.decode(stopped.tokens[:-1])) == first + 1


def test_stop_token_is_included_and_empty_stop_list_runs_to_length(engine, sampler_id):
    prompt = [5, 6, 7]
    free = greedy(engine, sampler_id, prompt, 8, stop_token_ids=frozenset())
    assert free.stop_reason == "length" and len(free.tokens) == 8
    target = free.tokens[3]
    stopped = greedy(engine, sampler_id, prompt, 8, stop_token_ids=frozenset({target}))
    assert stopped.stop_reason == "stop"
    assert stopped.tokens == free.tokens[: free.tokens.index(target) + 1]


def test_seeded_samples_do_not_depend_on_how_many_are_drawn(engine, sampler_id):
    def draw(n, seed):
        req = SampleRequest(prompt=[10, 11, 12], num_samples=n,
                            params=SamplingParams(max_tokens=10, seed=seed))
        return [s.tokens for s in engine.sample(sampler_id, req).sequences]

    three = draw(3, 5)
    assert draw(1, 5)[0] == three[0]
    assert draw(3, 5) == three
    assert draw(3, 6) != three
    assert len({tuple(t) for t in three}) == 3


def test_logprobs_prompt_scores_and_topk(engine, sampler_id):
    prompt = [20, 21, 22, 23, 24]
    req = SampleRequest(prompt=prompt, num_samples=2, prompt_logprobs=True,
                        topk_prompt_logprobs=3, topk_sample_logprobs=2, prompt_logprobs_last_n=3,
                        params=SamplingParams(max_tokens=4, seed=1))
    res = engine.sample(sampler_id, req)
    tm = engine.models["m"]
    with torch.no_grad():
        from tuneforge.engine.lora import Segment, activate

        with activate(tm.base.router, [Segment(tm.adapter, 0, 1)]):
            logits = tm.base.model(input_ids=torch.tensor([prompt + res.sequences[0].tokens]))
        logp = torch.log_softmax(logits.logits[0].double(), -1)
    full = [float(logp[i - 1, t]) for i, t in enumerate(prompt + res.sequences[0].tokens) if i]
    assert np.isnan(res.prompt_logprobs[:2]).all()  # position 0 and outside last_n
    np.testing.assert_allclose(res.prompt_logprobs[2:], full[1:4], atol=1e-5)
    np.testing.assert_allclose(res.sequences[0].logprobs, full[4:], atol=1e-5)
    assert (res.topk_prompt_logprobs[:2] == -99999.0).all()
    best = torch.topk(logp[1:4], 3)
    np.testing.assert_array_equal(res.topk_prompt_ids[2:], best.indices.numpy())
    seq = res.sequences[0]
    assert len(seq.topk_ids) == len(seq.tokens) and all(len(r) == 2 for r in seq.topk_ids)


def test_sample_logprobs_follow_the_temperature_and_alt_tokens(engine, sampler_id):
    prompt = [30, 31, 32, 33]
    target = np.array([[31, -1], [32, 7], [33, 8]])
    req = SampleRequest(prompt=prompt, num_samples=1, target_prompt_ids=target,
                        prompt_alt_tokens_k=4,
                        params=SamplingParams(max_tokens=3, temperature=0.5, seed=3,
                                              stop_token_ids=frozenset()))
    res = engine.sample(sampler_id, req)
    tm = engine.models["m"]
    seq = res.sequences[0]
    from tuneforge.engine.lora import Segment, activate

    with torch.no_grad(), activate(tm.base.router, [Segment(tm.adapter, 0, 1)]):
        logits = tm.base.model(input_ids=torch.tensor([prompt + seq.tokens])).logits[0].double()
    at_half = torch.log_softmax(logits / 0.5, -1)
    raw = torch.log_softmax(logits, -1)
    expected = [float(at_half[len(prompt) - 1 + i, t]) for i, t in enumerate(seq.tokens)]
    np.testing.assert_allclose(seq.logprobs, expected, atol=1e-5)
    # target ids are scored with the model's own distribution; -1 cells stay 0
    want = np.array([[raw[0, 31], 0.0], [raw[1, 32], raw[1, 7]], [raw[2, 33], raw[2, 8]]])
    np.testing.assert_allclose(res.target_prompt_logprobs, want, atol=1e-5)
    assert res.alt_tokens.shape == (3, 4) and res.alt_logprobs.shape == (3, 4)
    drawn = np.array([[float(torch.log_softmax(logits[i] / 0.5, -1)[t]) for t in row]
                      for i, row in enumerate(res.alt_tokens)])
    np.testing.assert_allclose(res.alt_logprobs, drawn, atol=1e-5)
