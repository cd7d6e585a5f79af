"""Facts about the base model a job trains: the name the server serves it under (with its
quantization), its default learning rate and its renderer (chat template), both as the cookbook
chooses them (from the plain model name: a quantized copy has the same tokenizer and family)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from tinker import types

from tuneforge import quantization
from tuneforge.errors import UserError


def served_base(spec) -> str:
    """The base model as the server serves it for this job: `BASE@nf4` etc. when the job trains
    on a quantized copy. Its training client and every sampler of the base model (a DPO
    reference, a report's base comparison) use it, so they see the weights the adapter sits on;
    renderer and learning-rate lookups keep the plain `spec.base_model`."""
    return quantization.served_name(spec.base_model, spec.quantization)


def default_learning_rate(base_model: str, info: types.GetInfoResponse | None) -> float:
    """The cookbook's LoRA learning-rate formula (`hyperparam_utils.get_lr`): 5e-4 scaled by
    (2000 / hidden_size) ** e with e = 0.781 for Llama-family and 0.0775 for Qwen-family models.
    The family and hidden size come from the cookbook's tables, else from the served model's
    config.json (so built-in and local models work offline)."""
    from tinker_cookbook import hyperparam_utils

    try:
        return float(hyperparam_utils.get_lr(base_model, is_lora=True))
    except Exception:
        pass
    config = {}
    tok = getattr(getattr(info, "model_data", None), "tokenizer_id", None)
    if tok and (Path(tok) / "config.json").is_file():
        config = json.loads((Path(tok) / "config.json").read_text())
    kind = str(config.get("model_type", "")).lower()
    hidden = config.get("hidden_size")
    exponent = 0.781 if "llama" in kind else 0.0775 if "qwen" in kind else None
    if exponent is None or not hidden:
        raise UserError(f"learning_rate: no default for base model {base_model!r} (the get_lr "
                        "formula covers Llama and Qwen families); set learning_rate")
    return 5e-4 * (2000 / int(hidden)) ** exponent


def renderer_for(spec, client):
    """(name, renderer) of a job: its `renderer` option, else chosen from the base model, over
    a tokenizer object of the caller's own (fast tokenizers must not be shared between threads
    — concurrent use fails with "Already borrowed" — and the SDK caches one per model).
    `client` is a training or sampling client of the SDK."""
    return pick_renderer(spec.renderer, spec.base_model, copy.deepcopy(client.get_tokenizer()))


def pick_renderer(name: str | None, base_model: str, tokenizer):
    from tinker_cookbook import model_info, renderers

    if name is None:
        try:
            name = model_info.get_recommended_renderer_name(base_model)
        except Exception:
            # ChatML special tokens (Qwen3, SmolLM2, the built-in models): the Qwen3 instruct
            # renderer writes exactly that format; anything else falls back to plain text.
            name = "qwen3_instruct" if "<|im_start|>" in tokenizer.get_vocab() else "role_colon"
    try:
        return name, renderers.get_renderer(name, tokenizer)
    except Exception as e:
        raise UserError(f"renderer: {name!r} is not available ({e})",
                        fields=[{"field": "renderer", "message": f"{name!r} is not available"}]
                        ) from None
