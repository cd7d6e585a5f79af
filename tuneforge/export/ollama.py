"""A checkpoint as an Ollama model folder: the merged GGUF and a Modelfile.

    ollama create my-model -f DEST/Modelfile

The merged route rather than Ollama's `ADAPTER`, which does not load Qwen adapters. The
Modelfile's `TEMPLATE` is Go template syntax; it is written only for ChatML-style chat
templates (`<|im_start|>ROLE\\nCONTENT<|im_end|>\\n`), and only after checking that the base's
own Jinja template renders exactly as ChatML on sample conversations (with and without a system
message, several turns). A default system prompt the Jinja template inserts when none is given
(SmolLM2's) becomes the Modelfile's `SYSTEM`. Any other template is refused with the first
difference found, rather than guessed. `PARAMETER stop` lists `<|im_end|>` and the base's
end-of-sequence tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.engine.models import ModelRegistry
from tuneforge.errors import Unsupported
from tuneforge.export import gguf_merged

MODELFILE = "Modelfile"
START, END = "<|im_start|>", "<|im_end|>"

# Ollama's ChatML template over .Messages: every turn closed, then the assistant's opening.
TEMPLATE = (
    "{{- range .Messages }}" + START + "{{ .Role }}\n{{ .Content }}" + END + "\n"
    "{{ end }}" + START + "assistant\n"
)

_PROBES = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "one"},
     {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}],
]


def chatml(messages: list[dict]) -> str:
    body = "".join(f"{START}{m['role']}\n{m['content']}{END}\n" for m in messages)
    return body + f"{START}assistant\n"


def default_system(tokenizer) -> str | None:
    """The system prompt the chat template adds when the conversation has none, if ChatML;
    raises Unsupported naming the first difference from ChatML otherwise."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise Unsupported("the base model's tokenizer has no chat template to translate")

    def render(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)

    first = render(_PROBES[0])
    system = None
    head = f"{START}system\n"
    if first.startswith(head) and first != chatml(_PROBES[0]):
        system = first[len(head):first.find(END)]
    for probe in _PROBES:
        expected = chatml(([{"role": "system", "content": system}] if system is not None
                           and probe[0]["role"] != "system" else []) + probe)
        got = render(probe)
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                      min(len(got), len(expected)))
            raise Unsupported(
                "the base model's chat template is not ChatML-style, so no Ollama TEMPLATE is "
                f"written for it: for {json.dumps(probe)} it renders {got[at:at + 40]!r} where "
                f"ChatML has {expected[at:at + 40]!r}")
    return system


def stop_tokens(tokenizer, base_folder: Path) -> list[str]:
    ids: list[int] = []
    gen = base_folder / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    names = [END] + [tokenizer.convert_ids_to_tokens(int(i)) for i in ids]
    return list(dict.fromkeys(n for n in names if n))


def modelfile(tokenizer, base_folder: Path, gguf_name: str = gguf_merged.FILE) -> str:
    system = default_system(tokenizer)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{TEMPLATE}"""']
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stop_tokens(tokenizer, base_folder)]
    return "\n".join(lines) + "\n"


def write(folder: Path, dest: Path, registry: ModelRegistry, dtype: str = "f16") -> Path:
    """Write `dest/model.gguf` and `dest/Modelfile`; checks the template before merging."""
    from transformers import AutoTokenizer

    name = gguf_merged.checkpoint_base(folder)
    gguf_merged.base_gguf(registry, name)  # refuse a non-GGUF base before any work
    base_folder = registry.resolve(name)
    text = modelfile(AutoTokenizer.from_pretrained(str(base_folder)), base_folder)
    gguf_merged.write(folder, dest, registry, dtype)
    (dest / MODELFILE).write_text(text)
    return dest
