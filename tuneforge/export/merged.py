"""A checkpoint's base model with its LoRA adapter merged in, as a plain Hugging Face model
folder (safetensors, config, tokenizer). Used by `tuneforge export --merged` and by the
server's checkpoint archive download; it loads its own copy of the base model, so it never
touches the engine's.

A checkpoint trained on a quantized base (`NAME@nf4`, or an alias with a quantization) was
trained against the dequantized values of the packed weights, not against NAME's original
weights. Its merged export therefore starts from the base loaded exactly as served
(`ModelRegistry.load_copy`), dequantizes it to its dense fp32 twin, merges the adapter there and
writes 16-bit weights: those are the weights the adapter was trained on, rounded once. A merge
into the 4-bit layers themselves (PEFT's `merge_and_unload` on a bitsandbytes base) would
quantize W + sBA again and lose most of the adapter's small update, so it is never done.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tuneforge.engine import lora, quantized
from tuneforge.engine.models import ModelRegistry
from tuneforge.errors import UserError
from tuneforge.storage import checkpoints

_SIXTEEN_BIT = {"bfloat16": torch.bfloat16, "float16": torch.float16}


MERGED_DTYPES = ("f32", "bf16")
_TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def merged_model(folder: Path, registry: ModelRegistry) -> tuple[nn.Module, str, Path]:
    """Checkpoint `folder`'s base model with the adapter merged in, fp32 on the CPU, with the
    served name of its base and the folder of the base's HF files."""
    ckpt = checkpoints.load(folder)
    name = ckpt.metadata.get("base_model") or ckpt.adapter_config["base_model_name_or_path"]
    base_folder = registry.resolve(name)
    if registry.spec(name).quantized:
        model = _dense_twin(registry, name)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32)
    scaling = float(ckpt.adapter_config["lora_alpha"]) / int(ckpt.adapter_config["r"])
    lora.merge_into(model, ckpt.A, ckpt.B, scaling)
    return model, name, base_folder


def write_merged(folder: Path, dest: Path, registry: ModelRegistry,
                 dtype: str | None = None) -> Path:
    """Write checkpoint `folder`'s base model with the adapter merged in into the empty folder
    `dest`; `registry` says what the checkpoint's base model name stands for and loads it.
    `dtype` is f32 or bf16; by default a full-precision base is written in fp32 and a
    quantized base in its config's 16-bit dtype (`export_dtype`)."""
    from transformers import AutoTokenizer

    if dtype is not None and dtype not in MERGED_DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(MERGED_DTYPES)} for "
                        "--format merged")
    model, name, base_folder = merged_model(folder, registry)
    if dtype is not None:
        model.to(_TORCH_DTYPES[dtype])
    elif registry.spec(name).quantized:
        model.to(export_dtype(base_folder))  # after the merge: W + sBA is rounded once
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(str(base_folder)).save_pretrained(dest)
    return dest


def _dense_twin(registry: ModelRegistry, name: str) -> nn.Module:
    """The quantized base `name` as served, its packed layers replaced by plain fp32 linears
    with the values they compute with, on the CPU (where the checkpoint's tensors are)."""
    model = quantized.dequantize(registry.load_copy(name), device="cpu")
    return model.to("cpu", torch.float32)


def export_dtype(base_folder: Path) -> torch.dtype:
    """The 16-bit dtype the base model's own config names (bf16 or fp16), else bf16: a
    quantized base's full-precision weights are not there to export, and 32 bits would only
    store the rounding of 4-bit values at twice the size of a 16-bit model."""
    config = json.loads((base_folder / "config.json").read_text())
    named = config.get("dtype") or config.get("torch_dtype")
    return _SIXTEEN_BIT.get(named, torch.bfloat16)
