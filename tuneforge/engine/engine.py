"""The engine: training models (LoRA adapter + AdamW state) and samplers over shared base models.

`Engine` is the in-process implementation of the engine seam (worker.py). All methods run on the
engine's worker thread (see scheduler/), one call at a time, so no state here is locked. A method
either completes or raises before touching any state it would leave half-changed: inputs are
validated before compute, and gradients are computed into fresh tensors and only added to the
accumulated gradient once the whole request succeeded.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import logging
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tuneforge.engine import checkpointing, decoder, lora, losses, passes, residency
from tuneforge.engine.models import BaseModel, ModelRegistry
from tuneforge.engine.optim import AdamParams, AdamW
from tuneforge.engine.sampler import SampleRequest, SampleResult
from tuneforge.engine.types import Datum, ForwardBackwardInput, ForwardBackwardResult
from tuneforge.engine.worker import ModelInfo, WorkerStats
from tuneforge.errors import (
    EngineError,
    LimitExceeded,
    NotFound,
    TuneforgeError,
    Unsupported,
    UserError,
)
from tuneforge.settings import Limits, Settings
from tuneforge.storage import checkpoints

logger = logging.getLogger(__name__)


@dataclass
class TrainingModel:
    model_id: str
    base: BaseModel
    adapter: lora.Adapter | None  # None while offloaded to disk
    optimizer: AdamW | None
    config: lora.LoRAConfig
    steps: int = 0
    gradient_checkpointing: bool = False  # asked for by this run (its base may ask for all)
    where: str = "device"  # "device" | "cpu" | "disk"
    nbytes: int = 0  # in memory, last measured (weights, gradients, optimizer state)
    held: list[torch.Tensor | None] | None = None  # a gradient waiting for `settle`
    passes_in_step: int = 0  # training requests since the last optimizer step (dropout keys)

    def dropout_key(self) -> int | None:
        """The key of the next training request's dropout masks: from the run's seed, its step
        and the request's number within the step, so a run resumed from a checkpoint draws the
        masks it would have drawn going on."""
        if self.config.dropout == 0:
            return None
        seed = self.config.seed if self.config.seed is not None else self.model_id
        self.passes_in_step += 1
        return lora.mix("dropout", seed, self.steps, self.passes_in_step)

    def info(self) -> ModelInfo:
        return ModelInfo(self.model_id, self.base.name, self.base.arch,
                         str(self.base.tokenizer_dir), self.config, self.steps)


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
        dtype: str = "fp32",
        spill_dir: Path | None = None,
        offload_dir: Path | None = None,
        adapter_memory_bytes: int = 4 << 30,
        cpu_memory_bytes: int = 16 << 30,
        max_decode_rows: int = 64,
    ) -> None:
        self.registry = registry
        registry.in_use = self._base_in_use
        self.limits = limits
        self.max_lora_rank = max_lora_rank
        self.dtype = dtype  # compute dtype: fp32 | bf16 (autocast)
        self.models: dict[str, TrainingModel] = {}
        # Adapters in memory, within a byte budget (see residency.py). Evicted training models go
        # to `offload_dir`; evicted snapshot samplers to `spill_dir`; samplers of checkpoints or
        # base models are simply reloaded from their source.
        self.samplers: dict[str, SamplerWeights] = {}
        self.spill_dir = spill_dir
        self.offload_dir = offload_dir
        self.budget = residency.Budget(adapter_memory_bytes)
        self.cpu_budget = residency.Budget(cpu_memory_bytes)  # second tier, on GPUs only
        self.max_decode_rows = max_decode_rows
        self.decoders: dict[str, decoder.Decoder] = {}  # per base model: the running batch

    @classmethod
    def from_settings(cls, settings: Settings, registry: ModelRegistry, spill_dir: Path,
                      offload_dir: Path) -> Engine:
        return cls(registry, settings.limits, max_lora_rank=settings.max_lora_rank,
                   dtype=registry.dtype, spill_dir=spill_dir, offload_dir=offload_dir,
                   adapter_memory_bytes=settings.adapter_memory_mb << 20,
                   cpu_memory_bytes=settings.cpu_offload_memory_mb << 20,
                   max_decode_rows=settings.max_decode_rows)

    def load_base(self, base_model: str) -> None:
        """Load a base model now (at start, before clients ask for it)."""
        self.registry.get(base_model)

    # ---- training models -------------------------------------------------------------------

    def create_model(self, model_id: str, base_model: str, config: lora.LoRAConfig,
                     gradient_checkpointing: bool = False) -> ModelInfo:
        if config.rank > self.max_lora_rank:
            raise LimitExceeded(
                f"lora_config.rank {config.rank} exceeds the limit "
                f"max_lora_rank={self.max_lora_rank}"
            )
        base = self.registry.get(base_model)
        adapter = lora.new_adapter(config, base.targets, base.model, base.device)
        return self._add_model(model_id, base, adapter, gradient_checkpointing).info()

    def _add_model(self, model_id: str, base: BaseModel, adapter: lora.Adapter,
                   gradient_checkpointing: bool) -> TrainingModel:
        if model_id in self.models:
            raise UserError(f"model_id {model_id} already exists")
        if ((gradient_checkpointing or base.gradient_checkpointing)
                and not checkpointing.supported(base.model)):
            raise Unsupported(f"gradient_checkpointing: base model {base.name} ({base.arch}) has "
                              "no decoder layers that can be checkpointed")
        tm = TrainingModel(model_id, base, adapter, AdamW(adapter.parameters()), adapter.config,
                           gradient_checkpointing=gradient_checkpointing)
        tm.nbytes = residency.training_bytes(adapter, tm.optimizer)
        self.models[model_id] = tm
        self.budget.add(("model", model_id), tm.nbytes)
        self._make_room({("model", model_id)})
        logger.info("created %s on %s: rank %d, groups %s, %d LoRA parameters", model_id,
                    base.name, adapter.config.rank, adapter.config.groups, adapter.num_parameters())
        return tm

    def forget_model(self, model_id: str) -> None:
        """Forget a training model (one whose creation the caller could not record)."""
        tm = self.models.pop(model_id, None)
        if tm is not None and tm.where == "disk":
            self._offload_path(model_id).unlink(missing_ok=True)
        self.budget.discard(("model", model_id))
        self.cpu_budget.discard(("model", model_id))

    def model_info(self, model_id: str) -> ModelInfo:
        tm = self.models.get(model_id)
        if tm is None:
            raise NotFound(f"model_id {model_id!r} is not a training model on this server")
        return tm.info()

    def model(self, model_id: str, pinned: frozenset = frozenset()) -> TrainingModel:
        """A training model, brought back into memory if it was offloaded."""
        tm = self.models.get(model_id)
        if tm is None:
            raise NotFound(f"model_id {model_id!r} is not a training model on this server")
        key = ("model", model_id)
        if tm.where != "device":
            self._bring_back(tm)
            self._make_room(pinned | {key})
        self.budget.touch(key)
        return tm

    # ---- residency ----------------------------------------------------------------------------

    def _bring_back(self, tm: TrainingModel) -> None:
        device = tm.base.device
        if tm.where == "disk":
            tm.adapter, tm.optimizer = residency.load(self._offload_path(tm.model_id),
                                                      tm.config, device)
        else:
            self.cpu_budget.discard(("model", tm.model_id))
            residency.move(tm.adapter, tm.optimizer, device)
        tm.where = "device"
        tm.nbytes = residency.training_bytes(tm.adapter, tm.optimizer)
        self.budget.add(("model", tm.model_id), tm.nbytes)

    def _make_room(self, pinned: set) -> None:
        """Release least recently used adapters until the budget holds (never `pinned` ones)."""
        for key in self.budget.victims(pinned):
            self.budget.discard(key)
            kind, ident = key
            if kind == "sampler":
                self._evict_sampler(ident)
                continue
            tm = self.models[ident]
            if tm.base.device.type != "cpu":  # GPU → CPU first
                residency.move(tm.adapter, tm.optimizer, torch.device("cpu"))
                tm.where = "cpu"
                self.cpu_budget.add(key, residency.training_bytes(tm.adapter, tm.optimizer))
                for cold in self.cpu_budget.victims(set()):
                    self.cpu_budget.discard(cold)
                    self._to_disk(self.models[cold[1]])
            else:
                self._to_disk(tm)

    def _to_disk(self, tm: TrainingModel) -> None:
        if self.offload_dir is None:
            raise EngineError("adapter memory budget exceeded and no offload directory is set")
        residency.save(self._offload_path(tm.model_id), tm.adapter, tm.optimizer)
        tm.adapter = tm.optimizer = None
        tm.where = "disk"
        logger.info("offloaded %s to disk", tm.model_id)

    def _offload_path(self, model_id: str) -> Path:
        return self.offload_dir / f"{model_id}.pt"

    def _base_in_use(self, name: str) -> bool:
        return (any(tm.base.name == name for tm in self.models.values())
                or any(w.base.name == name for w in self.samplers.values())
                or bool(self.decoders.get(name) and self.decoders[name].pending))

    def residency_counts(self) -> dict[str, int]:
        counts = {"device": 0, "cpu": 0, "disk": 0}
        for tm in self.models.values():
            counts[tm.where] += 1
        return counts

    def forward_backward(self, model_id: str, inp: ForwardBackwardInput) -> ForwardBackwardResult:
        outcome = self.forward_backward_batch([(model_id, inp)])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def forward_backward_batch(
        self, requests: list[tuple[str, ForwardBackwardInput]], hold: bool = False
    ) -> list[ForwardBackwardResult | Exception]:
        """Serve requests of distinct models together, one outcome per request, in order.

        Each request is validated on its own; the valid ones share passes per base model, in
        groups whose adapters fit the memory budget together. If a shared pass fails for a
        reason no single request explains, each request is retried alone, so one request can
        only fail itself.

        With `hold`, a successful request's gradient is kept aside until `settle` says whether
        to add it (a data-parallel group adds a request's gradients only where every replica's
        share succeeded).
        """
        outcomes: list[ForwardBackwardResult | Exception | None] = [None] * len(requests)
        for group in self._fitting_groups(list(enumerate(requests))):
            self._run_group(group, outcomes, hold)
        return outcomes

    def settle(self, verdicts: Mapping[str, bool]) -> None:
        """Add (True) or drop (False) each model's held gradient."""
        for model_id, keep in verdicts.items():
            tm = self.models.get(model_id)
            if tm is None or tm.held is None:
                continue
            held, tm.held = tm.held, None
            if keep:
                passes.commit(tm.adapter.parameters(), held)

    def _fitting_groups(self, items: list) -> list[list]:
        """Consecutive groups of requests whose adapters can be in memory at the same time."""
        groups, current, size = [], [], 0
        for item in items:
            tm = self.models.get(item[1][0])
            need = tm.nbytes if tm is not None else 0
            if current and size + need > self.budget.limit:
                groups.append(current)
                current, size = [], 0
            current.append(item)
            size += need
        return groups + [current] if current else groups

    def _run_group(self, group: list, outcomes: list, hold: bool) -> None:
        by_base: dict[str, list[tuple[int, passes.Job]]] = {}
        group_ids = {i: model_id for i, (model_id, _) in group}
        pinned = frozenset(("model", model_id) for _, (model_id, _) in group)
        for i, (model_id, inp) in group:
            try:
                base, job = self._prepare(model_id, inp, pinned)
            except TuneforgeError as e:
                outcomes[i] = e
                continue
            by_base.setdefault(base.name, []).append((i, job))
        for name, items in by_base.items():
            base = self.registry.get(name)
            try:
                results = passes.run(base, [job for _, job in items], self.dtype, not hold)
            except Exception as e:
                if len(items) == 1:  # fails that request alone: other groups' results stand
                    logger.exception("pass of one request failed")
                    results = [e]
                else:
                    logger.exception("shared pass of %d requests failed; running them alone",
                                     len(items))
                    results = []
                    for _, job in items:
                        job.reset()
                        try:
                            results.append(passes.run(base, [job], self.dtype, not hold)[0])
                        except Exception as alone:  # reported to that request alone
                            results.append(alone)
            for (i, job), result in zip(items, results, strict=True):
                outcomes[i] = result
                if hold and not isinstance(result, Exception):
                    self.models[group_ids[i]].held = job.grads
        self._account([self.models[model_id] for _, (model_id, _) in group
                       if model_id in self.models and self.models[model_id].where == "device"])

    def _prepare(self, model_id: str, inp: ForwardBackwardInput,
                 pinned: frozenset) -> tuple[BaseModel, passes.Job]:
        tm = self.model(model_id, pinned)
        spec = losses.get_loss(inp.loss_fn)
        config = losses.resolve_config(spec, inp.loss_fn, inp.loss_fn_config)
        rows = self._to_tensors(tm.base, inp.data, spec, inp.loss_fn)
        key = None if inp.forward_only else tm.dropout_key()
        return tm.base, passes.Job(tm.adapter, rows, spec, config, inp.forward_only,
                                   checkpoint=tm.gradient_checkpointing, dropout_key=key)

    def optim_step(self, model_id: str, hp: AdamParams,
                   reduce: Callable[[list[torch.Tensor]], None] | None = None
                   ) -> dict[str, float]:
        """One AdamW step on the accumulated gradient; `reduce`, when given, first combines
        the gradients with the other replicas' (a data-parallel all-reduce, in place)."""
        tm = self.model(model_id)
        if reduce is not None:
            reduce(tm.adapter.parameters())
        metrics = tm.optimizer.step(hp)
        tm.steps += 1
        tm.passes_in_step = 0
        self._account([tm])
        return metrics

    def _account(self, models: list[TrainingModel]) -> None:
        """Re-measure models whose gradients or optimizer state grew; release others if over."""
        keys = set()
        for tm in models:
            keys.add(("model", tm.model_id))
            tm.nbytes = residency.training_bytes(tm.adapter, tm.optimizer)
            self.budget.add(("model", tm.model_id), tm.nbytes)
        self._make_room(keys)

    # ---- checkpoints ------------------------------------------------------------------------

    def save(self, model_id: str, folder: Path, kind: str, name: str,
             user_metadata: Mapping[str, object] | None = None) -> int:
        tm = self.model(model_id)
        cfg = tm.adapter.config
        meta = {
            "training_run_id": model_id, "kind": kind, "name": name, "step": tm.steps,
            "base_model": tm.base.name, "quantization": tm.base.quantization,
            "created": dt.datetime.now(dt.UTC).isoformat(),
            "lora": {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout,
                     "train_attn": cfg.train_attn, "train_mlp": cfg.train_mlp,
                     "train_unembed": cfg.train_unembed, "seed": cfg.seed},
            "user_metadata": dict(user_metadata or {}),
        }
        adapter_config = checkpoints.peft_adapter_config(
            self.registry.peft_name(tm.base.name), cfg.rank, cfg.alpha, list(tm.adapter.A),
            dropout=cfg.dropout)
        optimizer_state = tm.optimizer.state_dict() if kind == "weights" else None
        return checkpoints.save(folder, tm.adapter.A, tm.adapter.B, adapter_config, meta,
                                optimizer_state)

    def load_model(self, model_id: str, folder: Path, with_optimizer: bool,
                   base_model: str | None = None, gradient_checkpointing: bool = False,
                   alpha: float | None = None, dropout: float | None = None) -> ModelInfo:
        """A training model from a checkpoint, with the checkpoint's LoRA alpha and dropout.
        `alpha`, when given, must be the checkpoint's (its weights were trained for that
        scaling); `dropout`, when given, replaces the checkpoint's for the training ahead."""
        ckpt = checkpoints.load(folder, with_optimizer=with_optimizer)
        name = ckpt.metadata.get("base_model") or ckpt.adapter_config["base_model_name_or_path"]
        if base_model and base_model != name:
            raise UserError(f"base_model {base_model!r} does not match the checkpoint's {name!r}")
        base = self.registry.get(name)
        adapter = self._adapter_from(base, ckpt, trainable=True)
        if alpha is not None and alpha != adapter.config.alpha:
            raise UserError(f"lora_alpha {alpha} does not match the checkpoint's lora_alpha "
                            f"{adapter.config.alpha}: its weights were trained for that scaling")
        if dropout is not None:
            adapter.config = dataclasses.replace(adapter.config, dropout=dropout)
        if with_optimizer and ckpt.optimizer_state is None:
            raise UserError(f"checkpoint {folder.name} has no optimizer state")
        tm = self._add_model(model_id, base, adapter, gradient_checkpointing)
        if with_optimizer:
            tm.optimizer.load_state_dict(ckpt.optimizer_state)
            tm.steps = int(ckpt.metadata.get("step", 0))
        return tm.info()

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
            tm.passes_in_step = 0

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
            train_unembed="unembed" in groups, seed=meta.get("seed"),
            dropout=float(ckpt.adapter_config.get("lora_dropout") or 0.0))
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
        nbytes = residency.tensors_bytes(weights.adapter.parameters()) if weights.adapter else 0
        self.budget.add(("sampler", sampler_id), nbytes)
        self._make_room({("sampler", sampler_id)})

    def _evict_sampler(self, sampler_id: str) -> None:
        """Drop a sampler's weights from memory; a snapshot is written out first."""
        old = self.samplers.pop(sampler_id)
        if old.snapshot and old.adapter is not None and self.spill_dir is not None:
            cfg = old.adapter.config
            checkpoints.save(
                self.spill_dir / sampler_id, old.adapter.A, old.adapter.B,
                checkpoints.peft_adapter_config(self.registry.peft_name(old.base.name),
                                                cfg.rank, cfg.alpha, list(old.adapter.A),
                                                dropout=cfg.dropout),
                {"base_model": old.base.name, "sampler_id": sampler_id,
                 "lora": {"seed": cfg.seed}})
        logger.info("sampler %s evicted from memory", sampler_id)

    def has_sampler(self, sampler_id: str) -> bool:
        return sampler_id in self.samplers

    def sampler_ids(self, prefix: str) -> list[str]:
        return [s for s in self.samplers if s.startswith(prefix)]

    def drop(self, prefix: str) -> None:
        """Forget the training models and samplers whose ids start with `prefix` (e.g. those of a
        finished session), with their offloaded and spilled files."""
        for kind, table in (("model", self.models), ("sampler", self.samplers)):
            for key in [k for k in table if k.startswith(prefix)]:
                if kind == "model" and table[key].where == "disk":
                    self._offload_path(key).unlink(missing_ok=True)
                del table[key]
                self.budget.discard((kind, key))
                self.cpu_budget.discard((kind, key))
        if self.spill_dir is not None:
            for folder in self.spill_dir.glob(f"{glob.escape(prefix)}*"):
                checkpoints.remove(folder)

    def sample(self, sampler_id: str, request: SampleRequest) -> SampleResult:
        """Serve one request by itself (tests, tools); the server decodes through `admit`."""
        weights = self._sampler(sampler_id, request)
        return decoder.sample_alone(weights.base, weights.adapter, request, self.dtype)

    def admit(self, handle: Hashable, sampler_id: str, request: SampleRequest) -> str:
        """Start decoding `request` in its base model's running batch; returns that base's name.

        Finished requests come back, with their handle, from `decode_step`.
        """
        weights = self._sampler(sampler_id, request)
        name = weights.base.name
        if name not in self.decoders:
            self.decoders[name] = decoder.Decoder(weights.base, self.dtype,
                                                  self.max_decode_rows)
        self.decoders[name].admit(handle, weights.adapter, request)
        return name

    def has_room(self, sampler_id: str, request: SampleRequest) -> bool:
        weights = self.samplers.get(sampler_id)
        dec = self.decoders.get(weights.base.name) if weights is not None else None
        return dec is None or dec.has_room(request)

    def decode_step(self) -> list[tuple[Hashable, SampleResult]]:
        """One decoding step of every base model with rows running."""
        finished = []
        for name, dec in list(self.decoders.items()):
            finished += dec.step()
            if not dec.pending:
                del self.decoders[name]  # holds its base model; made again on demand
        return finished

    def decoding(self) -> bool:
        return any(dec.pending for dec in self.decoders.values())

    def reset_decoding(self) -> None:
        """Drop every running decode batch (after a failed step; its requests have failed)."""
        self.decoders.clear()

    def stats(self) -> WorkerStats:
        cuda = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        return WorkerStats(
            residency=self.residency_counts(), samplers_resident=len(self.samplers),
            memory_bytes=int(self.budget.used), memory_limit_bytes=int(self.budget.limit),
            decode_rows={name: dec.rows for name, dec in self.decoders.items()},
            base_models=self.registry.sizes(), cuda_memory_bytes=int(cuda))

    def _sampler(self, sampler_id: str, request: SampleRequest) -> SamplerWeights:
        weights = self.samplers.get(sampler_id)
        if weights is None:
            raise NotFound(f"sampling_session_id {sampler_id!r} is not known to this server")
        self.budget.touch(("sampler", sampler_id))
        self._check_prompt(weights.base, request)
        return weights

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


def _check_ids(ids: np.ndarray, vocab: int, field: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise UserError(f"{field}: token id {bad} is outside the vocabulary [0, {vocab})")
