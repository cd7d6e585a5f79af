"""Our LoRA layers against PEFT on identical weights, and mixed-adapter batches."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from tuneforge.engine import lora


def small_qwen3(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
    return Qwen3ForCausalLM(config).eval()


def random_adapter(model, targets, config: lora.LoRAConfig, seed: int) -> lora.Adapter:
    adapter = lora.new_adapter(config, targets, model, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in adapter.B.values():  # B starts at zero; make the delta visible
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return adapter


GROUPS = [
    dict(train_attn=True, train_mlp=True, train_unembed=True),
    dict(train_attn=True, train_mlp=False, train_unembed=False),
    dict(train_attn=False, train_mlp=True, train_unembed=True),
]


@pytest.mark.parametrize("groups", GROUPS, ids=["all", "attn", "mlp+unembed"])
@pytest.mark.parametrize("rank", [1, 8])
def test_forward_matches_peft(groups, rank):
    base = small_qwen3()
    reference = copy.deepcopy(base)
    router, targets = lora.inject(base)
    config = lora.LoRAConfig(rank=rank, alpha=32.0, seed=3, **groups)
    adapter = random_adapter(base, targets, config, seed=4)

    modules = sorted({p.rsplit(".", 1)[-1] for g in config.groups for p in targets[g]})
    peft_model = peft.get_peft_model(reference, peft.LoraConfig(
        r=rank, lora_alpha=32.0, lora_dropout=0.0, target_modules=modules))
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                path = name.removeprefix("base_model.model.")
                module.lora_A["default"].weight.copy_(adapter.A[path])
                module.lora_B["default"].weight.copy_(adapter.B[path])
    assert sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in peft_model.modules()) \
        == len(adapter.A)

    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), lora.activate(router, [lora.Segment(adapter, 0, 3)]):
        ours = base(input_ids=ids).logits
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    assert torch.max(torch.abs(ours - theirs)) <= 1e-5
    with torch.no_grad():
        untouched = base(input_ids=ids).logits  # no routing: the frozen base model
    assert torch.max(torch.abs(untouched - ours)) > 1e-3


def test_mixed_adapter_batch_equals_each_alone():
    base = small_qwen3(seed=1)
    router, targets = lora.inject(base)
    a1 = random_adapter(base, targets, lora.LoRAConfig(rank=2, alpha=32, train_mlp=False,
                                                       train_unembed=False, seed=1), seed=11)
    a2 = random_adapter(base, targets, lora.LoRAConfig(rank=16, alpha=32, train_attn=False,
                                                       seed=2), seed=12)
    ids = torch.randint(0, 97, (5, 9), generator=torch.Generator().manual_seed(0))
    segments = [lora.Segment(a1, 0, 2), lora.Segment(None, 2, 3), lora.Segment(a2, 3, 5)]
    with torch.no_grad():
        with lora.activate(router, segments):
            mixed = base(input_ids=ids).logits
        with lora.activate(router, [lora.Segment(a1, 0, 2)]):
            solo1 = base(input_ids=ids[0:2]).logits
        plain = base(input_ids=ids[2:3]).logits
        with lora.activate(router, [lora.Segment(a2, 0, 2)]):
            solo2 = base(input_ids=ids[3:5]).logits
    torch.testing.assert_close(mixed[0:2], solo1, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[2:3], plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[3:5], solo2, atol=1e-5, rtol=0)


def test_new_adapter_is_initialised_like_peft():
    base = small_qwen3()
    _router, targets = lora.inject(base)
    config = lora.LoRAConfig(rank=4, alpha=32, seed=7)
    first = lora.new_adapter(config, targets, base, torch.device("cpu"))
    again = lora.new_adapter(config, targets, base, torch.device("cpu"))
    other = lora.new_adapter(lora.LoRAConfig(rank=4, alpha=32, seed=8), targets, base,
                             torch.device("cpu"))
    expected = {p for g in ("attn", "mlp", "unembed") for p in targets[g]}
    assert set(first.A) == expected and len(expected) == 2 * 7 + 1
    for path, a in first.A.items():
        fan_in = a.shape[1]
        assert torch.all(first.B[path] == 0)
        assert a.abs().max() <= 1 / math.sqrt(fan_in)
        assert a.abs().max() > 0.5 / math.sqrt(fan_in)  # spread over the whole ±bound range
        assert torch.equal(a, again.A[path])
        assert not torch.equal(a, other.A[path])
    assert first.scaling == 32 / 4


def test_config_refuses_what_cannot_train():
    with pytest.raises(ValueError, match="at least one"):
        lora.LoRAConfig(rank=4, alpha=32, train_attn=False, train_mlp=False, train_unembed=False)
    with pytest.raises(ValueError, match="rank"):
        lora.LoRAConfig(rank=0, alpha=32)
