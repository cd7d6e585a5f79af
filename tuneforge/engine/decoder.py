"""Continuous batching: one decoding loop for every sampling request on a base model.

A request is admitted with one prefill of its prompt (batch 1, its own adapter), which also
yields its prompt scores (the logits of every prompt position are computed only when the request
asks for prompt logprobs, top-k, target ids or alternative tokens; otherwise only the last); its
KV cache is repeated for its `num_samples` rows, which join the running batch. Every `step()`
picks the next token of every row (each request with its own temperature, top-k/top-p, stops and
per-sample generators) and runs one forward pass over all rows still running, each routed to its
request's adapter; a finished row leaves the batch at once and frees its place for a waiting
request.

Streaming: a request with a `stream` listener gets each step's new tokens pushed to it (one
`push` per step with a `TokenDelta` per row, on this thread; `push` only queues them), and once
its listener is cancelled its rows leave the batch at the next step, as if at their length
limit.

Rows have different lengths, so the batch cache is left-padded: a boolean mask `[rows, columns]`
marks the real positions and every row carries its own position id. A joining request's rows are
right-aligned with the others (the narrower side padded on the left); columns that only hold
padding are cut away as rows leave. Without padding (a lone request, rows of equal length) no
mask is passed at all. A row's result does not depend on its neighbours beyond float rounding.

Two forward passes, one loop:
- lean (the default, `fast_decode.py`) for Llama-family models: the model's tensors driven
  directly, its KV cache `fast_decode.KVCache` — per layer `[rows, kv_heads, capacity,
  head_dim]`, written in place, capacity doubled when full, columns `start:length` in use (a cut
  moves `start`; joining rebuilds the buffers right-aligned);
- reference (`lean=False`, and automatically for any model `fast_decode.unsupported` names):
  the transformers forward with a `DynamicCache` grown by concatenation.
Both give the same tokens; logprobs agree within 1e-5 (fp32 without transposed weight copies,
1e-4 with them, see `fast_decode.TRANSPOSE`), and bf16 runs the same ops under the same autocast.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from tuneforge.engine import fast_decode, lora
from tuneforge.engine.models import BaseModel
from tuneforge.engine.sampler import (
    SampledSequence,
    SampleRequest,
    SampleResult,
    StopChecker,
    TokenDelta,
    alt_tokens,
    filter_logits,
    prompt_scores,
    row_seed,
)


@dataclass
class _Pending:
    """A request being decoded: its rows are consecutive in the batch."""

    handle: Hashable
    request: SampleRequest
    adapter: lora.Adapter | None
    result: SampleResult
    generators: list[torch.Generator]
    stop: StopChecker
    live: list[int] = field(default_factory=list)  # sample indices still decoding, in row order
    steps: int = 0


class Decoder:
    def __init__(self, base: BaseModel, dtype: str = "fp32", max_rows: int = 64,
                 lean: bool = True) -> None:
        """`lean=False` decodes through the transformers forward pass (the reference path);
        with `lean=True` models `fast_decode` does not support take it too."""
        self.base = base
        self.dtype = dtype
        self.max_rows = max_rows
        self.lean = fast_decode.lean_model(base.model, dtype) if lean else None
        self.pending: list[_Pending] = []
        self.cache: DynamicCache | fast_decode.KVCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, length] bool, True = real position
        self.next_pos: torch.Tensor | None = None  # [rows] position id of the next token
        self.next_logits: torch.Tensor | None = None  # [rows, vocab]

    @property
    def rows(self) -> int:
        return sum(len(p.live) for p in self.pending)

    def has_room(self, request: SampleRequest) -> bool:
        return self.rows == 0 or self.rows + request.num_samples <= self.max_rows

    def _autocast(self):
        return torch.autocast(self.base.device.type, dtype=torch.bfloat16,
                              enabled=self.dtype == "bf16")

    @torch.no_grad()
    def admit(self, handle: Hashable, adapter: lora.Adapter | None,
              request: SampleRequest) -> None:
        """Prefill `request` and add its rows to the running batch."""
        device, n = self.base.device, request.num_samples
        prompt = torch.tensor([request.prompt], dtype=torch.long, device=device)
        segments = [lora.Segment(adapter, 0, 1)]
        if self.lean is not None:
            cache = self.lean.new_cache()
            positions = torch.arange(prompt.shape[1], device=device)[None]
            logits = self.lean.forward(prompt, positions, cache, None, segments,
                                       all_logits=_needs_prompt_logits(request))[0]
        else:
            cache = DynamicCache()
            with lora.activate(self.base.router, segments), self._autocast():
                logits = self.base.model(input_ids=prompt, past_key_values=cache,
                                         use_cache=True).logits[0].float()
        result = SampleResult(sequences=[SampledSequence() for _ in range(n)])
        prompt_scores(result, logits, request)
        params = request.params
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        generators = [torch.Generator(device=device).manual_seed(row_seed(seed, i))
                      for i in range(n + 1)]  # the last one draws prompt_alt_tokens
        if request.prompt_alt_tokens_k > 0:
            alt_tokens(result, logits, request, generators[n])
        if self.lean is not None:
            cache.repeat(n)
        else:
            cache.batch_repeat_interleave(n)
        plen = len(request.prompt)
        self._join(cache, torch.ones(n, plen, dtype=torch.bool, device=device),
                   torch.full((n,), plen, dtype=torch.long, device=device),
                   logits[-1:].expand(n, -1))
        stop = StopChecker(params, self.base.decode)
        self.pending.append(_Pending(handle, request, adapter, result, generators[:n], stop,
                                     live=list(range(n))))

    def _join(self, cache: DynamicCache | fast_decode.KVCache, mask: torch.Tensor,
              next_pos: torch.Tensor, next_logits: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.mask, self.next_pos, self.next_logits = (cache, mask, next_pos,
                                                                      next_logits)
            return
        old, new = self.mask.shape[1], mask.shape[1]
        length = max(old, new)
        if self.lean is not None:
            self.cache.join(cache)
        else:
            self._join_reference(cache, length)
        self.mask = torch.cat([_pad_left(self.mask, length, dim=1),
                               _pad_left(mask, length, dim=1)])
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.next_logits = torch.cat([self.next_logits, next_logits])

    def _join_reference(self, cache: DynamicCache, length: int) -> None:
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, length), _pad_left(theirs.keys, length)])
            mine.values = torch.cat([_pad_left(mine.values, length),
                                     _pad_left(theirs.values, length)])

    @torch.no_grad()
    def step(self) -> list[tuple[Hashable, SampleResult]]:
        """Pick one token for every row, advance the rows that go on; return finished requests."""
        if not self.pending:
            return []
        rows = self._row_starts()  # fixed before rows start leaving
        scale = torch.tensor([p.request.params.temperature or 1.0 for p in self.pending
                              for _ in p.live], device=self.next_logits.device)
        logprobs = torch.log_softmax(self.next_logits / scale[:, None], dim=-1)
        chosen = torch.cat([self._choose(p, self.next_logits[start:start + len(p.live)])
                            for p, start in rows])
        chosen_lp = logprobs.gather(-1, chosen[:, None])[:, 0].tolist()
        tokens = chosen.tolist()
        keep: list[int] = []
        for p, start in rows:
            k = p.request.topk_sample_logprobs
            top = torch.topk(logprobs[start:start + len(p.live)], k) if k > 0 else None
            stream = p.request.stream
            cancelled = stream is not None and stream.cancelled
            deltas: list[TokenDelta] = []
            still = []
            for r, sample_index in enumerate(p.live):
                seq = p.result.sequences[sample_index]
                seq.tokens.append(tokens[start + r])
                seq.logprobs.append(chosen_lp[start + r])
                if top is not None:
                    seq.topk_ids.append(top.indices[r].tolist())
                    seq.topk_logprobs.append(top.values[r].tolist())
                reason = None
                if p.stop(seq.tokens):
                    seq.stop_reason = reason = "stop"
                elif p.steps + 1 < p.request.params.max_tokens and not cancelled:
                    still.append(sample_index)
                    keep.append(start + r)
                else:  # the length limit, or a stream whose reader went away
                    reason = "length"
                if stream is not None:
                    deltas.append(TokenDelta(
                        sample_index, seq.tokens[-1], seq.logprobs[-1],
                        seq.topk_ids[-1] if top is not None else None,
                        seq.topk_logprobs[-1] if top is not None else None, reason))
            if stream is not None:
                stream.push(deltas)
            p.live, p.steps = still, p.steps + 1
        finished = [(p.handle, p.result) for p in self.pending if not p.live]
        self.pending = [p for p in self.pending if p.live]
        if not keep:
            self.cache = self.mask = self.next_pos = self.next_logits = None
            return finished
        self._advance(chosen, keep)
        return finished

    def _row_starts(self) -> list[tuple[_Pending, int]]:
        """Each request with the batch row its rows start at."""
        out, start = [], 0
        for p in self.pending:
            out.append((p, start))
            start += len(p.live)
        return out

    def _choose(self, p: _Pending, logits: torch.Tensor) -> torch.Tensor:
        params = p.request.params
        if params.temperature == 0:
            return torch.argmax(logits, dim=-1)
        probs = torch.softmax(filter_logits(logits, params), dim=-1)
        return torch.cat([torch.multinomial(probs[r], 1, generator=p.generators[s])
                          for r, s in enumerate(p.live)])

    def _advance(self, chosen: torch.Tensor, keep: list[int]) -> None:
        if len(keep) < chosen.shape[0]:
            index = torch.tensor(keep, device=chosen.device)
            if self.lean is not None:
                self.cache.select(index)
            else:
                self.cache.batch_select_indices(index)
            self.mask, self.next_pos = self.mask[index], self.next_pos[index]
            chosen = chosen[index]
            padding = int((~self.mask).all(dim=0).long().cumprod(0).sum())
            if padding:  # drop the columns that are padding in every remaining row
                if self.lean is not None:
                    self.cache.crop_left(padding)
                else:
                    for layer in self.cache.layers:
                        layer.keys = layer.keys[:, :, padding:]
                        layer.values = layer.values[:, :, padding:]
                self.mask = self.mask[:, padding:]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        segments, start = [], 0
        for p in self.pending:
            segments.append(lora.Segment(p.adapter, start, start + len(p.live)))
            start += len(p.live)
        # Without padding (a lone request, or rows of equal length) no mask is needed, and the
        # model keeps its faster causal-attention path.
        padded = not bool(self.mask.all())
        if self.lean is not None:
            logits = self.lean.forward(chosen[:, None], self.next_pos[:, None], self.cache,
                                       self.mask if padded else None, segments)
            self.next_pos = self.next_pos + 1
            self.next_logits = logits[:, -1]
            return
        mask = self.mask.long() if padded else None
        with lora.activate(self.base.router, segments), self._autocast():
            out = self.base.model(input_ids=chosen[:, None], attention_mask=mask,
                                  position_ids=self.next_pos[:, None],
                                  past_key_values=self.cache, use_cache=True)
        self.next_pos = self.next_pos + 1
        self.next_logits = out.logits[:, -1].float()


def _pad_left(t: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


def _needs_prompt_logits(request: SampleRequest) -> bool:
    """Whether `prompt_scores` or `alt_tokens` read the logits of every prompt position."""
    return (request.prompt_logprobs or request.topk_prompt_logprobs > 0
            or request.target_prompt_ids is not None or request.prompt_alt_tokens_k > 0)


def sample_alone(base: BaseModel, adapter: lora.Adapter | None, request: SampleRequest,
                 dtype: str = "fp32", lean: bool = True) -> SampleResult:
    """Decode one request by itself (the same code path, a batch of one request)."""
    decoder = Decoder(base, dtype, max_rows=request.num_samples, lean=lean)
    decoder.admit(0, adapter, request)
    while True:
        for _, result in decoder.step():
            return result
