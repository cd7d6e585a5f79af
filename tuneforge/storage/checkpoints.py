"""Checkpoint files in PEFT's layout, written atomically.

A checkpoint folder holds:
- `adapter_model.safetensors`: `base_model.model.{module}.lora_A.weight` / `.lora_B.weight`,
  the key names `PeftModel.from_pretrained` expects;
- `adapter_config.json`: PEFT's `LoraConfig` fields (base model, rank, alpha, dropout, target
  modules);
- `optimizer.pt` (training checkpoints only): the AdamW state, loadable with `weights_only=True`;
- `tuneforge.json`: run, step, creation time and user metadata.

Everything is written into a temporary sibling folder that is renamed into place last, so a
crash never leaves a half-written checkpoint under its final name.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.pt"
META_FILE = "tuneforge.json"
_PREFIX = "base_model.model."


@dataclass
class LoadedCheckpoint:
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    adapter_config: dict
    metadata: dict
    optimizer_state: dict | None


def peft_adapter_config(base_model: str, rank: int, alpha: float, modules: list[str],
                        dropout: float = 0.0) -> dict:
    """PEFT's `LoraConfig` of an adapter: its own alpha and dropout, so PEFT applies the same
    scaling (and, when training on, the same dropout) as the run that wrote it."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }


def save(
    folder: Path,
    A: dict[str, torch.Tensor],
    B: dict[str, torch.Tensor],
    adapter_config: dict,
    metadata: dict,
    optimizer_state: dict | None = None,
) -> int:
    """Write a checkpoint at `folder` (which must not exist yet); returns its size in bytes."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors: dict[str, torch.Tensor] = {}
        for path in A:
            tensors[f"{_PREFIX}{path}.lora_A.weight"] = A[path].detach().float().cpu().contiguous()
            tensors[f"{_PREFIX}{path}.lora_B.weight"] = B[path].detach().float().cpu().contiguous()
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2))
        (tmp / META_FILE).write_text(json.dumps(metadata, indent=2))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sum(f.stat().st_size for f in folder.iterdir())


def load(folder: Path, with_optimizer: bool = False) -> LoadedCheckpoint:
    tensors = load_file(str(folder / ADAPTER_FILE))
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(_PREFIX) or not key.endswith(".weight"):
            raise ValueError(f"{folder / ADAPTER_FILE}: unexpected tensor name {key!r}")
        module, kind = key[len(_PREFIX) : -len(".weight")].rsplit(".", 1)
        if kind == "lora_A":
            A[module] = value
        elif kind == "lora_B":
            B[module] = value
        else:
            raise ValueError(f"{folder / ADAPTER_FILE}: unexpected tensor name {key!r}")
    if A.keys() != B.keys():
        raise ValueError(f"{folder / ADAPTER_FILE}: lora_A and lora_B name different modules")
    meta_path = folder / META_FILE
    optimizer_state = None
    if with_optimizer and (folder / OPTIMIZER_FILE).exists():
        optimizer_state = torch.load(folder / OPTIMIZER_FILE, weights_only=True)
    return LoadedCheckpoint(
        A=A,
        B=B,
        adapter_config=json.loads((folder / CONFIG_FILE).read_text()),
        metadata=json.loads(meta_path.read_text()) if meta_path.exists() else {},
        optimizer_state=optimizer_state,
    )


def remove(folder: Path) -> None:
    """Delete a checkpoint: rename it away first so it is never seen half-deleted."""
    if not folder.exists():
        return
    doomed = folder.parent / f".del-{folder.name}-{uuid.uuid4().hex[:8]}"
    os.rename(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
