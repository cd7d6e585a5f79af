"""LoRA adapters as plain tensors, applied by our own linear wrapper.

Math (identical to PEFT's `LoraLayer`): for a frozen linear `W` and an adapter of rank r with
`A: [r, in]`, `B: [out, r]`, scaling `s = alpha / r` and dropout probability p:

    y = W x + s * B (A dropout(x))

Dropout is inverted dropout (`x * mask / (1 - p)`, mask ~ Bernoulli(1 - p)), as `nn.Dropout`.
It applies only where a segment carries a dropout key: training passes set one, while
`forward`, sampling and prompt logprobs never do (PEFT's eval mode). With p = 0 no extra
operation runs. A mask is drawn from its own generator seeded by (segment key, module path), not
from the global RNG: a run's masks follow from its seed, its step and the shape of its rows, not
from what other adapters in the pass draw, and the recomputation of a checkpointed layer
(engine/checkpointing.py) draws the very same mask again.

Initialisation is PEFT's default: `A ~ kaiming_uniform(a=sqrt(5))` (uniform in ±1/sqrt(in)),
`B = 0`, so a fresh adapter leaves the base model unchanged.

Why not PEFT itself: one forward pass here may serve rows of a batch that belong to different
adapters (different ranks, different target modules). Each `LoRALinear` therefore reads the
active routing — a list of `Segment(adapter, start, stop)` over the batch dimension — from a
`Router` shared by the whole model, and adds each adapter's delta to its own rows. Tensors are
keyed by module path, with the same names PEFT uses, so checkpoints load in PEFT unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from tuneforge.errors import Unsupported, UserError

# Module-name suffixes per Tinker LoRA switch (Llama / Qwen / Mistral style decoders).
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "unembed": ("lm_head",),
}


@dataclass
class LoRAConfig:
    rank: int
    alpha: float
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    seed: int | None = None
    dropout: float = 0.0  # on the adapter's input, in training passes only

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserError(f"lora_config.rank must be >= 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise UserError(f"lora_alpha must be a finite number > 0, got {self.alpha}")
        if not (math.isfinite(self.dropout) and 0 <= self.dropout < 1):
            raise UserError(f"lora_dropout must be in the range [0, 1), got {self.dropout}")
        if not (self.train_attn or self.train_mlp or self.train_unembed):
            raise UserError("lora_config: at least one of train_attn, train_mlp, train_unembed")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def groups(self) -> list[str]:
        on = {"attn": self.train_attn, "mlp": self.train_mlp, "unembed": self.train_unembed}
        return [g for g, enabled in on.items() if enabled]


@dataclass
class Adapter:
    """One adapter's LoRA tensors, keyed by module path (e.g. `model.layers.0.self_attn.q_proj`)."""

    config: LoRAConfig
    A: dict[str, torch.Tensor] = field(default_factory=dict)
    B: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.config.scaling

    def parameters(self) -> list[torch.Tensor]:
        """A then B for every module, in a fixed order (the optimizer relies on it)."""
        return [t for path in sorted(self.A) for t in (self.A[path], self.B[path])]

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for path in sorted(self.A):
            yield f"{path}.lora_A", self.A[path]
            yield f"{path}.lora_B", self.B[path]

    def snapshot(self) -> Adapter:
        """A frozen copy: later training steps on `self` never show through it."""
        return Adapter(
            config=self.config,
            A={k: v.detach().clone() for k, v in self.A.items()},
            B={k: v.detach().clone() for k, v in self.B.items()},
        )

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())


@dataclass(frozen=True)
class Segment:
    """Rows `start:stop` of the batch use `adapter` (None = base model only). `dropout_key`
    seeds the adapter's dropout masks for these rows; None: no dropout (evaluation)."""

    adapter: Adapter | None
    start: int
    stop: int
    dropout_key: int | None = None

    def drops(self) -> bool:
        return (self.dropout_key is not None and self.adapter is not None
                and self.adapter.config.dropout > 0)


def mix(*parts: object) -> int:
    """A 63-bit key from ints and strings, the same in every process (unlike `hash`)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def dropout_noise(shape: torch.Size, p: float, key: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """The inverted-dropout factor `mask / (1 - p)` of one draw, as `nn.Dropout` makes it."""
    gen = torch.Generator(device=device)
    gen.manual_seed(key)
    noise = torch.empty(shape, dtype=dtype, device=device)
    return noise.bernoulli_(1 - p, generator=gen).div_(1 - p)


class Router:
    """The routing of the forward pass in progress; set by `activate`, read by every layer.
    `checkpoint` asks the decoder layers to recompute activations in the backward pass
    (engine/checkpointing.py)."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.checkpoint = False


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus the deltas of whichever adapters the router names."""

    def __init__(self, base: nn.Linear, path: str, router: Router) -> None:
        super().__init__()
        self.base = base
        self.path = path
        self.router = router
        self._path_key = mix(path)
        self._stacked: tuple | None = None  # (key, adapters, A [S, r, in], sB [S, out, r])

    @property
    def weight(self) -> torch.Tensor:  # some HF code reads `.weight` of projections
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        segments = self.router.segments
        if not segments:
            return y
        if len(segments) == 1:
            seg = segments[0]
            if seg.adapter is None or self.path not in seg.adapter.A:
                return y
            if seg.start == 0 and seg.stop == x.shape[0]:
                return y + self._delta(x, seg.adapter, seg.dropout_key)
        stacked = self._stack(segments)
        if stacked is not None:  # all segments alike: two batched matmuls for all of them
            a, b = stacked
            xs = x.reshape(len(segments), -1, x.shape[-1]).to(a.dtype)
            return y + torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2)
                                 ).reshape(y.shape).to(y.dtype)
        # Segments tile the batch in order. One split and one concatenation: slicing the input
        # and output per segment would make autograd build a full-size gradient per slice.
        pieces = torch.split(x, [seg.stop - seg.start for seg in segments], dim=0)
        deltas = []
        for seg, piece in zip(segments, pieces, strict=True):
            if seg.adapter is not None and self.path in seg.adapter.A:
                deltas.append(self._delta(piece, seg.adapter, seg.dropout_key))
            else:
                deltas.append(y.new_zeros(piece.shape[:-1] + y.shape[-1:]))
        return y + torch.cat(deltas, dim=0)

    def _stack(self, segments: list[Segment]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Frozen adapters of equal-sized segments as padded stacks (the scaling folded into B),
        kept while the same adapters decode together. None where that does not apply: training
        (weights change every step) or segments of different sizes."""
        sizes = {seg.stop - seg.start for seg in segments}
        adapters = [seg.adapter if seg.adapter is not None and self.path in seg.adapter.A
                    else None for seg in segments]
        if len(sizes) != 1 or torch.is_grad_enabled() or any(
                a is not None and a.A[self.path].requires_grad for a in adapters) or any(
                seg.drops() for seg in segments):
            return None
        key = tuple(id(a) for a in adapters)
        if self._stacked is None or self._stacked[0] != key:
            live = [a for a in adapters if a is not None]
            if not live:
                return None
            rank = max(a.A[self.path].shape[0] for a in live)
            ref = live[0].A[self.path]
            stack_a = ref.new_zeros(len(adapters), rank, self.base.in_features)
            stack_b = ref.new_zeros(len(adapters), self.base.out_features, rank)
            for i, a in enumerate(adapters):
                if a is not None:
                    r = a.A[self.path].shape[0]
                    stack_a[i, :r] = a.A[self.path]
                    stack_b[i, :, :r] = a.B[self.path] * a.scaling
            # holding the adapters keeps their ids from being reused by others
            self._stacked = (key, adapters, stack_a, stack_b)
        return self._stacked[2], self._stacked[3]

    def _delta(self, x: torch.Tensor, adapter: Adapter,
               dropout_key: int | None = None) -> torch.Tensor:
        """The adapter's delta on `x`; dropout on its input only with a `dropout_key`."""
        a, b = adapter.A[self.path], adapter.B[self.path]
        h = x.to(a.dtype)
        if dropout_key is not None and adapter.config.dropout > 0:
            h = h * dropout_noise(h.shape, adapter.config.dropout,
                                  mix(dropout_key, self._path_key), h.device, h.dtype)
        # the scaling on the rank-sized product, not on the (maybe vocabulary-sized) output
        return (((h @ a.t()) * adapter.scaling) @ b.t()).to(x.dtype)


def inject(model: nn.Module) -> tuple[Router, dict[str, list[str]]]:
    """Wrap every candidate target linear of `model` in place.

    Returns the model's router and, per target group, the wrapped module paths.
    """
    router = Router()
    suffix_group = {s: g for g, suffixes in TARGET_GROUPS.items() for s in suffixes}
    targets: dict[str, list[str]] = {g: [] for g in TARGET_GROUPS}
    for path, module in list(model.named_modules()):
        leaf = path.rsplit(".", 1)[-1]
        if leaf in suffix_group and isinstance(module, nn.Linear):
            parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
            setattr(parent, leaf, LoRALinear(module, path, router))
            targets[suffix_group[leaf]].append(path)
    model._tuneforge_router = router  # type: ignore[assignment]
    return router, targets


def new_adapter(
    config: LoRAConfig, targets: dict[str, list[str]], model: nn.Module, device: torch.device
) -> Adapter:
    """A fresh adapter over the modules of the enabled groups, initialised like PEFT."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(config.seed if config.seed is not None else torch.seed())
    adapter = Adapter(config=config)
    for group in config.groups:
        if not targets.get(group):
            raise Unsupported(
                f"lora_config.train_{group}: this base model has no linear layers named "
                f"{', '.join(TARGET_GROUPS[group])}"
            )
        for path in targets[group]:
            base = model.get_submodule(path).base
            out_f, in_f = base.out_features, base.in_features  # (a quantized weight is packed)
            bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform(a=sqrt(5)) on a [r, in] matrix
            a = (torch.rand(config.rank, in_f, generator=gen, dtype=torch.float32) * 2 - 1) * bound
            adapter.A[path] = a.to(device).requires_grad_(True)
            adapter.B[path] = torch.zeros(out_f, config.rank, device=device, requires_grad=True)
    return adapter


@contextlib.contextmanager
def activate(router: Router, segments: list[Segment], checkpoint: bool = False
             ) -> Iterator[None]:
    """Route the forward passes inside the block; the previous routing is restored after."""
    previous = router.segments, router.checkpoint
    router.segments, router.checkpoint = segments, checkpoint
    try:
        yield
    finally:
        router.segments, router.checkpoint = previous


def merge_into(model: nn.Module, A: dict[str, torch.Tensor], B: dict[str, torch.Tensor],
               scaling: float) -> None:
    """Fold an adapter into the weights of a plain (not injected) model: W += s * B @ A.

    A tied `lm_head` gets its own weight first, so merging it leaves the embedding unchanged.
    """
    with torch.no_grad():
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if "lm_head" in A and head is not None and head.weight is embed.weight:
            head.weight = nn.Parameter(head.weight.detach().clone())
            model.config.tie_word_embeddings = False
            if hasattr(model.config, "get_text_config"):
                model.config.get_text_config().tie_word_embeddings = False
        for path in A:
            linear = model.get_submodule(path)
            delta = scaling * (B[path].double() @ A[path].double())
            linear.weight += delta.to(linear.weight.dtype)
