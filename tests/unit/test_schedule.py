"""The job loop's learning-rate schedule and optimizer settings against transformers' own
schedules with warmup, step by step."""

from __future__ import annotations

import pytest
import torch
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from tuneforge.jobs.loop import adam, lr_at
from tuneforge.jobs.spec import parse_spec

ROWS = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]


def spec(**options):
    return parse_spec({"type": "sft", "base_model": "m", "data": ROWS, **options})


def transformers_lrs(make, base_lr: float, total: int, warmup: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    schedule = make(optimizer, warmup) if make is get_constant_schedule_with_warmup else \
        make(optimizer, warmup, total)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out


@pytest.mark.parametrize("total, ratio", [(10, 0.0), (10, 0.1), (37, 0.25), (5, 0.5)])
@pytest.mark.parametrize("schedule, make", [("linear", get_linear_schedule_with_warmup),
                                            ("constant", get_constant_schedule_with_warmup)])
def test_the_schedule_is_transformers_with_warmup(total, ratio, schedule, make):
    s = spec(warmup_ratio=ratio, lr_schedule=schedule)
    warmup = -(-int(ratio * 1000) * total // 1000)  # ceil(ratio * total), exactly
    ours = [lr_at(s, 3e-4, step, total) for step in range(total)]
    assert ours == pytest.approx(transformers_lrs(make, 3e-4, total, warmup), rel=1e-12,
                                 abs=1e-15)


def test_adam_carries_weight_decay_and_clipping():
    params = adam(spec(weight_decay=0.01, max_grad_norm=1.0), 1e-4)
    assert (params.learning_rate, params.weight_decay, params.grad_clip_norm) == (1e-4, 0.01, 1.0)
    plain = adam(spec(), 1e-4)
    assert (plain.weight_decay, plain.grad_clip_norm) == (0.0, 0.0)


def test_the_lora_switches_need_one_group():
    with pytest.raises(Exception, match="at least one of train_attn"):
        spec(train_attn=False, train_mlp=False, train_unembed=False)
    assert spec(train_mlp=False).train_mlp is False
