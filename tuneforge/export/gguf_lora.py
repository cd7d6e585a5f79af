"""A checkpoint as a llama.cpp LoRA adapter GGUF (`llama-cli -m BASE.gguf --lora adapter.gguf`).

What llama.cpp's own converter (convert_lora_to_gguf.py) writes, without needing llama.cpp:
`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, the base's architecture,
and per adapted module `NAME.weight.lora_a` (A, [r, in]) and `NAME.weight.lora_b` (B, [out, r])
under llama.cpp's tensor names. llama.cpp scales the product by `alpha / r`, with r read from
the tensors, which is PEFT's scaling; an rsLoRA adapter's `alpha / sqrt(r)` is folded into the
alpha written. For Llama-family bases B's rows are permuted like the q/k weights themselves
(gguf_layout.py), or the attention part of the adapter would act on the wrong rows.

Refused, with the reason: an adapter of `lm_head` on a base whose output layer is tied to the
embedding (llama.cpp has no `output.weight` to attach it to; its converter refuses too),
per-module ranks or alphas, DoRA, and architectures without a GGUF mapping here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from tuneforge.errors import Unsupported
from tuneforge.export import gguf_layout
from tuneforge.storage import checkpoints

FILE = "adapter.gguf"


def check_config(adapter_config: dict) -> float:
    """The alpha llama.cpp must be given for this PEFT config (refusing what it cannot hold)."""
    if adapter_config.get("use_dora"):
        raise Unsupported("adapter_config.use_dora: llama.cpp has no DoRA adapters")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if adapter_config.get(key):
            raise Unsupported(f"adapter_config.{key} is set: a llama.cpp LoRA GGUF holds one "
                              "alpha and plain LoRA pairs only")
    rank, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    if adapter_config.get("use_rslora"):
        return alpha * math.sqrt(rank)  # llama.cpp scales by alpha / r; rsLoRA by alpha/sqrt(r)
    return alpha


def write(folder: Path, dest: Path, base_folder: Path, dtype: str = "f32") -> Path:
    """Write checkpoint `folder` as `dest/adapter.gguf`; `base_folder` holds its base's
    config.json. Returns the file."""
    import gguf

    gguf_layout.check_dtype(dtype)
    ckpt = checkpoints.load(folder)
    alpha = check_config(ckpt.adapter_config)
    config = json.loads((base_folder / "config.json").read_text())
    lay = gguf_layout.layout(config)
    tied = _tied(base_folder)
    if "lm_head" in ckpt.A and tied:
        raise Unsupported(
            "the adapter has an lm_head LoRA but the base ties lm_head to the embedding: a "
            "llama.cpp GGUF of this base has no output.weight for it (llama.cpp's own converter "
            "refuses this too); export --format gguf-merged or ollama, or train with "
            "train_unembed=False")
    rank = int(ckpt.adapter_config["r"])
    writer = gguf.GGUFWriter(str(dest / FILE), lay.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_string(gguf.Keys.General.NAME, f"tuneforge adapter {folder.name}")
    writer.add_file_type(gguf_layout.file_type(dtype))
    for path in sorted(ckpt.A, key=_natural):
        A, B = ckpt.A[path], ckpt.B[path]
        if A.shape[0] != rank or B.shape[1] != rank:
            raise Unsupported(f"{path}: rank {A.shape[0]} differs from adapter_config.r = "
                              f"{rank}; a llama.cpp LoRA GGUF needs one rank")
        name = lay.name(path) + ".weight"
        gguf_layout.add_tensor(writer, name + ".lora_a", A, dtype)
        gguf_layout.add_tensor(writer, name + ".lora_b", lay.to_gguf_rows(path, B), dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest / FILE


def _tied(base_folder: Path) -> bool:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(base_folder))
    return bool(getattr(config.get_text_config(), "tie_word_embeddings", False))


def _natural(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


def lora_delta(adapter: Path, name: str) -> torch.Tensor:
    """scale · B @ A of tensor `name` (e.g. `blk.0.attn_q.weight`) as llama.cpp computes it from
    the file (dequantized), for checks."""
    import gguf

    reader = gguf.GGUFReader(str(adapter))
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    tensors = {t.name: t for t in reader.tensors}
    a = torch.from_numpy(gguf_layout.read_tensor(tensors[name + ".lora_a"])).double()
    b = torch.from_numpy(gguf_layout.read_tensor(tensors[name + ".lora_b"])).double()
    return alpha / a.shape[0] * (b @ a)
