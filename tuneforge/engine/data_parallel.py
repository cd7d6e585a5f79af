"""A data-parallel group: K engine workers that serve each of their runs together.

Every member holds a replica of each adapter (created from the same seed, or loaded from the same
checkpoint). A `forward_backward` request's datums are split into K consecutive shards, one per
member, computed at the same time; the outputs are joined back in order and the metrics combined.
Each member keeps its share of the gradient aside until every share succeeded, then all add it or
all drop it (`settle`), so a request that fails anywhere fails everywhere and the replicas stay
equal. `optim_step` all-reduces (sums) the LoRA gradients over the group with torch.distributed
(gloo on CPU, NCCL on GPU) and every member applies the same AdamW step. Losses in Tinker are
sums over datums, so the reduced gradient is exactly the gradient of the whole batch.

Saving, sampling and decoding use the first member's replica. Collectives are issued from this
object's one thread in one order, so the members always enter them in the same order.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable, Hashable, Mapping
from dataclasses import replace
from pathlib import Path

from tuneforge.engine.lora import LoRAConfig
from tuneforge.engine.optim import AdamParams
from tuneforge.engine.ray_worker import RayWorker
from tuneforge.engine.sampler import SampleRequest, SampleResult
from tuneforge.engine.types import ForwardBackwardInput, ForwardBackwardResult
from tuneforge.engine.worker import ModelInfo, WorkerStats

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 120.0


class DataParallelGroup:
    def __init__(self, members: list[RayWorker], name: str, rendezvous_dir: Path) -> None:
        """`rendezvous_dir`: a folder every member can read and write (the data directory)."""
        self.members = members
        self.name = name
        self.rendezvous_dir = rendezvous_dir
        self._joined: list[str | None] | None = None  # member incarnations the group was made of
        self._rendezvous: Path | None = None

    def add_lost_listener(self, listener: Callable[[str], None]) -> None:
        for member in self.members:
            member.add_lost_listener(
                lambda why, m=member: listener(f"member {m.name}: {why}"))

    # ---- helpers -----------------------------------------------------------------------------

    def _all(self, method: str, *args, **kwargs) -> list:
        """Call every member at once; raise the first failure after all answered."""
        refs = [m.submit(method, *args, **kwargs) for m in self.members]
        return self._gather(refs)

    def _gather(self, refs: list) -> list:
        results, error = [], None
        for member, ref in zip(self.members, refs, strict=True):
            try:
                results.append(member.result(ref))
            except Exception as e:
                results.append(e)
                error = error or e
        if error is not None:
            raise error
        return results

    def join(self) -> None:
        """(Re)make the torch.distributed group if a member's process is new since."""
        current = [m.incarnation for m in self.members]
        if self._joined == current and None not in current:
            return
        self.rendezvous_dir.mkdir(parents=True, exist_ok=True)
        if self._rendezvous is not None:  # the group it replaces
            self._rendezvous.unlink(missing_ok=True)
        self._rendezvous = self.rendezvous_dir / f"{uuid.uuid4().hex}.store"
        world = len(self.members)
        self._gather([m.submit("join_group", rank, world, str(self._rendezvous),
                               COLLECTIVE_TIMEOUT_S) for rank, m in enumerate(self.members)])
        self._joined = [m.incarnation for m in self.members]
        logger.info("data-parallel group %s: %d workers joined", self.name, world)

    # ---- the seam ----------------------------------------------------------------------------

    def load_base(self, base_model: str) -> None:
        self._all("load_base", base_model)

    def create_model(self, model_id: str, base_model: str, config: LoRAConfig,
                     gradient_checkpointing: bool = False) -> ModelInfo:
        if config.seed is None:  # the replicas must start equal
            config = replace(config, seed=random.SystemRandom().randrange(2**31))
        return self._all("create_model", model_id, base_model, config,
                         gradient_checkpointing)[0]

    def load_model(self, model_id: str, folder: Path, with_optimizer: bool,
                   base_model: str | None = None, gradient_checkpointing: bool = False,
                   alpha: float | None = None, dropout: float | None = None) -> ModelInfo:
        return self._all("load_model", model_id, folder, with_optimizer, base_model,
                         gradient_checkpointing, alpha, dropout)[0]

    def load_into(self, model_id: str, folder: Path, with_optimizer: bool) -> None:
        self._all("load_into", model_id, folder, with_optimizer)

    def model_info(self, model_id: str) -> ModelInfo:
        return self.members[0].call("model_info", model_id)

    def forget_model(self, model_id: str) -> None:
        self._all("forget_model", model_id)

    def forward_backward_batch(self, requests: list[tuple[str, ForwardBackwardInput]]
                               ) -> list[ForwardBackwardResult | Exception]:
        k = len(self.members)
        shards = [[(model_id, replace(inp, data=part)) for model_id, inp in requests
                   for part in [_shard(inp.data, k)[rank]] if part] for rank in range(k)]
        refs = [m.submit("forward_backward_batch", mine, hold=True) if mine else None
                for m, mine in zip(self.members, shards, strict=True)]
        per_member: list[dict[str, ForwardBackwardResult | Exception]] = []
        error = None
        for member, mine, ref in zip(self.members, shards, refs, strict=True):
            if ref is None:
                per_member.append({})
                continue
            try:
                outcomes = member.result(ref)
            except Exception as e:  # the member is gone: every request of this call fails
                outcomes = [e] * len(mine)
                error = error or e
            per_member.append({model_id: o for (model_id, _), o in zip(mine, outcomes,
                                                                       strict=True)})
        merged = [_merge([pm[model_id] for pm in per_member if model_id in pm])
                  for model_id, _ in requests]
        verdicts = {model_id: not isinstance(outcome, Exception)
                    for (model_id, _), outcome in zip(requests, merged, strict=True)}
        if error is None:
            self._all("settle", verdicts)
        return merged

    def optim_step(self, model_id: str, hp: AdamParams) -> dict[str, float]:
        self.join()
        return self._all("optim_step_reduced", model_id, hp)[0]

    def save(self, model_id: str, folder: Path, kind: str, name: str,
             user_metadata: Mapping[str, object] | None = None) -> int:
        return self.members[0].call("save", model_id, folder, kind, name, user_metadata)

    def add_sampler_snapshot(self, sampler_id: str, model_id: str) -> None:
        self.members[0].add_sampler_snapshot(sampler_id, model_id)

    def add_sampler_from_checkpoint(self, sampler_id: str, folder: Path) -> str:
        return self.members[0].add_sampler_from_checkpoint(sampler_id, folder)

    def add_sampler_for_base(self, sampler_id: str, base_model: str) -> None:
        self.members[0].add_sampler_for_base(sampler_id, base_model)

    def has_sampler(self, sampler_id: str) -> bool:
        return self.members[0].has_sampler(sampler_id)

    def sampler_ids(self, prefix: str) -> list[str]:
        return self.members[0].sampler_ids(prefix)

    def spilled_sampler(self, sampler_id: str) -> Path | None:
        return self.members[0].spilled_sampler(sampler_id)

    def drop(self, prefix: str) -> None:
        self._all("drop", prefix)

    def has_room(self, sampler_id: str, request: SampleRequest) -> bool:
        return self.members[0].has_room(sampler_id, request)

    def admit(self, handle: Hashable, sampler_id: str, request: SampleRequest) -> str:
        return self.members[0].admit(handle, sampler_id, request)

    def decode_step(self) -> list[tuple[Hashable, SampleResult]]:
        return self.members[0].decode_step()

    def decoding(self) -> bool:
        return self.members[0].decoding()

    def reset_decoding(self) -> None:
        self.members[0].reset_decoding()

    def stats(self) -> WorkerStats:
        return self.members[0].stats()


def _shard(data: list, k: int) -> list[list]:
    """`data` in k consecutive parts whose sizes differ by at most one."""
    size, extra = divmod(len(data), k)
    parts, start = [], 0
    for rank in range(k):
        end = start + size + (rank < extra)
        parts.append(data[start:end])
        start = end
    return parts


def _merge(parts: list[ForwardBackwardResult | Exception]) -> ForwardBackwardResult | Exception:
    """One request's result from its shards' results, in shard order."""
    for part in parts:
        if isinstance(part, Exception):
            return part
    metrics: dict[str, float] = {}
    counts = [len(p.outputs) for p in parts]
    for key in parts[0].metrics:
        values = [p.metrics[key] for p in parts]
        reduction = key.rsplit(":", 1)[-1]
        if reduction == "sum":
            metrics[key] = sum(values)
        elif reduction == "max":
            metrics[key] = max(values)
        elif reduction == "min":
            metrics[key] = min(values)
        else:  # a mean: weighted by each shard's datums
            metrics[key] = sum(v * n for v, n in zip(values, counts, strict=True)) / sum(counts)
    return ForwardBackwardResult(outputs=[o for p in parts for o in p.outputs], metrics=metrics)
