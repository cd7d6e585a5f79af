"""Continuous batching: requests decoded together (joining and leaving at different steps,
different adapters and settings) get what each gets decoded alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tuneforge.engine import decoder
from tuneforge.engine.lora import LoRAConfig, new_adapter
from tuneforge.engine.sampler import SampleRequest, SamplingParams

MODEL = "tuneforge/tiny-qwen3"


@pytest.fixture(params=[True, False], ids=["lean", "reference"])
def lean(request) -> bool:
    """Both forward passes of the decoder: the lean one and the transformers one."""
    return request.param


def adapters(base):
    out = [None]
    for seed, rank in ((1, 2), (2, 16)):
        a = new_adapter(LoRAConfig(rank=rank, alpha=32.0, seed=seed), base.targets, base.model,
                        base.device)
        with torch.no_grad():
            for b in a.B.values():
                b.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
        out.append(a)
    return out


def requests():
    rng = np.random.default_rng(0)
    out = []
    for i in range(6):
        prompt = rng.integers(0, 8192, int(rng.integers(2, 30))).tolist()
        params = SamplingParams(max_tokens=int(rng.integers(3, 12)),
                                temperature=0.0 if i % 2 else 0.8, top_k=-1 if i < 3 else 50,
                                seed=i, stop_token_ids=frozenset({int(rng.integers(0, 8192))}))
        out.append(SampleRequest(prompt=prompt, num_samples=1 + i % 3, params=params,
                                 prompt_logprobs=i == 4, topk_sample_logprobs=2 if i == 5 else 0))
    return out


def test_requests_decoded_together_equal_each_alone(registry, lean):
    base = registry.get(MODEL)
    ads = adapters(base)
    reqs = requests()
    alone = [decoder.sample_alone(base, ads[i % 3], r, lean=lean) for i, r in enumerate(reqs)]

    dec = decoder.Decoder(base, max_rows=64, lean=lean)
    results, joined = {}, 0
    while len(results) < len(reqs):
        if joined < len(reqs):  # a new request joins at every other step
            dec.admit(joined, ads[joined % 3], reqs[joined])
            joined += 1
        for handle, result in dec.step():
            results[handle] = result
        if joined < len(reqs):
            for handle, result in dec.step():
                results[handle] = result
    for i, want in enumerate(alone):
        got = results[i]
        assert [s.tokens for s in got.sequences] == [s.tokens for s in want.sequences], i
        assert [s.stop_reason for s in got.sequences] == [s.stop_reason for s in want.sequences]
        for g, w in zip(got.sequences, want.sequences, strict=True):
            np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)
            assert g.topk_ids == w.topk_ids
        if want.prompt_logprobs is not None:
            np.testing.assert_allclose(got.prompt_logprobs, want.prompt_logprobs, atol=1e-5)


def test_capacity_and_rows_leave_as_they_finish(registry, lean):
    base = registry.get(MODEL)
    dec = decoder.Decoder(base, max_rows=4, lean=lean)
    long = SampleRequest(prompt=[5, 6, 7], num_samples=3,
                         params=SamplingParams(max_tokens=6, temperature=0.0))
    short = SampleRequest(prompt=[8], num_samples=1,
                          params=SamplingParams(max_tokens=1, temperature=0.0))
    assert dec.has_room(long)
    dec.admit("long", None, long)
    assert dec.rows == 3 and dec.has_room(short) and not dec.has_room(long)
    dec.admit("short", None, short)
    assert [h for h, _ in dec.step()] == ["short"] and dec.rows == 3
    finished = []
    while dec.pending:
        finished += dec.step()
    assert [h for h, _ in finished] == ["long"]
    assert all(len(s.tokens) == 6 for s in finished[0][1].sequences)
    assert dec.cache is None and dec.rows == 0


def test_equal_sized_requests_take_the_stacked_path_and_still_match(registry, lean):
    base = registry.get(MODEL)
    # None (base model), rank 2, rank 16, frozen as samplers hold them: padded to one stack
    ads = [a.snapshot() if a is not None else None for a in adapters(base)]
    reqs = [SampleRequest(prompt=[10 + i, 20, 30 + i], num_samples=2,
                          params=SamplingParams(max_tokens=8, temperature=0.0,
                                                stop_token_ids=frozenset()))
            for i in range(3)]
    alone = [decoder.sample_alone(base, ads[i], r, lean=lean) for i, r in enumerate(reqs)]
    dec = decoder.Decoder(base, lean=lean)
    for i, r in enumerate(reqs):
        dec.admit(i, ads[i], r)
    results = {}
    while dec.pending:
        results.update(dec.step())
    q_proj = base.model.get_submodule(base.targets["attn"][0])
    assert q_proj._stacked is not None  # the batched-matmul path ran
    for i, want in enumerate(alone):
        assert [s.tokens for s in results[i].sequences] == [s.tokens for s in want.sequences]
        for g, w in zip(results[i].sequences, want.sequences, strict=True):
            np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)
