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
from tuneforge.storage import checkpoints

_SIXTEEN_BIT = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def write_merged(folder: Path, dest: Path, registry: ModelRegistry) -> Path:
    """Write checkpoint `folder`'s base model with the adapter merged in into the empty folder
    `dest`; `registry` says what the checkpoint's base model name stands for and loads it."""
    from transformers import AutoTokenizer

    ckpt = checkpoints.load(folder)
    name = ckpt.metadata.get("base_model") or ckpt.adapter_config["base_model_name_or_path"]
    base_folder = registry.resolve(name)
    if registry.spec(name).quantized:
        model = _dense_twin(registry, name)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base_folder))
    scaling = float(ckpt.adapter_config["lora_alpha"]) / int(ckpt.adapter_config["r"])
    lora.merge_into(model, ckpt.A, ckpt.B, scaling)
    if registry.spec(name).quantized:
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
