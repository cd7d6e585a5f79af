"""Forward/backward passes that serve several adapters' requests at once.

Requests of different adapters on the same base model are packed into shared passes: their
datums become consecutive rows of one padded batch, each request's rows routed to its own
adapter (`lora.Segment`), so the base model's matmuls run once for everybody while each adapter
adds its own low-rank delta to its own rows. The loss of a pass is the sum of the requests' losses;
since adapters share no parameters, one backward yields each adapter exactly the gradient it
would get alone. Gradients are collected per request and only committed when all of that request
is done, so a request that fails leaves nothing behind.

Passes are bounded by a padded-token budget; a request bigger than the budget is split over
several passes (its gradients add up).

LoRA dropout: a training job of an adapter with dropout carries a `dropout_key`; each of its
pieces routes its rows with a key of its own, mixed from the job's key and the piece's number
(and, for lm_head on the packed path, the chunk's first token), so no two draws of a run repeat
a mask. Forward-only jobs carry none: `forward` scores without dropout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from tuneforge.engine import lora, losses
from tuneforge.engine.models import BaseModel
from tuneforge.engine.types import ForwardBackwardResult
from tuneforge.errors import UserError

# Padded tokens per forward pass.
MICROBATCH_TOKENS = 8192

Row = tuple[torch.Tensor, dict[str, torch.Tensor]]  # tokens [N], loss inputs


@dataclass
class Job:
    """One validated forward / forward_backward request of one adapter."""

    adapter: lora.Adapter
    rows: list[Row]
    spec: losses.LossSpec
    config: Mapping[str, float]
    forward_only: bool
    checkpoint: bool = False  # gradient checkpointing asked for by this request's run
    dropout_key: int | None = None  # seeds the adapter's dropout masks (None: no dropout)
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    loss: float = 0.0
    grads: list[torch.Tensor | None] = field(default_factory=list)
    pieces_run: int = 0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget partial results (before running the job again)."""
        self.outputs, self.loss, self.pieces_run = [], 0.0, 0
        self.grads = [None] * len(self.adapter.parameters())

    def next_piece_key(self) -> int | None:
        """The dropout key of this job's next piece (None: the job runs without dropout)."""
        self.pieces_run += 1
        if self.forward_only or self.dropout_key is None or self.adapter.config.dropout == 0:
            return None
        return lora.mix(self.dropout_key, self.pieces_run)


def run(base: BaseModel, jobs: list[Job], dtype: str,
        commit_grads: bool = True) -> list[ForwardBackwardResult]:
    """Run `jobs` (distinct adapters of `base`) in shared passes; commit each job's gradient
    (or, without `commit_grads`, leave it in `job.grads` for the caller to `commit`)."""
    for pass_ in _plan(jobs):
        _run_pass(base, pass_, dtype)
    results = []
    for job in jobs:
        if not math.isfinite(job.loss):
            results.append(UserError(f"loss is not finite ({job.loss}); no gradient was "
                                     "accumulated"))
            continue
        if commit_grads:
            commit(job.adapter.parameters(), job.grads)
        results.append(ForwardBackwardResult(outputs=job.outputs,
                                             metrics={"loss:sum": job.loss}))
    return results


def commit(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """Add a request's gradients to the parameters' accumulated ones."""
    for p, g in zip(params, grads, strict=True):
        if g is not None:
            g = g.to(p.device)  # no copy unless the adapter moved since
            p.grad = g if p.grad is None else p.grad.add_(g)


def _plan(jobs: list[Job]) -> list[list[tuple[Job, list[Row]]]]:
    """Pack (job, rows) pieces into passes under the padded-token budget, keeping row order."""
    passes: list[list[tuple[Job, list[Row]]]] = []
    current: list[tuple[Job, list[Row]]] = []
    rows_in_pass, longest = 0, 0
    for job in jobs:
        piece: list[Row] = []
        for row in job.rows:
            longer = max(longest, len(row[0]))
            if rows_in_pass and longer * (rows_in_pass + 1) > MICROBATCH_TOKENS:
                if piece:
                    current.append((job, piece))
                passes.append(current)
                current, piece, rows_in_pass, longer = [], [], 0, len(row[0])
            piece.append(row)
            rows_in_pass += 1
            longest = longer
        if piece:
            current.append((job, piece))
    if current:
        passes.append(current)
    return passes


def _run_pass(base: BaseModel, pieces: list[tuple[Job, list[Row]]], dtype: str) -> None:
    rows = [row for _, piece in pieces for row in piece]
    segments, start = [], 0
    for job, piece in pieces:
        segments.append(lora.Segment(job.adapter, start, start + len(piece),
                                     job.next_piece_key()))
        start += len(piece)
    backward = [job for job, _ in pieces if not job.forward_only]
    checkpoint = bool(backward) and (base.gradient_checkpointing
                                     or any(job.checkpoint for job in backward))
    # The routing stays active through the backward pass: checkpointed layers recompute their
    # forward (LoRA deltas included) there.
    with lora.activate(base.router, segments, checkpoint):
        with torch.set_grad_enabled(bool(backward)):
            lps, elementwise = _losses(base, rows, pieces, dtype)
        _collect(pieces, lps, elementwise, backward)


def _collect(pieces: list[tuple[Job, list[Row]]], lps: list, elementwise: list,
             backward: list[Job]) -> None:
    """Each job's outputs and loss from the pass; the gradients of the jobs that train."""
    offset = 0
    item_losses = []
    for job, piece in pieces:
        mine = elementwise[offset:offset + len(piece)]
        item_loss = sum(e.sum() for e in mine)
        item_losses.append(item_loss)
        job.loss += float(item_loss.detach())
        for lp, e in zip(lps[offset:offset + len(piece)], mine, strict=True):
            job.outputs.append({"logprobs": lp.detach().float().cpu().numpy(),
                                "elementwise_loss": e.detach().float().cpu().numpy()})
        offset += len(piece)
    if not backward:
        return
    total = sum(loss for (job, _), loss in zip(pieces, item_losses, strict=True)
                if not job.forward_only)
    params = [p for job in backward for p in job.adapter.parameters()]
    grads = iter(torch.autograd.grad(total, params, allow_unused=True))
    for job in backward:
        for i in range(len(job.grads)):
            g = next(grads)
            if g is not None:
                job.grads[i] = g if job.grads[i] is None else job.grads[i] + g


# Causal LMs whose logits are exactly `lm_head(last hidden state)` (no scaling, no soft-capping):
# their loss can be taken from the decoder's hidden states of the real positions alone.
HEAD_ONLY_ARCHS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                             "Qwen3ForCausalLM"})
# Rows of hidden states per lm_head + log-softmax chunk: its logits stay in the cache between
# the matmul and the softmax (measured on SmolLM2 and tiny-qwen3, 1 thread; see bench/RESULTS.md).
CHUNK_TOKENS = 128
PACKED = True  # False: every pass takes the reference path (`reference_losses`)


def _losses(base: BaseModel, rows: list[Row], pieces: list[tuple[Job, list[Row]]], dtype: str):
    if PACKED and base.arch in HEAD_ONLY_ARCHS:
        return packed_losses(base, rows, pieces, dtype)
    return reference_losses(base, rows, pieces, dtype)


def packed_losses(base: BaseModel, rows: list[Row], pieces: list[tuple[Job, list[Row]]],
                  dtype: str):
    """Per-row target logprobs and elementwise losses, from the real positions only.

    The decoder runs on the padded batch; its last hidden states of the real (non-padding)
    positions are packed into [Ntok, H], and lm_head plus the log-softmax run on chunks of at
    most `CHUNK_TOKENS` of them, each chunk within one adapter's tokens (so lm_head's LoRA delta
    is that adapter's alone). No [B, T, V] logits tensor is ever made: padding costs nothing in
    the vocabulary-sized part, and each chunk's logits stay in the cache from the matmul to the
    softmax (and back in the backward pass)."""
    lengths = [len(t) for t, _ in rows]
    tokens = torch.nn.utils.rnn.pad_sequence([t for t, _ in rows], batch_first=True)
    autocast = torch.autocast(base.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    with autocast:
        hidden = base.model.get_decoder()(input_ids=tokens, use_cache=False).last_hidden_state
    if min(lengths) == tokens.shape[1]:
        packed = hidden.reshape(-1, hidden.shape[-1])  # no padding: a view
    else:
        real = torch.arange(tokens.shape[1], device=tokens.device) < torch.tensor(
            lengths, device=tokens.device)[:, None]
        packed = hidden[real]  # row-major: each row's positions in order, rows in order
    offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    two_d = any(inputs["target_tokens"].ndim == 2 for _, inputs in rows)
    widths = [inputs["target_tokens"].shape[1] if inputs["target_tokens"].ndim == 2 else 1
              for _, inputs in rows]
    if two_d:
        index = torch.zeros(offsets[-1], max(widths), dtype=torch.long, device=tokens.device)
        for r, (_, inputs) in enumerate(rows):
            index[offsets[r]:offsets[r + 1], :widths[r]] = inputs["target_tokens"].view(
                lengths[r], -1)
    else:
        index = torch.cat([inputs["target_tokens"] for _, inputs in rows]).to(tokens.device)
    head = base.model.get_output_embeddings()
    router = base.router
    picked = []
    for seg in router.segments:  # rows of one adapter are consecutive, so are their tokens
        stop = offsets[seg.stop]
        for start in range(offsets[seg.start], stop, CHUNK_TOKENS):
            end = min(start + CHUNK_TOKENS, stop)
            key = (None if seg.dropout_key is None
                   else lora.mix(seg.dropout_key, start - offsets[seg.start]))
            with lora.activate(router, [lora.Segment(seg.adapter, 0, end - start, key)],
                               router.checkpoint), autocast:
                logits = head(packed[start:end])
            logits = logits.float()  # (a chunk at a time; a no-op in fp32)
            if two_d:
                picked.append(logits.gather(-1, index[start:end])
                              - torch.logsumexp(logits, -1, keepdim=True))
            else:
                # the fused kernel: -logprob, and in the backward softmax minus one-hot, in one
                # sweep over the vocabulary
                picked.append(-torch.nn.functional.cross_entropy(
                    logits, index[start:end], reduction="none"))
    per_row = torch.cat(picked).split(lengths)  # one split: one backward op for every row
    lps, elementwise, r = [], [], 0
    for job, piece in pieces:
        for _, inputs in piece:
            lp = per_row[r]
            lp = lp[:, :widths[r]] if two_d else lp
            lp = lp.reshape(inputs["target_tokens"].shape)
            lps.append(lp)
            elementwise.append(job.spec.fn(lp, inputs, job.config))
            r += 1
    return lps, elementwise


def reference_losses(base: BaseModel, rows: list[Row], pieces: list[tuple[Job, list[Row]]],
                     dtype: str):
    """The full-logits path: the HF model's logits [B, T, V] for every position (padding
    included), then the log-softmax over all of them. Works for every causal LM; the reference
    that `packed_losses` is tested against."""
    tokens = torch.nn.utils.rnn.pad_sequence([t for t, _ in rows], batch_first=True)
    # Right padding needs no attention mask: causal attention never looks ahead, so real
    # positions are unaffected by the padding after them.
    autocast = torch.autocast(base.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    with autocast:
        logits = base.model(input_ids=tokens, use_cache=False).logits
    logits = logits.float()
    if all(inputs["target_tokens"].ndim == 1 for _, inputs in rows):
        # One target per position: the fused cross-entropy kernel gives -logprob and, in the
        # backward, softmax minus one-hot in a single sweep over the vocabulary.
        targets = torch.full(tokens.shape, -100, dtype=torch.long, device=tokens.device)
        for r, (t, inputs) in enumerate(rows):
            targets[r, : len(t)] = inputs["target_tokens"]
        picked = -torch.nn.functional.cross_entropy(
            logits.view(-1, logits.shape[-1]), targets.view(-1), reduction="none",
            ignore_index=-100).view(*tokens.shape, 1)
        widths = [1] * len(rows)
    else:
        # K targets per position: gather them from the padded batch in one op (slicing the
        # [B, T, V] logits per row would make autograd build a full-size zero gradient per slice)
        widths = [1 if inputs["target_tokens"].ndim == 1 else inputs["target_tokens"].shape[1]
                  for _, inputs in rows]
        index = torch.zeros(*tokens.shape, max(widths), dtype=torch.long, device=tokens.device)
        for r, (t, inputs) in enumerate(rows):
            index[r, : len(t), : widths[r]] = inputs["target_tokens"].view(len(t), -1)
        picked = logits.gather(-1, index) - torch.logsumexp(logits, -1, keepdim=True)
    lps, elementwise, r = [], [], 0
    for job, piece in pieces:
        for t, inputs in piece:
            lp = picked[r, : len(t), : widths[r]].reshape(inputs["target_tokens"].shape)
            lps.append(lp)
            elementwise.append(job.spec.fn(lp, inputs, job.config))
            r += 1
    return lps, elementwise
