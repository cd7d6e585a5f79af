"""How an HF decoder's tensors look in a llama.cpp GGUF file: architecture, names, layout, dtype.

- Architecture: llama.cpp's name for the HF class (`LlamaForCausalLM` → `llama`, Qwen2/Qwen3
  → `qwen2`/`qwen3`); other classes are refused, naming the ones supported.
- Names: the `gguf` package's own tensor-name map (the one llama.cpp's converters use):
  `model.layers.3.self_attn.q_proj` → `blk.3.attn_q`, `lm_head` → `output`, …
- Layout: llama.cpp's converter (convert_hf_to_gguf.py, `LlamaModel.permute`) reorders the rows
  of Llama-family `q_proj` and `k_proj` weights per head, from HF's rotate-half RoPE order to
  the interleaved order llama.cpp's RoPE expects. Any tensor that multiplies into those rows
  must be reordered alike: a merged weight, and a LoRA adapter's `B` (its rows are the output
  rows; `A` acts on the input side and stays). Qwen2/Qwen3 are converted without it.
- Dtype: f32, f16, bf16 or q8_0; 1-D tensors (norms) stay f32 as llama.cpp's converters keep
  them. q8_0 packs rows in blocks of 32, so a tensor whose rows are not a multiple of 32 long
  (a LoRA `B` of rank 8, say) falls back to f16, as llama.cpp's converter does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tuneforge.errors import Unsupported, UserError

DTYPES = ("f32", "f16", "bf16", "q8_0")

# HF class → (gguf MODEL_ARCH member name, whether q/k rows are permuted)
_ARCHS: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
    "Qwen3ForCausalLM": ("QWEN3", False),
}


@dataclass(frozen=True)
class Layout:
    arch: str  # llama.cpp's architecture name, e.g. "llama"
    n_layers: int
    n_head: int
    n_head_kv: int
    permute_qk: bool
    _names: object  # gguf.TensorNameMap

    def name(self, hf_module: str) -> str:
        """The GGUF tensor name (without `.weight`) of an HF module path."""
        found = self._names.get_name(hf_module)
        if found is None:
            raise Unsupported(f"{hf_module}: no llama.cpp tensor name for it in {self.arch}")
        return found

    def to_gguf_rows(self, hf_module: str, rows: torch.Tensor) -> torch.Tensor:
        """`rows` ([out, ...], in HF's output-row order) in the order llama.cpp stores."""
        if not self.permute_qk:
            return rows
        leaf = hf_module.rsplit(".", 1)[-1]
        if leaf == "q_proj":
            return permute(rows, self.n_head)
        if leaf == "k_proj":
            return permute(rows, self.n_head_kv)
        return rows


def permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`: within each head, the first and second halves of the
    rows are interleaved (rows 0, h/2, 1, h/2+1, …)."""
    out = rows.shape[0]
    return (rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def layout(config: dict) -> Layout:
    """The layout for an HF `config.json` (as a dict)."""
    import gguf

    hf_class = (config.get("architectures") or ["?"])[0]
    if hf_class not in _ARCHS:
        raise Unsupported(f"architecture {hf_class} has no GGUF export here (supported: "
                          f"{', '.join(sorted(_ARCHS))})")
    member, permute_qk = _ARCHS[hf_class]
    arch = getattr(gguf.MODEL_ARCH, member)
    n_layers = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    return Layout(arch=gguf.MODEL_ARCH_NAMES[arch], n_layers=n_layers, n_head=n_head,
                  n_head_kv=int(config.get("num_key_value_heads") or n_head),
                  permute_qk=permute_qk, _names=gguf.get_tensor_name_map(arch, n_layers))


def check_dtype(dtype: str, allowed: tuple[str, ...] = DTYPES) -> str:
    if dtype not in allowed:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(allowed)} for this format")
    return dtype


def encode(tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, object, str]:
    """(data, GGMLQuantizationType, dtype actually used) for `GGUFWriter.add_tensor`."""
    import gguf

    data = tensor.detach().to(torch.float32).cpu().contiguous().numpy()
    if data.ndim < 2 or dtype == "f32":
        return data, gguf.GGMLQuantizationType.F32, "f32"
    if dtype == "q8_0" and data.shape[-1] % 32 != 0:
        dtype = "f16"  # q8_0 blocks are 32 values of a row
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    if dtype == "f16":
        return data.astype(np.float16), qtype, dtype
    return gguf.quants.quantize(data, qtype), qtype, dtype


def add_tensor(writer, name: str, tensor: torch.Tensor, dtype: str) -> str:
    """Add `tensor` to `writer` under `name` in `dtype` (or its fallback); returns the dtype."""
    data, qtype, used = encode(tensor, dtype)
    writer.add_tensor(name, data, raw_dtype=qtype)  # packed bytes: the writer derives the shape
    return used


def file_type(dtype: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]


def read_tensor(reader_tensor) -> np.ndarray:
    """A GGUFReader tensor as float32 in numpy's row-major [rows, cols] shape."""
    import gguf

    data = gguf.quants.dequantize(reader_tensor.data, reader_tensor.tensor_type)
    return np.array(data, dtype=np.float32).reshape(
        tuple(int(d) for d in reversed(reader_tensor.shape)))
