"""The engine seam: what the scheduler calls on an engine worker, and what comes back.

One worker owns one device: its base models, the training models (adapter + optimizer state)
placed on it, its samplers and its running decode batches. Three implementations share this
interface, so the scheduler never knows which one it drives:

- `engine.Engine`, in the server's process (the embedded default);
- `ray_worker.RayWorker`, a proxy to an `Engine` inside a Ray actor;
- `data_parallel.DataParallelGroup`, K Ray workers holding replicas of each adapter, a batch
  split across them and the LoRA gradients all-reduced before each optimizer step.

Rules every implementation keeps:
- every call runs on the worker's own thread (the scheduler thread that drives it), one at a time;
- `decoding()` and `stats()` answer from what the worker already knows, without a round trip
  and without raising (the scheduler asks them on every turn of its loop);
- arguments and results are plain data (dataclasses, arrays, paths): no tensors and no engine
  objects cross the seam, so a result can travel between processes;
- ids are opaque strings chosen by the caller; a worker knows nothing of their format, and
  forgets things by an id prefix the caller names.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tuneforge.engine.lora import LoRAConfig
from tuneforge.engine.optim import AdamParams
from tuneforge.engine.sampler import SampleRequest, SampleResult
from tuneforge.engine.types import ForwardBackwardInput, ForwardBackwardResult


@dataclass(frozen=True)
class ModelInfo:
    """What the controller keeps of a training model (answers `get_info` without the worker)."""

    model_id: str
    base_model: str  # the served name (`NAME@nf4` for a quantized base)
    arch: str
    tokenizer_dir: str
    lora: LoRAConfig
    steps: int = 0


@dataclass
class WorkerStats:
    """A worker's state at one moment, for `/metrics` and `/api/system`."""

    residency: dict[str, int] = field(
        default_factory=lambda: {"device": 0, "cpu": 0, "disk": 0})  # training models by tier
    samplers_resident: int = 0
    memory_bytes: int = 0  # held by resident adapters
    memory_limit_bytes: int = 0
    decode_rows: dict[str, int] = field(default_factory=dict)  # base model -> rows decoding
    base_models: dict[str, int] = field(default_factory=dict)  # loaded base model -> bytes
    cuda_memory_bytes: int = 0

    @classmethod
    def total(cls, parts: list[WorkerStats]) -> WorkerStats:
        """Several workers' stats added up (base model bytes: every worker's copy counts)."""
        out = cls()
        for p in parts:
            for where, n in p.residency.items():
                out.residency[where] = out.residency.get(where, 0) + n
            out.samplers_resident += p.samplers_resident
            out.memory_bytes += p.memory_bytes
            out.memory_limit_bytes += p.memory_limit_bytes
            out.cuda_memory_bytes += p.cuda_memory_bytes
            for table, mine in ((p.decode_rows, out.decode_rows),
                                (p.base_models, out.base_models)):
                for name, n in table.items():
                    mine[name] = mine.get(name, 0) + n
        return out


class EngineWorker(Protocol):
    """The engine seam (see the module docstring)."""

    def load_base(self, base_model: str) -> None: ...

    # ---- training models
    def create_model(self, model_id: str, base_model: str, config: LoRAConfig,
                     gradient_checkpointing: bool = False) -> ModelInfo: ...

    def load_model(self, model_id: str, folder: Path, with_optimizer: bool,
                   base_model: str | None = None, gradient_checkpointing: bool = False,
                   alpha: float | None = None, dropout: float | None = None) -> ModelInfo: ...

    def load_into(self, model_id: str, folder: Path, with_optimizer: bool) -> None: ...

    def model_info(self, model_id: str) -> ModelInfo: ...

    def forget_model(self, model_id: str) -> None: ...

    def forward_backward_batch(self, requests: list[tuple[str, ForwardBackwardInput]]
                               ) -> list[ForwardBackwardResult | Exception]: ...

    def optim_step(self, model_id: str, hp: AdamParams) -> dict[str, float]: ...

    def save(self, model_id: str, folder: Path, kind: str, name: str,
             user_metadata: Mapping[str, object] | None = None) -> int: ...

    # ---- samplers
    def add_sampler_snapshot(self, sampler_id: str, model_id: str) -> None: ...

    def add_sampler_from_checkpoint(self, sampler_id: str, folder: Path) -> str: ...

    def add_sampler_for_base(self, sampler_id: str, base_model: str) -> None: ...

    def has_sampler(self, sampler_id: str) -> bool: ...

    def sampler_ids(self, prefix: str) -> list[str]: ...

    def spilled_sampler(self, sampler_id: str) -> Path | None: ...

    def drop(self, prefix: str) -> None: ...

    # ---- decoding (continuous batching; finished requests come back with their handle)
    def has_room(self, sampler_id: str, request: SampleRequest) -> bool: ...

    def admit(self, handle: Hashable, sampler_id: str, request: SampleRequest) -> str: ...

    def decode_step(self) -> list[tuple[Hashable, SampleResult]]: ...

    def decoding(self) -> bool: ...

    def reset_decoding(self) -> None: ...

    # ---- observation
    def stats(self) -> WorkerStats: ...
