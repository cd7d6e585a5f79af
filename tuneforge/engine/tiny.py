"""Built-in offline test models: `tuneforge/tiny-qwen3` and its larger sibling.

Each is a Qwen3 from transformers with random weights (fixed seed) and a byte-level BPE tokenizer
trained on the spot with `tokenizers` over a fixed list of Python standard-library sources. The
tokenizer carries the Qwen3 chat special tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`)
and a ChatML chat template, so chat renderers work on it. Nothing is downloaded; the same Python
gives the same tokenizer and weights (checked by a test), and the result is cached on disk.
"""

from __future__ import annotations

import logging
import sysconfig
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Standard-library sources used as the tokenizer's training corpus: plain English docstrings
# and code. Files missing from an unusual Python build are skipped.
_CORPUS_FILES = (
    "textwrap.py", "string.py", "json/__init__.py", "json/decoder.py", "json/encoder.py",
    "argparse.py", "random.py", "statistics.py", "fractions.py", "calendar.py", "difflib.py",
    "heapq.py", "bisect.py", "functools.py", "collections/__init__.py", "dataclasses.py",
    "enum.py", "pprint.py", "shlex.py", "csv.py", "email/message.py", "http/client.py",
    "urllib/parse.py", "logging/__init__.py", "unittest/case.py", "inspect.py",
)


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int = 4096
    seed: int = 0


TINY_MODELS: dict[str, TinySpec] = {
    "tuneforge/tiny-qwen3": TinySpec(
        vocab_size=8192, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=32, intermediate_size=384,
    ),
    "tuneforge/tiny-qwen3-l": TinySpec(
        vocab_size=8192, hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=4,
        head_dim=32, intermediate_size=768,
    ),
}


def chat_template() -> str:
    return resources.files("tuneforge.engine").joinpath("assets/chatml.jinja").read_text()


def _corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / f).read_text(encoding="utf-8")
             for f in _CORPUS_FILES if (stdlib / f).exists()]
    if not texts:
        raise RuntimeError(f"no tokenizer corpus found under {stdlib}")
    return texts


def build_tokenizer(vocab_size: int, max_length: int):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        chat_template=chat_template(),
        model_max_length=max_length,
    )


def build_tiny(name: str, out_dir: Path) -> None:
    """Write a complete HF model folder (config, weights, tokenizer) for built-in `name`."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    spec = TINY_MODELS[name]
    tokenizer = build_tokenizer(spec.vocab_size, spec.max_position_embeddings)
    vocab = len(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(spec.seed)
    model = Qwen3ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("built %s (%d parameters) in %s", name, model.num_parameters(), out_dir)
