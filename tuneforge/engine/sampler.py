"""Sampling requests and results, and the per-token rules of sampling (the decoding loop that
serves many requests at once is `decoder.py`).

One request = one prompt and `num_samples` continuations. Each sample draws from its own
`torch.Generator` seeded from `(seed, sample index)`, so a seeded request is reproducible
whatever else is decoded beside it, and its samples differ.

Logprobs of sampled tokens (and their top-k) are those of the distribution sampled from,
`log_softmax(logits / temperature)`, before top-k / top-p truncation (as Tinker returns them);
with temperature 1 they equal the trainer's `forward` logprobs for the same tokens, which is what
importance-sampling losses compare. Temperature 0 means greedy, with the model's own logprobs.
Prompt scores (prompt logprobs, top-k, target ids) are always the model's own distribution.

Stopping: `stop=None` stops on the model's EOS tokens; a list replaces them (an empty list
disables every stop, as the SDK documents). The token that triggers a stop is included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenDelta:
    """One new token of one sample of a streaming request, as the decoder picked it."""

    index: int  # the sample (row) of the request
    token: int
    logprob: float
    topk_ids: list[int] | None = None  # when the request asked for topk_sample_logprobs
    topk_logprobs: list[float] | None = None
    stop_reason: str | None = None  # on the sample's last token: "stop" | "length"


class TokenListener(Protocol):
    """What the decoder needs of a stream (engine thread): `push` must never block."""

    @property
    def cancelled(self) -> bool: ...

    def push(self, deltas: list[TokenDelta]) -> None: ...


@dataclass(frozen=True)
class SampleRequest:
    prompt: list[int]
    num_samples: int
    params: SamplingParams
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    prompt_logprobs_last_n: int | None = None
    target_prompt_ids: np.ndarray | None = None  # int64 [P-1, K]; -1 = nothing requested
    prompt_alt_tokens_k: int = 0
    # A streaming request's listener (`scheduler.futures.TokenStream`): the decoder pushes each
    # step's new tokens to it and drops the request's rows once it is cancelled.
    stream: TokenListener | None = field(default=None, compare=False, repr=False)


@dataclass
class SampledSequence:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: str = "length"  # "stop" | "length"
    topk_ids: list[list[int]] = field(default_factory=list)
    topk_logprobs: list[list[float]] = field(default_factory=list)


@dataclass
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: np.ndarray | None = None  # float32 [P], NaN where not scored
    topk_prompt_ids: np.ndarray | None = None  # int32 [P, k]; row 0 and unscored rows empty
    topk_prompt_logprobs: np.ndarray | None = None  # float32 [P, k]
    target_prompt_logprobs: np.ndarray | None = None  # float32 [P-1, K]; 0.0 where not requested
    alt_tokens: np.ndarray | None = None  # int64 [P-1, k], drawn at the request's temperature
    alt_logprobs: np.ndarray | None = None  # float32 [P-1, k]


EMPTY_TOPK_LOGPROB = -99999.0


def row_seed(seed: int, index: int) -> int:
    return (seed * 6364136223846793005 + 1442695040888963407 * (index + 1)) % (2**63)


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to one step's `[rows, V]` logits."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class StopChecker:
    def __init__(self, params: SamplingParams, decode) -> None:
        self.token_ids = params.stop_token_ids
        self.strings = params.stop_strings
        self.decode = decode
        # enough trailing tokens to contain the longest stop string, plus partial-byte slack
        self.window = max((len(s) for s in self.strings), default=0) + 8

    def __call__(self, tokens: list[int]) -> bool:
        if tokens[-1] in self.token_ids:
            return True
        if self.strings:
            tail = self.decode(tokens[-self.window :])
            return any(s in tail for s in self.strings)
        return False


def prompt_scores(result: SampleResult, logits: torch.Tensor, request: SampleRequest) -> None:
    """Prompt logprobs, top-k and target-id prompt logprobs; position 0 is never scored."""
    plen = len(request.prompt)
    first = 1 if request.prompt_logprobs_last_n is None else plen - request.prompt_logprobs_last_n
    wanted = (request.prompt_logprobs or request.topk_prompt_logprobs > 0
              or request.target_prompt_ids is not None)
    if not wanted:
        return
    lp = torch.log_softmax(logits[:-1], dim=-1)  # row i scores prompt token i + 1
    if request.target_prompt_ids is not None:
        ids = torch.from_numpy(request.target_prompt_ids).to(lp.device)
        picked = lp.gather(-1, ids.clamp(min=0)).masked_fill(ids < 0, 0.0)
        result.target_prompt_logprobs = picked.cpu().numpy().astype(np.float32)
    if request.prompt_logprobs:
        targets = torch.tensor(request.prompt[1:], device=lp.device)
        scored = lp.gather(-1, targets[:, None])[:, 0].cpu().numpy()
        out = np.full(plen, np.nan, dtype=np.float32)
        out[first:] = scored[first - 1 :]
        result.prompt_logprobs = out
    k = request.topk_prompt_logprobs
    if k > 0:
        top = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
        ids = np.zeros((plen, k), dtype=np.int32)
        vals = np.full((plen, k), EMPTY_TOPK_LOGPROB, dtype=np.float32)
        ids[first:, : top.indices.shape[1]] = top.indices[first - 1 :].cpu().numpy()
        vals[first:, : top.values.shape[1]] = top.values[first - 1 :].cpu().numpy()
        result.topk_prompt_ids, result.topk_prompt_logprobs = ids, vals



def alt_tokens(result: SampleResult, logits: torch.Tensor, request: SampleRequest,
                gen: torch.Generator) -> None:
    """`k` tokens per prompt position after the first, drawn with replacement at the request's
    temperature from the model's next-token distribution, with their logprobs there."""
    k, temperature = request.prompt_alt_tokens_k, request.params.temperature
    rows = logits[:-1]
    if temperature == 0:
        tokens = rows.argmax(-1, keepdim=True).expand(-1, k)
        lp = torch.log_softmax(rows, dim=-1)
    else:
        lp = torch.log_softmax(rows / temperature, dim=-1)
        tokens = torch.multinomial(lp.exp(), k, replacement=True, generator=gen)
    result.alt_tokens = tokens.cpu().numpy().astype(np.int64)
    result.alt_logprobs = lp.gather(-1, tokens).cpu().numpy().astype(np.float32)
