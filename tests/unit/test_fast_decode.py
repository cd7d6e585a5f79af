"""The lean decoding forward (engine/fast_decode.py) against the transformers forward of the
same decoder: same greedy and seeded tokens, per-token logprobs within 1e-5 in fp32, over single
requests, left-padded batches with different adapters, rows leaving and joining, streams, KV
cache growth; bf16 against the reference autocast path; unsupported models fall back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tuneforge.engine import checkpointing, decoder, fast_decode, lora
from tuneforge.engine.lora import LoRAConfig, new_adapter
from tuneforge.engine.models import BaseModel, store_linears
from tuneforge.engine.sampler import SampleRequest, SamplingParams

VOCAB = 512


def hand_built(kind: str, bf16_weights: bool = False) -> BaseModel:
    """A small random model of `kind`, loaded the way the registry loads a base."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.15)
    torch.manual_seed(0)
    if kind == "llama":  # SmolLM2's shape: GQA, tied embeddings, no biases
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common))
    elif kind == "qwen2":  # q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **common))
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=16, **common))
    model.eval()
    model.requires_grad_(False)
    if bf16_weights:
        store_linears(model, torch.bfloat16)
    router, targets = lora.inject(model)
    checkpointing.install(model, router)
    return BaseModel(name=f"hand-built/{kind}", model=model, tokenizer=None,
                     tokenizer_dir=Path("."), router=router, targets=targets, vocab_size=VOCAB,
                     max_context=512, eos_token_ids=frozenset(), arch=type(model).__name__,
                     device=torch.device("cpu"))


@pytest.fixture(params=["transposed", "model-layout"], autouse=True)
def atol(request, monkeypatch) -> float:
    """fp32 on CPU: with transposed weight copies (the default) the products round their sums
    in another order than the reference's; logprobs then agree within 1e-4 (the bound of
    batched against alone, and of sampler against trainer), else within 1e-5."""
    monkeypatch.setattr(fast_decode, "TRANSPOSE", request.param == "transposed")
    return 1e-4 if request.param == "transposed" else 1e-5


@pytest.fixture(params=["llama", "qwen2", "qwen3"])
def base(request, registry) -> BaseModel:
    if request.param == "qwen3":
        return registry.get("tuneforge/tiny-qwen3")
    return hand_built(request.param)


def adapters(base: BaseModel) -> list[lora.Adapter | None]:
    """None, rank 2 on every target, rank 16 on attention only, rank 4 on mlp + unembed."""
    out: list[lora.Adapter | None] = [None]
    for seed, rank, groups in ((1, 2, (True, True, True)), (2, 16, (True, False, False)),
                               (3, 4, (False, True, True))):
        cfg = LoRAConfig(rank=rank, alpha=32.0, seed=seed, train_attn=groups[0],
                         train_mlp=groups[1], train_unembed=groups[2])
        a = new_adapter(cfg, base.targets, base.model, base.device)
        with torch.no_grad():
            for b in a.B.values():
                b.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
        out.append(a.snapshot())
    return out


def vocab(base: BaseModel) -> int:
    return base.vocab_size


def mixed_requests(base: BaseModel) -> list[SampleRequest]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(6):
        prompt = rng.integers(0, vocab(base), int(rng.integers(2, 30))).tolist()
        params = SamplingParams(max_tokens=int(rng.integers(4, 14)),
                                temperature=0.0 if i % 2 else 0.9, top_k=-1 if i < 3 else 50,
                                seed=i, stop_token_ids=frozenset({int(rng.integers(0, 100))}))
        out.append(SampleRequest(prompt=prompt, num_samples=1 + i % 3, params=params,
                                 prompt_logprobs=i == 4, topk_sample_logprobs=2 if i == 5 else 0))
    return out


def assert_same(got, want, atol: float) -> None:
    assert [s.tokens for s in got.sequences] == [s.tokens for s in want.sequences]
    assert [s.stop_reason for s in got.sequences] == [s.stop_reason for s in want.sequences]
    for g, w in zip(got.sequences, want.sequences, strict=True):
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=atol)
        assert g.topk_ids == w.topk_ids
        if g.topk_logprobs:
            np.testing.assert_allclose(g.topk_logprobs, w.topk_logprobs, atol=atol)
    for name in ("prompt_logprobs", "topk_prompt_logprobs", "target_prompt_logprobs",
                 "alt_logprobs"):
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None) == (w is None), name
        if w is not None:
            np.testing.assert_allclose(g, w, atol=atol)
    for name in ("topk_prompt_ids", "alt_tokens"):
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None) == (w is None), name
        if w is not None:
            np.testing.assert_array_equal(g, w)


def assert_schedules_match(base: BaseModel, reqs, ads, atol: float) -> dict:
    """`run_schedule` on both paths gives the same results; the lean path's."""
    want = run_schedule(base, False, reqs, ads)
    got = run_schedule(base, True, reqs, ads)
    for i in range(len(reqs)):
        assert_same(got[i], want[i], atol)
    return got


def run_schedule(base: BaseModel, lean: bool, reqs, ads, dtype: str = "fp32"):
    """Requests joining at every other step, rows leaving as they finish."""
    dec = decoder.Decoder(base, dtype, max_rows=64, lean=lean)
    assert (dec.lean is not None) == lean
    results, joined = {}, 0
    while len(results) < len(reqs):
        if joined < len(reqs):
            dec.admit(joined, ads[joined % len(ads)], reqs[joined])
            joined += 1
        for _ in range(2 if joined < len(reqs) else 1):
            results.update(dec.step())
    return results


def test_supported_models_take_the_lean_path(base):
    assert fast_decode.unsupported(base.model) is None
    lean = fast_decode.lean_model(base.model, "fp32")
    assert lean is fast_decode.lean_model(base.model, "fp32")  # built once per base and dtype
    assert decoder.Decoder(base).lean is lean and decoder.Decoder(base, lean=False).lean is None


def test_one_request_matches_the_reference(base, atol):
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, vocab(base), 20).tolist()
    targets = rng.integers(-1, vocab(base), (19, 3))
    req = SampleRequest(prompt=prompt, num_samples=1,
                        params=SamplingParams(max_tokens=24, temperature=0.0,
                                              stop_token_ids=frozenset()),
                        prompt_logprobs=True, topk_prompt_logprobs=3, topk_sample_logprobs=4,
                        target_prompt_ids=targets, prompt_alt_tokens_k=2)
    want = decoder.sample_alone(base, None, req, lean=False)
    got = decoder.sample_alone(base, None, req)
    assert_same(got, want, atol)
    assert got.prompt_logprobs is not None and len(got.sequences[0].tokens) == 24


def test_prompt_logits_only_where_asked(base, atol, monkeypatch):
    asked = []
    forward = fast_decode.LeanModel.forward

    def spy(self, ids, *args, all_logits=False, **kwargs):
        if ids.shape[1] > 1:
            asked.append(all_logits)
        return forward(self, ids, *args, all_logits=all_logits, **kwargs)

    monkeypatch.setattr(fast_decode.LeanModel, "forward", spy)
    params = SamplingParams(max_tokens=3, temperature=0.0)
    plain = SampleRequest(prompt=[1, 2, 3, 4], num_samples=1, params=params)
    for req in (plain, SampleRequest(prompt=[1, 2, 3, 4], num_samples=1, params=params,
                                     prompt_logprobs=True)):
        assert_same(decoder.sample_alone(base, None, req), decoder.sample_alone(
            base, None, req, lean=False), atol)
    assert asked == [False, True]


def test_batches_with_adapters_joining_and_leaving_match_the_reference(base, atol):
    ads, reqs = adapters(base), mixed_requests(base)
    got = assert_schedules_match(base, reqs, ads, atol)
    # and each equals its request decoded alone (rounding of the batch aside)
    for i, r in enumerate(reqs):
        alone = decoder.sample_alone(base, ads[i % len(ads)], r)
        assert [s.tokens for s in alone.sequences] == [s.tokens for s in got[i].sequences]


def test_equal_sized_adapter_segments_take_the_stacked_path(base, atol):
    ads = adapters(base)
    reqs = [SampleRequest(prompt=[10 + i, 20, 30 + i], num_samples=2,
                          params=SamplingParams(max_tokens=8, temperature=0.0,
                                                stop_token_ids=frozenset()))
            for i in range(len(ads))]
    results = {}
    for lean in (False, True):
        dec = decoder.Decoder(base, lean=lean)
        for i, r in enumerate(reqs):
            dec.admit(i, ads[i], r)
        results[lean] = {}
        while dec.pending:
            results[lean].update(dec.step())
    assert base.model.get_submodule(base.targets["attn"][0])._stacked is not None
    for i in range(len(reqs)):
        assert_same(results[True][i], results[False][i], atol)


def test_seeded_samples_and_streams_match_the_reference(base, atol):
    class Listener:
        cancelled = False

        def __init__(self):
            self.deltas = []

        def push(self, deltas):
            self.deltas.append(deltas)

    out = {}
    for lean in (False, True):
        listener = Listener()
        req = SampleRequest(prompt=[3, 1, 4, 1, 5], num_samples=4,
                            params=SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9,
                                                  seed=7, stop_token_ids=frozenset({9})),
                            topk_sample_logprobs=2, stream=listener)
        out[lean] = decoder.sample_alone(base, adapters(base)[1], req, lean=lean), listener
    assert_same(out[True][0], out[False][0], atol)
    got, want = out[True][1].deltas, out[False][1].deltas
    assert [[(d.index, d.token, d.stop_reason, d.topk_ids) for d in step] for step in got] == \
        [[(d.index, d.token, d.stop_reason, d.topk_ids) for d in step] for step in want]
    np.testing.assert_allclose([d.logprob for step in got for d in step],
                               [d.logprob for step in want for d in step], atol=atol)


def test_cache_growth_with_cropped_columns(base, atol, monkeypatch):
    """Tiny buffers: every join, crop and doubling of the cache happens many times."""
    monkeypatch.setattr(fast_decode, "MIN_CAPACITY", 2)
    ads, reqs = adapters(base), mixed_requests(base)
    assert_schedules_match(base, reqs, ads, atol)
    long = SampleRequest(prompt=list(range(5, 75)), num_samples=2,
                         params=SamplingParams(max_tokens=70, temperature=0.0,
                                               stop_token_ids=frozenset()))
    assert_same(decoder.sample_alone(base, ads[1], long),
                decoder.sample_alone(base, ads[1], long, lean=False), atol)


@pytest.mark.parametrize("stored", [False, True], ids=["fp32-weights", "bf16-weights"])
def test_bf16_matches_the_autocast_reference(stored, atol):
    """bf16 runs under the same autocast with the same ops (bit-identical here); fused q/k/v
    and gate/up products could round their sums differently on other kernels, so logprobs are
    held to 1e-3 and tokens to equality."""
    base = hand_built("llama", bf16_weights=stored)
    ads = adapters(base)
    reqs = mixed_requests(base)
    want = run_schedule(base, False, reqs, ads, "bf16")
    got = run_schedule(base, True, reqs, ads, "bf16")
    for i in range(len(reqs)):
        assert_same(got[i], want[i], 1e-3)


def test_unsupported_models_fall_back_to_the_reference(atol):
    base = hand_built("mistral")  # a sliding window: not the lean path's attention
    assert "sliding" in fast_decode.unsupported(base.model)
    assert fast_decode.lean_model(base.model, "fp32") is None
    dec = decoder.Decoder(base)
    assert dec.lean is None
    req = SampleRequest(prompt=[1, 2, 3], num_samples=1,
                        params=SamplingParams(max_tokens=4, temperature=0.0))
    assert_same(decoder.sample_alone(base, None, req),
                decoder.sample_alone(base, None, req, lean=False), atol)


def test_4bit_base_layers_are_called_as_they_are(registry, atol):
    """An NF4 base: its quantized projections run through their own modules in the lean path."""
    pytest.importorskip("bitsandbytes")
    base = registry.get("tuneforge/tiny-qwen3@nf4")
    lean = fast_decode.lean_model(base.model, "fp32")
    assert lean is not None and lean.layers[0].qkv.kind == "module"
    ads = [None, new_adapter(LoRAConfig(rank=4, alpha=32.0, seed=5), base.targets, base.model,
                             base.device).snapshot()]
    reqs = mixed_requests(base)[:4]
    want = run_schedule(base, False, reqs, ads)
    got = run_schedule(base, True, reqs, ads)
    for i in range(len(reqs)):
        assert_same(got[i], want[i], atol)


def test_weight_copies_count_in_the_base_memory(models_dir, atol):
    from tuneforge.engine.models import ModelRegistry

    registry = ModelRegistry(models_dir, torch.device("cpu"))
    base = registry.get("tuneforge/tiny-qwen3")
    before = registry.sizes()["tuneforge/tiny-qwen3"]
    assert before == base.nbytes
    decoder.sample_alone(base, None, SampleRequest(
        prompt=[3, 4, 5], num_samples=1, params=SamplingParams(max_tokens=2, temperature=0.0)))
    copies = fast_decode.lean_model(base.model, "fp32").copied_bytes
    assert (copies > 0) == fast_decode.TRANSPOSE
    assert registry.sizes()["tuneforge/tiny-qwen3"] == before + copies
