"""Quantized base models through bitsandbytes: loaded 4-bit (NF4/FP4) or 8-bit, guarded, measured.

A quantized base is loaded by transformers' `BitsAndBytesConfig`, so its packed weights are
exactly those a user gets by loading the same model with the same config (an exported adapter
gives the server's logits there). Embeddings and `lm_head` stay unquantized (transformers skips
the output embedding). The frozen packed weights are shared by every adapter on that base; LoRA
weights, gradients and AdamW state stay fp32.

Two bitsandbytes behaviours shape this module:
- on a CPU with AVX512-BF16, a 4-bit layer run in eval mode without gradients repacks its weight
  one way into a layout that has no backward kernel, so a sample followed by a training step
  would fail; the repack is switched off on every layer (`support_avx512bf16_for_cpu`);
- moving a 4-bit layer with `.to()` after such a repack silently corrupts it (bitsandbytes
  #2078), so every quantized layer refuses to be moved: a base is loaded on its device once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from tuneforge.errors import Unsupported, UserError

logger = logging.getLogger(__name__)

# bitsandbytes warns at import on AVX512-BF16 CPUs that an optional hub kernel for the repacked
# layout is missing; that layout is never used here (see above).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _bnb():
    try:
        import bitsandbytes
    except ImportError as e:
        raise Unsupported("quantization needs the bitsandbytes package "
                          "(pip install bitsandbytes==0.50.2)") from e
    return bitsandbytes


def check_device(name: str, quantization: str, device: torch.device) -> None:
    """Refuse a quantization the device cannot run well, naming the option."""
    if device.type not in ("cpu", "cuda"):
        raise Unsupported(f"base_model '{name}': quantization={quantization} runs on CPU or CUDA "
                          f"only, not on {device.type}")
    if quantization == "int8" and device.type == "cpu":
        raise Unsupported(
            f"base_model '{name}': quantization=int8 needs a CUDA device (bitsandbytes' LLM.int8() "
            "computes in float16, which CPUs run slowly); use quantization=nf4 on a CPU")


def config(quantization: str, double_quant: bool, compute_dtype: torch.dtype):
    """transformers' `BitsAndBytesConfig` for a quantization name."""
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def load(folder: Path, name: str, quantization: str, double_quant: bool,
         device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    """The model in `folder`, its linear layers quantized on `device`, frozen and guarded."""
    check_device(name, quantization, device)
    _bnb()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, device_map={"": str(device)},
        quantization_config=config(quantization, double_quant, compute_dtype))
    layers = quantized_layers(model)
    if not layers:
        raise UserError(f"base_model '{name}': quantization={quantization} found no linear "
                        "layers to quantize")
    for _, layer in layers:
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
        _refuse_moves(layer, name, quantization)
    if device.type == "cpu":
        _own_full_precision_tensors(model, layers)
    return model


def _own_full_precision_tensors(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
    """On a CPU the unquantized tensors (embeddings, norms, lm_head) are views into the memory-
    mapped checkpoint file, which keeps the whole mapping — the full-precision weights of the
    quantized layers included — resident. Copies free it (measured on SmolLM2: 533 MiB)."""
    packed = {id(t) for _, layer in layers for t in layer.parameters()}
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in packed and id(t) not in seen:
            seen.add(id(t))
            t.data = t.data.clone()  # the same Parameter object: tied weights stay tied


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    bnb = _bnb()
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [(path, m) for path, m in model.named_modules() if isinstance(m, kinds)]


def _refuse_moves(layer: nn.Module, name: str, quantization: str) -> None:
    """Make `.to()`, `.cuda()`, `.cpu()`, `.float()` … of this layer (or any module holding it)
    fail loudly instead of corrupting its packed weight."""

    def refuse(*args, **kwargs):
        raise Unsupported(
            f"base_model '{name}' has quantization={quantization}: moving or casting its "
            "quantized layers (.to, .cuda, .cpu) would corrupt their packed weights "
            "(bitsandbytes#2078); load the model again on the other device instead")

    layer._apply = refuse  # nn.Module.to/cuda/cpu/float all go through _apply


def nbytes(model: nn.Module) -> int:
    """Bytes of the parameters plus the quantization statistics (absmax, codebooks) of the
    quantized layers."""
    tensors = {id(p): p for p in model.parameters()}
    for _, layer in quantized_layers(model):
        state = getattr(layer.weight, "quant_state", None)
        if state is not None:
            for t in _state_tensors(state):
                tensors[id(t)] = t
        scb = getattr(layer.weight, "SCB", None)
        if isinstance(scb, torch.Tensor):
            tensors[id(scb)] = scb
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _state_tensors(state) -> list[torch.Tensor]:
    out = [t for t in (state.absmax, state.code) if isinstance(t, torch.Tensor)]
    if getattr(state, "state2", None) is not None:
        out += _state_tensors(state.state2)
    return out


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The fp32 weight a quantized linear layer computes with, [out, in]."""
    bnb = _bnb()
    if isinstance(layer, bnb.nn.Linear4bit):
        w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    else:
        w = bnb.functional.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
    return w.float().reshape(layer.out_features, layer.in_features)


def dequantize(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Replace every quantized linear layer by a plain `nn.Linear` holding its dequantized fp32
    weight, in place: the dense twin of the quantized model (what a merged export starts from).
    `device`: where the dense layers go (default: the layer's own), one at a time, so a GPU never
    holds the whole dense twin."""
    for path, layer in quantized_layers(model):
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=device or layer.weight.device, dtype=torch.float32)
        with torch.no_grad():
            dense.weight.copy_(dequantized_weight(layer))
            if layer.bias is not None:
                dense.bias.copy_(layer.bias.float())
        dense.requires_grad_(False)
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, dense)
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    for attr in ("hf_quantizer", "is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method",
                 "is_quantized"):
        if attr in model.__dict__:
            delattr(model, attr)
    return model
