"""Which adapters live in memory: a least-recently-used set within a byte budget.

Training models (LoRA tensors, their accumulated gradients, AdamW moments) and sampler weights
share one budget. When it is exceeded, the least recently used entries not pinned by the work in
progress leave memory: a training model is written to the offload directory exactly (tensors,
gradients, optimizer state) and read back on its next request; on a GPU it first moves to CPU
memory (a second budget) and only then to disk. The caller never notices but for the latency.

Memory freed when a session's adapters are dropped goes back to the operating system
(`return_free_memory`): glibc keeps freed blocks in per-thread arenas for reuse, so a server
that trains many short-lived adapters (an atomic batch of hundreds) would otherwise grow by
what the busiest moments needed, though nothing is held.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import uuid
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

import torch

from tuneforge.engine import lora
from tuneforge.engine.optim import AdamW

logger = logging.getLogger(__name__)


class Budget:
    """LRU bookkeeping of resident entries and their sizes."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.sizes: OrderedDict[Hashable, int] = OrderedDict()  # least recently used first

    @property
    def used(self) -> int:
        return sum(self.sizes.values())

    def add(self, key: Hashable, nbytes: int) -> None:
        self.sizes[key] = nbytes
        self.sizes.move_to_end(key)

    def touch(self, key: Hashable) -> None:
        if key in self.sizes:
            self.sizes.move_to_end(key)

    def discard(self, key: Hashable) -> None:
        self.sizes.pop(key, None)

    def victims(self, pinned: set[Hashable]) -> list[Hashable]:
        """Entries to release, oldest first, until the rest fits the limit."""
        over, out = self.used - self.limit, []
        for key, size in self.sizes.items():
            if over <= 0:
                break
            if key not in pinned:
                out.append(key)
                over -= size
        return out


def _libc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_malloc_trim = _libc_trim()


def return_free_memory() -> None:
    """Give the allocator's free memory back to the operating system (glibc only)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def tensors_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def training_bytes(adapter: lora.Adapter, optimizer: AdamW) -> int:
    params = adapter.parameters()
    state = [v for s in optimizer.optimizer.state.values() for v in s.values()
             if isinstance(v, torch.Tensor)]
    return tensors_bytes(params) + tensors_bytes(p.grad for p in params) + tensors_bytes(state)


def move(adapter: lora.Adapter, optimizer: AdamW, device: torch.device) -> None:
    """Move an adapter, its gradients and its optimizer state to `device`, in place.

    From a GPU to the CPU the tensors land in pinned (page-locked) memory, so that both ways
    copy asynchronously at the bus's speed; every copy has finished when this returns.
    """
    with torch.no_grad():
        for store in (adapter.A, adapter.B):
            for path, t in store.items():
                moved = _to(t.detach(), device).requires_grad_(t.requires_grad)
                if t.grad is not None:
                    moved.grad = _to(t.grad, device)
                store[path] = moved
        for state in optimizer.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = _to(value, device)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    optimizer.rebind(adapter.parameters())


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device == device:
        return t
    if device.type == "cpu" and t.device.type == "cuda":
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)
    return t.to(device, non_blocking=t.is_pinned())


def save(path: Path, adapter: lora.Adapter, optimizer: AdamW) -> None:
    """Write everything needed to continue exactly; atomic (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "A": {k: v.detach().cpu() for k, v in adapter.A.items()},
        "B": {k: v.detach().cpu() for k, v in adapter.B.items()},
        "gradA": {k: v.grad.cpu() for k, v in adapter.A.items() if v.grad is not None},
        "gradB": {k: v.grad.cpu() for k, v in adapter.B.items() if v.grad is not None},
        "optimizer": optimizer.state_dict(),
    }
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load(path: Path, config: lora.LoRAConfig, device: torch.device) -> tuple[lora.Adapter, AdamW]:
    blob = torch.load(path, weights_only=True)
    adapter = lora.Adapter(config=config)
    for name, store, grads in (("A", adapter.A, blob["gradA"]), ("B", adapter.B, blob["gradB"])):
        for k, v in blob[name].items():
            t = v.to(device).requires_grad_(True)
            if k in grads:
                t.grad = grads[k].to(device)
            store[k] = t
    optimizer = AdamW(adapter.parameters())
    optimizer.load_state_dict(blob["optimizer"])
    path.unlink()
    return adapter, optimizer
