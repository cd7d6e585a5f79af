"""Gradient checkpointing: decoder layers keep only their inputs in the forward pass and
recompute their activations in the backward pass — less memory, the same results.

Each decoder layer's `forward` is wrapped once, when the base model loads; a pass switches it on
through the model's router (`Router.checkpoint`), so runs that ask for it and runs that do not
share one base model (and one pass: any run in it asking turns it on for the pass, which changes
no result). The recomputation runs inside the backward pass, so the pass keeps its LoRA routing
active until its gradients are taken (engine/passes.py). LoRA dropout draws its masks from keys
the routing carries, not from the global RNG, so the recomputation draws the same masks
(engine/lora.py).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tuneforge.engine import lora


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def install(model: nn.Module, router: lora.Router) -> None:
    for layer in decoder_layers(model):
        layer.forward = functools.partial(_maybe_checkpointed, layer.forward, router)


def supported(model: nn.Module) -> bool:
    return bool(decoder_layers(model))


def _maybe_checkpointed(forward, router: lora.Router, *args, **kwargs):
    if router.checkpoint and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)
