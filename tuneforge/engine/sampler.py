"""Autoregressive sampling with a KV cache, on token ids only.

One request = one prompt and `num_samples` continuations. The prompt is prefilled once (which also
yields the prompt logprobs), the cache is repeated for every sample, then all samples decode
together; a finished sample leaves the batch. Each sample draws from its own `torch.Generator`
seeded from `(seed, sample index)`, so a seeded request is reproducible and its samples differ.

Logprobs of sampled tokens (and their top-k) are those of the distribution sampled from,
`log_softmax(logits / temperature)`, before top-k / top-p truncation (as Tinker returns them);
with temperature 1 they equal the trainer's `forward` logprobs for the same tokens, which is what
importance-sampling losses compare. Temperature 0 means greedy, with the model's own logprobs.
Prompt scores (prompt logprobs, top-k, target ids) are always the model's own distribution.

Stopping: `stop=None` stops on the model's EOS tokens; a list replaces them (an empty list
disables every stop, as the SDK documents). The token that triggers a stop is included.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from tuneforge.engine.lora import Adapter, Router, Segment, activate


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


def _row_seed(seed: int, index: int) -> int:
    return (seed * 6364136223846793005 + 1442695040888963407 * (index + 1)) % (2**63)


def _filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
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


class _StopChecker:
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


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    router: Router,
    adapter: Adapter | None,
    request: SampleRequest,
    decode,
) -> SampleResult:
    """Run one sampling request. `decode(ids) -> str` is used for stop strings only."""
    device = next(model.parameters()).device
    params = request.params
    n = request.num_samples
    prompt = torch.tensor([request.prompt], dtype=torch.long, device=device)
    cache = DynamicCache()
    with activate(router, [Segment(adapter, 0, 1)]):
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    logits = out.logits[0].float()  # [P, V]
    result = SampleResult(sequences=[SampledSequence() for _ in range(n)])
    _prompt_scores(result, logits, request)

    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
    generators = [torch.Generator(device=device) for _ in range(n + 1)]  # the last: alt tokens
    for i, g in enumerate(generators):
        g.manual_seed(_row_seed(seed, i))
    if request.prompt_alt_tokens_k > 0:
        _alt_tokens(result, logits, request, generators[n])
    stop = _StopChecker(params, decode)

    cache.batch_repeat_interleave(n)
    next_logits = logits[-1:].expand(n, -1)
    active = list(range(n))  # sample index of each live row
    scale = params.temperature if params.temperature > 0 else 1.0
    for step in range(params.max_tokens):
        logprobs = torch.log_softmax(next_logits / scale, dim=-1)
        if params.temperature == 0:
            chosen = torch.argmax(next_logits, dim=-1)
        else:
            probs = torch.softmax(_filter_logits(next_logits, params), dim=-1)
            chosen = torch.cat(
                [torch.multinomial(probs[r], 1, generator=generators[s])
                 for r, s in enumerate(active)]
            )
        chosen_lp = logprobs.gather(-1, chosen[:, None])[:, 0]
        if request.topk_sample_logprobs > 0:
            top = torch.topk(logprobs, request.topk_sample_logprobs, dim=-1)
        keep: list[int] = []
        for r, s in enumerate(active):
            seq = result.sequences[s]
            seq.tokens.append(int(chosen[r]))
            seq.logprobs.append(float(chosen_lp[r]))
            if request.topk_sample_logprobs > 0:
                seq.topk_ids.append(top.indices[r].tolist())
                seq.topk_logprobs.append(top.values[r].tolist())
            if stop(seq.tokens):
                seq.stop_reason = "stop"
            else:
                keep.append(r)
        if not keep or step == params.max_tokens - 1:
            break
        if len(keep) < len(active):
            cache.batch_select_indices(torch.tensor(keep, device=device))
        active = [active[r] for r in keep]
        step_input = chosen[keep][:, None]
        with activate(router, [Segment(adapter, 0, len(active))]):
            out = model(input_ids=step_input, past_key_values=cache, use_cache=True)
        next_logits = out.logits[:, -1].float()
    return result


def _prompt_scores(result: SampleResult, logits: torch.Tensor, request: SampleRequest) -> None:
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



def _alt_tokens(result: SampleResult, logits: torch.Tensor, request: SampleRequest,
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
