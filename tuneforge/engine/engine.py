"""The engine: training models (LoRA adapter + AdamW state) and samplers over shared base models.

All methods run on the engine's worker thread (see scheduler/), one call at a time, so no state
here is locked. A method either completes or raises before touching any state it would leave
half-changed: inputs are validated before compute, and gradients are computed into fresh tensors
and only added to the accumulated gradient once the whole request succeeded.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tuneforge.engine import lora, losses
from tuneforge.engine.models import BaseModel, ModelRegistry
from tuneforge.engine.optim import AdamParams, AdamW
from tuneforge.engine.sampler import SampleRequest, SampleResult, sample
from tuneforge.engine.types import Datum, ForwardBackwardInput, ForwardBackwardResult
from tuneforge.errors import LimitExceeded, NotFound, Unsupported, UserError
from tuneforge.settings import Limits
from tuneforge.storage import checkpoints

logger = logging.getLogger(__name__)

# Padded tokens per forward pass; larger requests run in micro-batches whose gradients add up.
MICROBATCH_TOKENS = 8192


@dataclass
class TrainingModel:
    model_id: str
    base: BaseModel
    adapter: lora.Adapter
    optimizer: AdamW
    steps: int = 0


@dataclass
class SamplerWeights:
    base: BaseModel
    adapter: lora.Adapter | None  # None = the base model itself
    snapshot: bool = False  # in-memory copy of a training model's weights, no file behind it


class Engine:
    def __init__(
        self,
        registry: ModelRegistry,
        limits: Limits,
        max_lora_rank: int = 128,
        precision: str = "fp32",
        spill_dir: Path | None = None,
        max_resident_samplers: int = 32,
    ) -> None:
        self.registry = registry
        self.limits = limits
        self.max_lora_rank = max_lora_rank
        self.precision = precision
        self.models: dict[str, TrainingModel] = {}
        # Least recently used first. Evicted snapshots are written to `spill_dir` and reloaded
        # from there; samplers of checkpoints or base models are simply reloaded from source.
        self.samplers: OrderedDict[str, SamplerWeights] = OrderedDict()
        self.spill_dir = spill_dir
        self.max_resident_samplers = max_resident_samplers

    # ---- training models -------------------------------------------------------------------

    def create_model(self, model_id: str, base_model: str,
                     config: lora.LoRAConfig) -> TrainingModel:
        if config.rank > self.max_lora_rank:
            raise LimitExceeded(
                f"lora_config.rank {config.rank} exceeds the limit "
                f"max_lora_rank={self.max_lora_rank}"
            )
        base = self.registry.get(base_model)
        adapter = lora.new_adapter(config, base.targets, base.model, base.device)
        return self._add_model(model_id, base, adapter)

    def _add_model(self, model_id: str, base: BaseModel, adapter: lora.Adapter) -> TrainingModel:
        if model_id in self.models:
            raise UserError(f"model_id {model_id} already exists")
        tm = TrainingModel(model_id, base, adapter, AdamW(adapter.parameters()))
        self.models[model_id] = tm
        logger.info("created %s on %s: rank %d, groups %s, %d LoRA parameters", model_id,
                    base.name, adapter.config.rank, adapter.config.groups, adapter.num_parameters())
        return tm

    @contextlib.contextmanager
    def undo_model_on_error(self, model_id: str) -> Iterator[None]:
        """Forget a just-created model if the block that records it elsewhere fails."""
        try:
            yield
        except BaseException:
            self.models.pop(model_id, None)
            raise

    def model(self, model_id: str) -> TrainingModel:
        tm = self.models.get(model_id)
        if tm is None:
            raise NotFound(f"model_id {model_id!r} is not a training model on this server")
        return tm

    def forward_backward(self, model_id: str, inp: ForwardBackwardInput) -> ForwardBackwardResult:
        tm = self.model(model_id)
        spec = losses.get_loss(inp.loss_fn)
        config = losses.resolve_config(spec, inp.loss_fn, inp.loss_fn_config)
        data = self._to_tensors(tm.base, inp.data, spec, inp.loss_fn)
        params = tm.adapter.parameters()
        outputs: list[dict[str, np.ndarray]] = []
        total = 0.0
        grads: list[torch.Tensor | None] = [None] * len(params)
        for batch in _microbatches(data):
            with torch.set_grad_enabled(not inp.forward_only):
                lps, elementwise = self._losses(tm.base, tm.adapter, batch, spec, config)
                loss = sum(e.sum() for e in elementwise)
            if not inp.forward_only:
                for i, g in enumerate(torch.autograd.grad(loss, params, allow_unused=True)):
                    if g is not None:
                        grads[i] = g if grads[i] is None else grads[i] + g
            total += float(loss.detach())
            for lp, e in zip(lps, elementwise, strict=True):
                outputs.append({
                    "logprobs": lp.detach().float().cpu().numpy(),
                    "elementwise_loss": e.detach().float().cpu().numpy(),
                })
        if not math.isfinite(total):
            raise UserError(f"loss is not finite ({total}); no gradient was accumulated")
        for p, g in zip(params, grads, strict=True):  # commit only after every batch succeeded
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        return ForwardBackwardResult(outputs=outputs, metrics={"loss:sum": total})

    def optim_step(self, model_id: str, hp: AdamParams) -> dict[str, float]:
        tm = self.model(model_id)
        metrics = tm.optimizer.step(hp)
        tm.steps += 1
        return metrics

    # ---- checkpoints ------------------------------------------------------------------------

    def save(self, model_id: str, folder: Path, kind: str, name: str,
             user_metadata: Mapping[str, object] | None = None) -> int:
        tm = self.model(model_id)
        cfg = tm.adapter.config
        meta = {
            "training_run_id": model_id, "kind": kind, "name": name, "step": tm.steps,
            "base_model": tm.base.name, "created": dt.datetime.now(dt.UTC).isoformat(),
            "lora": {"rank": cfg.rank, "alpha": cfg.alpha, "train_attn": cfg.train_attn,
                     "train_mlp": cfg.train_mlp, "train_unembed": cfg.train_unembed,
                     "seed": cfg.seed},
            "user_metadata": dict(user_metadata or {}),
        }
        adapter_config = checkpoints.peft_adapter_config(
            tm.base.name, cfg.rank, cfg.alpha, list(tm.adapter.A))
        optimizer_state = tm.optimizer.state_dict() if kind == "weights" else None
        return checkpoints.save(folder, tm.adapter.A, tm.adapter.B, adapter_config, meta,
                                optimizer_state)

    def load_model(self, model_id: str, folder: Path, with_optimizer: bool,
                   base_model: str | None = None) -> TrainingModel:
        ckpt = checkpoints.load(folder, with_optimizer=with_optimizer)
        name = ckpt.metadata.get("base_model") or ckpt.adapter_config["base_model_name_or_path"]
        if base_model and base_model != name:
            raise UserError(f"base_model {base_model!r} does not match the checkpoint's {name!r}")
        base = self.registry.get(name)
        adapter = self._adapter_from(base, ckpt, trainable=True)
        tm = self._add_model(model_id, base, adapter)
        if with_optimizer:
            if ckpt.optimizer_state is None:
                raise UserError(f"checkpoint {folder.name} has no optimizer state")
            tm.optimizer.load_state_dict(ckpt.optimizer_state)
            tm.steps = int(ckpt.metadata.get("step", 0))
        return tm

    def load_into(self, model_id: str, folder: Path, with_optimizer: bool) -> None:
        """Replace a model's weights (and optionally optimizer state) from a checkpoint."""
        tm = self.model(model_id)
        ckpt = checkpoints.load(folder, with_optimizer=with_optimizer)
        incoming = self._adapter_from(tm.base, ckpt, trainable=True)
        mine = tm.adapter
        same = incoming.A.keys() == mine.A.keys() and all(
            incoming.A[k].shape == mine.A[k].shape and incoming.B[k].shape == mine.B[k].shape
            for k in mine.A)
        if not same or incoming.config.alpha != mine.config.alpha:
            raise UserError(f"checkpoint {folder.name} does not match {model_id}'s LoRA "
                            "configuration (rank, alpha or target modules)")
        if with_optimizer and ckpt.optimizer_state is None:
            raise UserError(f"checkpoint {folder.name} has no optimizer state")
        with torch.no_grad():
            for k in mine.A:
                mine.A[k].copy_(incoming.A[k])
                mine.B[k].copy_(incoming.B[k])
        tm.optimizer.zero_grad()
        tm.optimizer = AdamW(mine.parameters())
        if with_optimizer:
            tm.optimizer.load_state_dict(ckpt.optimizer_state)
            tm.steps = int(ckpt.metadata.get("step", 0))

    def _adapter_from(self, base: BaseModel, ckpt: checkpoints.LoadedCheckpoint,
                      trainable: bool) -> lora.Adapter:
        meta = ckpt.metadata.get("lora", {})
        known = {p for paths in base.targets.values() for p in paths}
        unknown = sorted(set(ckpt.A) - known)
        if unknown:
            raise Unsupported(f"checkpoint adapts modules this base model lacks: {unknown[:3]}")
        groups = {g for g, paths in base.targets.items() if set(paths) & set(ckpt.A)}
        config = lora.LoRAConfig(
            rank=int(ckpt.adapter_config["r"]), alpha=float(ckpt.adapter_config["lora_alpha"]),
            train_attn="attn" in groups, train_mlp="mlp" in groups,
            train_unembed="unembed" in groups, seed=meta.get("seed"))
        adapter = lora.Adapter(config=config)
        for path in ckpt.A:
            for store, value in ((adapter.A, ckpt.A[path]), (adapter.B, ckpt.B[path])):
                store[path] = value.to(base.device, torch.float32).requires_grad_(trainable)
        return adapter

    # ---- sampling -----------------------------------------------------------------------------

    def add_sampler_snapshot(self, sampler_id: str, model_id: str) -> None:
        tm = self.model(model_id)
        self._add_sampler(sampler_id, SamplerWeights(tm.base, tm.adapter.snapshot(),
                                                     snapshot=True))

    def add_sampler_from_checkpoint(self, sampler_id: str, folder: Path) -> str:
        ckpt = checkpoints.load(folder)
        base = self.registry.get(ckpt.metadata.get("base_model")
                                 or ckpt.adapter_config["base_model_name_or_path"])
        self._add_sampler(sampler_id, SamplerWeights(base, self._adapter_from(base, ckpt, False)))
        return base.name

    def add_sampler_for_base(self, sampler_id: str, base_model: str) -> None:
        self._add_sampler(sampler_id, SamplerWeights(self.registry.get(base_model), None))

    def spilled_sampler(self, sampler_id: str) -> Path | None:
        """Where an evicted snapshot sampler was written, if it was."""
        if self.spill_dir is None:
            return None
        folder = self.spill_dir / sampler_id
        return folder if folder.exists() else None

    def _add_sampler(self, sampler_id: str, weights: SamplerWeights) -> None:
        self.samplers[sampler_id] = weights
        self.samplers.move_to_end(sampler_id)
        while len(self.samplers) > self.max_resident_samplers:
            old_id, old = self.samplers.popitem(last=False)
            if old.snapshot and old.adapter is not None and self.spill_dir is not None:
                cfg = old.adapter.config
                checkpoints.save(
                    self.spill_dir / old_id, old.adapter.A, old.adapter.B,
                    checkpoints.peft_adapter_config(old.base.name, cfg.rank, cfg.alpha,
                                                    list(old.adapter.A)),
                    {"base_model": old.base.name, "sampler_id": old_id,
                     "lora": {"seed": cfg.seed}})
            logger.info("sampler %s evicted from memory", old_id)

    def drop_session(self, session_id: str) -> None:
        """Forget the training models and samplers of a finished session."""
        prefix = f"{session_id}:"
        for table in (self.models, self.samplers):
            for key in [k for k in table if k.startswith(prefix)]:
                del table[key]
        if self.spill_dir is not None:
            for folder in self.spill_dir.glob(f"{session_id}:*"):
                checkpoints.remove(folder)

    def sample(self, sampler_id: str, request: SampleRequest) -> SampleResult:
        weights = self.samplers.get(sampler_id)
        if weights is None:
            raise NotFound(f"sampling_session_id {sampler_id!r} is not known to this server")
        self.samplers.move_to_end(sampler_id)
        base = weights.base
        self._check_prompt(base, request)
        autocast = torch.autocast(base.device.type, dtype=torch.bfloat16,
                                  enabled=self.precision == "bf16")
        with autocast:
            return sample(base.model, base.router, weights.adapter, request, base.decode)

    def _check_prompt(self, base: BaseModel, r: SampleRequest) -> None:
        lim = self.limits
        if not r.prompt:
            raise UserError("prompt: must contain at least one token")
        _check_ids(np.asarray(r.prompt), base.vocab_size, "prompt")
        if len(r.prompt) + r.params.max_tokens > base.max_context:
            raise LimitExceeded(
                f"prompt ({len(r.prompt)} tokens) + sampling_params.max_tokens "
                f"({r.params.max_tokens}) exceeds the model context of {base.max_context}"
            )
        if len(r.prompt) > lim.max_tokens_per_request:
            raise LimitExceeded(f"prompt: {len(r.prompt)} tokens exceeds the limit "
                                f"max_tokens_per_request={lim.max_tokens_per_request}")
        last_n = r.prompt_logprobs_last_n
        if last_n is not None and not 1 <= last_n < len(r.prompt):
            raise UserError(f"prompt_logprobs_last_n must be between 1 and len(prompt) - 1 = "
                            f"{len(r.prompt) - 1}, got {r.prompt_logprobs_last_n}")

    # ---- internals ----------------------------------------------------------------------------

    def _to_tensors(self, base: BaseModel, data: list[Datum], spec: losses.LossSpec,
                    loss_fn: str) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        lim = self.limits
        if not data:
            raise UserError("data: at least one datum is required")
        if len(data) > lim.max_datums_per_request:
            raise LimitExceeded(f"data: {len(data)} datums exceeds the limit "
                                f"max_datums_per_request={lim.max_datums_per_request}")
        total = sum(len(d.tokens) for d in data)
        if total > lim.max_tokens_per_request:
            raise LimitExceeded(f"data: {total} tokens exceeds the limit "
                                f"max_tokens_per_request={lim.max_tokens_per_request}")
        max_len = min(lim.max_tokens_per_datum, base.max_context)
        out = []
        for i, d in enumerate(data):
            n = len(d.tokens)
            if n == 0:
                raise UserError(f"data[{i}].model_input: must contain at least one token")
            if n > max_len:
                name = ("max_tokens_per_datum" if max_len == lim.max_tokens_per_datum
                        else "model context length")
                raise LimitExceeded(f"data[{i}].model_input: {n} tokens exceeds the limit "
                                    f"{name}={max_len}")
            _check_ids(d.tokens, base.vocab_size, f"data[{i}].model_input")
            losses.check_inputs(spec, loss_fn, d.inputs, i)
            targets = d.inputs["target_tokens"]
            if targets.dtype != np.int64:
                raise UserError(f"data[{i}].loss_fn_inputs['target_tokens'] must be int64")
            if targets.ndim not in (1, 2) or targets.shape[0] != n:
                raise UserError(
                    f"data[{i}].loss_fn_inputs['target_tokens'] has shape {list(targets.shape)}; "
                    f"expected [{n}] or [{n}, K] to match model_input's {n} tokens")
            _check_ids(targets, base.vocab_size, f"data[{i}].loss_fn_inputs['target_tokens']")
            tensors = {}
            for key, value in d.inputs.items():
                if key != "target_tokens":
                    if value.dtype != np.float32:
                        raise UserError(f"data[{i}].loss_fn_inputs['{key}'] must be float32")
                    if not np.isfinite(value).all():
                        raise UserError(f"data[{i}].loss_fn_inputs['{key}'] contains NaN or inf")
                tensors[key] = torch.from_numpy(np.ascontiguousarray(value)).to(base.device)
            out.append((torch.from_numpy(d.tokens).to(base.device), tensors))
        return out

    def _losses(self, base: BaseModel, adapter: lora.Adapter, batch, spec: losses.LossSpec,
                config: Mapping[str, float]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        tokens = torch.nn.utils.rnn.pad_sequence([t for t, _ in batch], batch_first=True)
        # Right padding needs no attention mask: causal attention never looks ahead, so real
        # positions are unaffected by the padding after them.
        autocast = torch.autocast(base.device.type, dtype=torch.bfloat16,
                                  enabled=self.precision == "bf16")
        with lora.activate(base.router, [lora.Segment(adapter, 0, len(batch))]), autocast:
            logits = base.model(input_ids=tokens, use_cache=False).logits
        # Gather every datum's targets from the padded batch in one op: slicing the [B, T, V]
        # logits per datum would make autograd materialise a full-size zero gradient per slice.
        widths = [1 if inputs["target_tokens"].ndim == 1 else inputs["target_tokens"].shape[1]
                  for _, inputs in batch]
        index = torch.zeros(*tokens.shape, max(widths), dtype=torch.long, device=tokens.device)
        for row, (t, inputs) in enumerate(batch):
            index[row, : len(t), : widths[row]] = inputs["target_tokens"].view(len(t), -1)
        logits = logits.float()
        picked = logits.gather(-1, index) - torch.logsumexp(logits, -1, keepdim=True)
        lps, elementwise = [], []
        for row, (t, inputs) in enumerate(batch):
            lp = picked[row, : len(t), : widths[row]].reshape(inputs["target_tokens"].shape)
            lps.append(lp)
            elementwise.append(spec.fn(lp, inputs, config))
        return lps, elementwise


def _check_ids(ids: np.ndarray, vocab: int, field: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise UserError(f"{field}: token id {bad} is outside the vocabulary [0, {vocab})")


def _microbatches(data: list) -> list[list]:
    batches: list[list] = []
    current: list = []
    longest = 0
    for item in data:
        longest_next = max(longest, len(item[0]))
        if current and longest_next * (len(current) + 1) > MICROBATCH_TOKENS:
            batches.append(current)
            current, longest_next = [], len(item[0])
        current.append(item)
        longest = longest_next
    if current:
        batches.append(current)
    return batches
