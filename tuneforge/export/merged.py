"""A checkpoint's base model with its LoRA adapter merged in, as a plain Hugging Face model
folder (safetensors, config, tokenizer). Used by `tuneforge export --merged` and by the
server's checkpoint archive download; it loads its own copy of the base model, so it never
touches the engine's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tuneforge.engine import lora
from tuneforge.storage import checkpoints


def write_merged(folder: Path, dest: Path, resolve: Callable[[str], Path]) -> Path:
    """Write checkpoint `folder`'s base model with the adapter merged in into the empty folder
    `dest`; `resolve` maps a base model name to its folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = checkpoints.load(folder)
    base_name = ckpt.metadata.get("base_model") or ckpt.adapter_config["base_model_name_or_path"]
    base_folder = resolve(base_name)
    model = AutoModelForCausalLM.from_pretrained(str(base_folder))
    scaling = float(ckpt.adapter_config["lora_alpha"]) / int(ckpt.adapter_config["r"])
    lora.merge_into(model, ckpt.A, ckpt.B, scaling)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(str(base_folder)).save_pretrained(dest)
    return dest
