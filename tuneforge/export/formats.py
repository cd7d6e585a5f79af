"""`tuneforge export --format FORMAT`: one entry point over the export writers.

| format        | writes                                              | --dtype (default)          |
|---------------|-----------------------------------------------------|----------------------------|
| `peft`        | adapter_model.safetensors + adapter_config.json,    | —                          |
|               | with vLLM's verdict on it and its --max-lora-rank   |                            |
| `merged`      | a full HF model folder (merged.py)                  | f32, bf16 (f32; a quantized|
|               |                                                     | base: its 16-bit dtype)    |
| `gguf-lora`   | adapter.gguf for llama.cpp's --lora (gguf_lora.py)  | f32, f16, q8_0 (f32)       |
| `gguf-merged` | model.gguf, when the base came as GGUF              | f32, f16, bf16, q8_0 (f16) |
| `ollama`      | model.gguf + Modelfile (ollama.py)                  | f32, f16, bf16, q8_0 (f16) |

Used by the offline CLI (admin.py) and by the server's checkpoint archive route alike.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.engine.models import ModelRegistry
from tuneforge.errors import TuneforgeError, Unsupported, UserError
from tuneforge.export import FORMATS, gguf_lora, gguf_merged, ollama, vllm_check
from tuneforge.export.merged import write_merged
from tuneforge.storage import checkpoints

DTYPES: dict[str, tuple[str, ...]] = {
    "peft": (), "merged": ("f32", "bf16"), "gguf-lora": ("f32", "f16", "q8_0"),
    "gguf-merged": ("f32", "f16", "bf16", "q8_0"), "ollama": ("f32", "f16", "bf16", "q8_0"),
}
_DEFAULT_DTYPE = {"gguf-lora": "f32", "gguf-merged": "f16", "ollama": "f16"}


@dataclass
class Exported:
    path: Path
    notes: list[str] = field(default_factory=list)  # what the user should know, one a line


def check_args(fmt: str, dtype: str | None) -> str | None:
    """The dtype to use; refuses an unknown format or a dtype the format does not take."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES[fmt]:
        allowed = ", ".join(DTYPES[fmt]) or "none (the adapter's own fp32 tensors)"
        raise UserError(f"--dtype {dtype!r} does not apply to --format {fmt}; it takes: "
                        f"{allowed}")
    return dtype or _DEFAULT_DTYPE.get(fmt)


def vllm_report(folder: Path, registry: ModelRegistry) -> vllm_check.Report:
    ckpt = checkpoints.load(folder)
    hf_class = None
    try:
        base = registry.resolve(gguf_merged.checkpoint_base(folder))
        hf_class = (json.loads((base / "config.json").read_text()).get("architectures")
                    or [None])[0]
    except TuneforgeError:
        pass  # a folder whose base is not known here: the check says it cannot tell
    return vllm_check.check(ckpt.adapter_config, ckpt.A, hf_class)


def write(fmt: str, folder: Path, dest: Path, registry: ModelRegistry,
          dtype: str | None = None, require_vllm: bool = False) -> Exported:
    """Export checkpoint `folder` into the empty folder `dest` (which exists)."""
    dtype = check_args(fmt, dtype)
    if require_vllm and fmt != "peft":
        raise UserError("--vllm applies to --format peft only")
    if fmt == "peft":
        report = vllm_report(folder, registry)
        if require_vllm and not report.loads:
            raise Unsupported("; ".join(report.problems) + " (--vllm: nothing written)")
        for name in (checkpoints.ADAPTER_FILE, checkpoints.CONFIG_FILE):
            shutil.copy2(folder / name, dest / name)
        return Exported(dest, report.lines())
    if fmt == "merged":
        return Exported(write_merged(folder, dest, registry, dtype))
    if fmt == "gguf-lora":
        return Exported(gguf_lora.write(folder, dest, registry.resolve(
            gguf_merged.checkpoint_base(folder)), dtype), _lora_notes(folder, dest, registry))
    if fmt == "gguf-merged":
        return Exported(gguf_merged.write(folder, dest, registry, dtype))
    ollama.write(folder, dest, registry, dtype)
    return Exported(dest, [f"run: ollama create NAME -f {dest / ollama.MODELFILE}"])


def _lora_notes(folder: Path, dest: Path, registry: ModelRegistry) -> list[str]:
    name = gguf_merged.checkpoint_base(folder)
    adapter = dest / gguf_lora.FILE
    if registry.spec(name).quantized:
        return [f"the base {name} is quantized: the adapter was trained against its "
                "dequantized weights, which a llama.cpp base file does not hold; "
                "--format gguf-merged carries them",
                f"run: llama-cli -m BASE.gguf --lora {adapter}"]
    try:
        base = gguf_merged.base_gguf(registry, name)
    except Unsupported:  # the user converts the base (llama.cpp's convert_hf_to_gguf.py)
        return [f"run: llama-cli -m BASE.gguf --lora {adapter}"]
    return [f"run: llama-cli -m {base} --lora {adapter} (the GGUF file the base was "
            "served from: the adapter was trained on its dequantized weights)"]
