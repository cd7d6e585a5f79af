"""Whether vLLM loads a PEFT adapter as is, and the `--max-lora-rank` it needs.

What vLLM's LoRA loader does (vllm/lora/peft_helper.py, lora_model.py, utils.py):
- `use_dora` and `modules_to_save` are refused outright (PEFTHelper._validate_features);
- one `r` and one `lora_alpha` per adapter: `rank_pattern` / `alpha_pattern` are ignored, so
  per-module ranks or alphas would load wrong (refused here);
- a module is accepted only if the model class adapts it: every linear layer, plus the
  entries of the class's `embedding_modules`. Llama/Mistral list `lm_head` (and
  `embed_tokens`); Qwen2/Qwen3 list none, so an `lm_head` LoRA there fails with "expected
  target modules in … but received ['lm_head']";
- the server must be started with `--max-lora-rank` at least r, from 1, 8, 16, 32, 64, 128,
  256, 320, 512.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# HF class → vLLM's `embedding_modules` for it (modules beyond linear layers it adapts)
_EMBEDDING_MODULES = {
    "LlamaForCausalLM": {"embed_tokens", "lm_head"},
    "MistralForCausalLM": {"embed_tokens", "lm_head"},
    "Qwen2ForCausalLM": set(),
    "Qwen3ForCausalLM": set(),
}
_NOT_LINEAR = ("lm_head", "embed_tokens")


@dataclass
class Report:
    max_lora_rank: int | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def loads(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        if self.problems:
            out = [f"vLLM cannot load this adapter as is: {p}" for p in self.problems]
        else:
            out = [f"vLLM loads this adapter as is: vllm serve BASE --enable-lora "
                   f"--max-lora-rank {self.max_lora_rank} --lora-modules NAME=FOLDER"]
        return out + [f"vLLM note: {n}" for n in self.notes]


def max_lora_rank(rank: int) -> int | None:
    """The smallest rank vLLM accepts for `--max-lora-rank` that holds `rank`."""
    return next((r for r in VLLM_RANKS if r >= rank), None)


def check(adapter_config: dict, A: dict[str, torch.Tensor], hf_class: str | None) -> Report:
    rank = int(adapter_config["r"])
    ranks = {int(a.shape[0]) for a in A.values()}
    report = Report(max_lora_rank(max(ranks | {rank})))
    if report.max_lora_rank is None:
        report.problems.append(f"rank {max(ranks | {rank})} exceeds vLLM's largest "
                               f"--max-lora-rank, {VLLM_RANKS[-1]}")
    if adapter_config.get("use_dora"):
        report.problems.append("use_dora: vLLM does not support DoRA")
    if adapter_config.get("modules_to_save"):
        report.problems.append(f"modules_to_save = {adapter_config['modules_to_save']}: vLLM "
                               "only supports modules_to_save being None")
    if ranks != {rank} or adapter_config.get("rank_pattern") \
            or adapter_config.get("alpha_pattern"):
        report.problems.append(f"per-module ranks or alphas (ranks {sorted(ranks)}, "
                               f"adapter_config.r = {rank}): vLLM applies one r and one alpha")
    leaves = sorted({p.rsplit(".", 1)[-1] for p in A if p.rsplit(".", 1)[-1] in _NOT_LINEAR})
    if leaves:
        if hf_class not in _EMBEDDING_MODULES:
            report.notes.append(f"cannot tell whether vLLM's {hf_class} adapts {leaves}")
        else:
            extra = _EMBEDDING_MODULES[hf_class]
            refused = [m for m in leaves if m not in extra]
            if refused:
                also = f" and {sorted(extra)}" if extra else ""
                report.problems.append(
                    f"LoRA on {refused}: vLLM's {hf_class} adapts only linear layers{also} "
                    "(train with train_unembed=False, or export --format merged)")
    if adapter_config.get("use_rslora"):
        report.notes.append("rsLoRA: vLLM scales by alpha/sqrt(r) as PEFT does")
    return report
