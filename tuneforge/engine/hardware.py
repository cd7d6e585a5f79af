"""The compute dtype the hardware runs fastest: `--dtype auto`.

bf16 is chosen only where it is fast: on CUDA, or on a CPU with native bf16 matmul (AVX512-BF16
or AMX). Elsewhere CPUs emulate it — measured on an Intel CPU without AVX512-BF16, a bf16 matmul
ran 5× slower than fp32, while an AMD CPU with it ran 3.5–4.5× faster — so fp32 it is.
"""

from __future__ import annotations

from pathlib import Path

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def choose_dtype(setting: str, device: torch.device,
                 flags: set[str] | None = None) -> tuple[str, str]:
    """(`fp32` | `bf16`, why): the setting itself unless it is `auto`."""
    if setting != "auto":
        return setting, f"dtype={setting} was set"
    if device.type == "cuda":
        return "bf16", "CUDA device"
    if device.type != "cpu":
        return "fp32", f"{device.type} device"
    flags = cpu_flags() if flags is None else flags
    native = [f for f in BF16_CPU_FLAGS if f in flags]
    if native:
        return "bf16", f"the CPU has {' and '.join(native)}"
    return "fp32", "the CPU has no native bf16 matmul (no avx512_bf16 or amx_bf16)"


def torch_dtype(dtype: str) -> torch.dtype:
    return torch.bfloat16 if dtype == "bf16" else torch.float32
