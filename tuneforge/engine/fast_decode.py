"""A lean forward pass for decoding Llama-family models (Llama, SmolLM2, Qwen2, Qwen3, Mistral
without a sliding window), with a preallocated KV cache.

The transformers forward pass spends a large share of a one-token step on Python: module calls,
mask building, cache bookkeeping. This module runs the same computation from the model's own
tensors, one call per op:

- embedding, RMSNorm (computed as transformers computes it, in fp32), q/k/v/o and the gated MLP,
  Qwen3's per-head q/k norms, the final norm and `lm_head`; RoPE with the cos/sin of the model's
  own rotary module (so every rope-scaling variant stays right);
- each frozen linear layer in the form that reads its weight fastest (`_Weights`): fp32 on CPU,
  a transposed contiguous copy where the output is wider than the input (`x @ W^T` over a
  row-major `[in, out]` copy reads the weight about 1.7x faster at one row than a
  matrix-vector product over `[out, in]`; it rounds its sums in another order, `TRANSPOSE`);
  bf16 on CPU, the weight reordered once into oneDNN's blocked layout (1.35-1.9x faster than
  `F.linear` at one row, 1.1-1.3x at 64; the same results bit for bit, checked on a probe when
  built, `PACK`); bf16
  elsewhere, a bf16 copy where the base is not stored in bf16 already (the rounding autocast
  makes, once instead of at every call); fp32 on CUDA, the model's weight itself. Where a copy
  is made anyway, q/k/v and gate/up share one matrix, so each is one product. A quantized base
  layer (or any other module) is called as is;
- LoRA: each adapter's delta only on its own rows (`LoRALinear`'s own delta, and its stacked
  batched-matmul form for equal-sized frozen segments, so the arithmetic and the dtypes are the
  reference's), and no LoRA work at all where no row has an adapter for that layer;
- attention by `scaled_dot_product_attention` over a `KVCache`: per layer `[rows, kv_heads,
  capacity, head_dim]` buffers, written in place and doubled when full (never grown per token);
  grouped heads by `enable_gqa` without a mask, expanded where a padding mask is needed.

bf16 runs under the same autocast as the reference path, so every op takes the dtype it takes
there (a tied `lm_head` is copied for its product; the embedding is untouched).

Anything this module does not know (another architecture, a sliding window, other norms) is
named by `unsupported`, and the decoder uses the transformers forward instead. Shapes stay
static between doublings, which would suit CUDA graphs (not used here). torch.compile is not
used: a one-row step is bound by reading the weights (the products are ~90% of it here), which
compiling does not change, while the cache's growing width and the changing number of rows
would make it recompile.
"""

from __future__ import annotations

import logging
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.engine import lora

logger = logging.getLogger(__name__)

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")
_SILU = ("SiLUActivation", "SiLU")
MIN_CAPACITY = 64  # columns of a new cache buffer; doubled as needed
# fp32 on CPU: transposed copies of the wide products (faster; they round their sums in another
# order, so logprobs agree with the reference within 1e-4 rather than 1e-5)
TRANSPOSE = True
# bf16 on CPU: weight copies in oneDNN's blocked layout (faster, the same results bit for bit)
PACK = True


def unsupported(model: nn.Module) -> str | None:
    """Why the lean forward cannot run `model` exactly, or None when it can."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        return f"architecture {name}"
    config = model.config
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "layers other than full attention (sliding window)"
    if name == "MistralForCausalLM" and config.sliding_window is not None:
        return "Mistral sliding window"
    inner = getattr(model, "model", None)
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, attr):
            return f"no model.{attr}"
    if type(inner.embed_tokens) is not nn.Embedding:
        return "embedding is not nn.Embedding"
    norms = [inner.norm]
    for layer in inner.layers[: config.num_hidden_layers]:
        attn, mlp = layer.self_attn, layer.mlp
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
        if name == "Qwen3ForCausalLM":
            norms += [attn.q_norm, attn.k_norm]
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                     mlp.up_proj, mlp.down_proj):
            if not isinstance(proj, lora.LoRALinear | nn.Linear):
                return f"projection {type(proj).__name__}"
    if any(type(n).__name__ not in _NORMS for n in norms):
        return "norm other than RMSNorm"
    if not isinstance(model.lm_head, lora.LoRALinear | nn.Linear):
        return f"lm_head {type(model.lm_head).__name__}"
    return None


class KVCache:
    """Keys and values of every layer: `[rows, kv_heads, capacity, head_dim]`, columns
    `start:length` in use (the rows left-padded within them, see the decoder's mask)."""

    def __init__(self, num_layers: int, min_capacity: int = MIN_CAPACITY) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.start = 0
        self.length = 0
        self.min_capacity = min_capacity

    @property
    def columns(self) -> int:
        return self.length - self.start

    def reserve(self, t: int) -> None:
        """Room for `t` more columns: the buffers double (columns in use moved to the front)."""
        keys = self.keys[0]
        if keys is None or self.length + t <= keys.shape[2]:
            return
        for i in range(len(self.keys)):
            self.keys[i] = _grow(self.keys[i], self.start, self.length, t, self.min_capacity)
            self.values[i] = _grow(self.values[i], self.start, self.length, t,
                                   self.min_capacity)
        self.start, self.length = 0, self.length - self.start

    def write(self, i: int, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Put layer i's new keys/values `[rows, kv_heads, T, head_dim]` after the columns in
        use (room `reserve`d); return all of that layer's columns in use (views)."""
        end = self.length + k.shape[2]
        if self.keys[i] is None:  # the first write: buffers in the dtype the layer computes in
            cap = _capacity(end, self.min_capacity)
            self.keys[i] = k.new_zeros((k.shape[0], k.shape[1], cap, k.shape[3]))
            self.values[i] = v.new_zeros((v.shape[0], v.shape[1], cap, v.shape[3]))
        if self.keys[i].dtype != k.dtype or self.values[i].dtype != v.dtype:
            # a wider dtype than before (an fp32 LoRA delta under autocast): the buffer widens,
            # as concatenating onto it would
            self.keys[i] = self.keys[i].to(torch.promote_types(self.keys[i].dtype, k.dtype))
            self.values[i] = self.values[i].to(torch.promote_types(self.values[i].dtype,
                                                                   v.dtype))
        keys, values = self.keys[i], self.values[i]
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, self.start:end], values[:, :, self.start:end]

    def advance(self, t: int) -> None:
        self.length += t

    def select(self, index: torch.Tensor) -> None:
        """Keep rows `index` (in that order)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            self.keys[i], self.values[i] = k[index], v[index]

    def repeat(self, n: int) -> None:
        """Each row `n` times (a request's samples)."""
        if n > 1:
            for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
                self.keys[i] = k.repeat_interleave(n, dim=0)
                self.values[i] = v.repeat_interleave(n, dim=0)

    def crop_left(self, columns: int) -> None:
        self.start += columns

    def join(self, other: KVCache) -> None:
        """Append `other`'s rows, both right-aligned in a window as wide as the wider one."""
        width = max(self.columns, other.columns)
        cap = _capacity(width + 1, self.min_capacity)
        for i in range(len(self.keys)):
            self.keys[i] = _aligned(self.keys[i], other.keys[i], self, other, width, cap)
            self.values[i] = _aligned(self.values[i], other.values[i], self, other, width, cap)
        self.start, self.length = 0, width


def _capacity(n: int, least: int) -> int:
    cap = least
    while cap < n:
        cap *= 2
    return cap


def _grow(old: torch.Tensor, start: int, length: int, t: int, least: int) -> torch.Tensor:
    cap = _capacity(length - start + t, least)
    new = old.new_zeros((old.shape[0], old.shape[1], cap, old.shape[3]))
    new[:, :, : length - start] = old[:, :, start:length]
    return new


def _aligned(mine: torch.Tensor, theirs: torch.Tensor, a: KVCache, b: KVCache, width: int,
             cap: int) -> torch.Tensor:
    rows = mine.shape[0] + theirs.shape[0]
    dtype = torch.promote_types(mine.dtype, theirs.dtype)
    out = torch.zeros((rows, mine.shape[1], cap, mine.shape[3]), dtype=dtype,
                      device=mine.device)
    out[: mine.shape[0], :, width - a.columns: width] = mine[:, :, a.start: a.length]
    out[mine.shape[0]:, :, width - b.columns: width] = theirs[:, :, b.start: b.length]
    return out


class _Weights:
    """Frozen linear layers computed together: `parts` side by side along the output.

    `kind` says how: "t" (one transposed contiguous copy, `x @ wt`), "packed" (bf16 on CPU: the
    weight reordered once into oneDNN's blocked layout, `_pack`), "w" (an `[out, in]` weight,
    `F.linear`: the model's own where it has the dtype, else a copy), "each" (one `_Weights` per
    part: fusing them would copy weights for no faster product), "module" (each base module
    called as is: a quantized layer)."""

    def __init__(self, parts: list[nn.Module], dtype: torch.dtype | None, transpose: bool,
                 pack: bool = False) -> None:
        self.lora = [p if isinstance(p, lora.LoRALinear) else None for p in parts]
        bases = [p.base if isinstance(p, lora.LoRALinear) else p for p in parts]
        self.sizes = [b.out_features for b in bases]
        self.in_features = bases[0].in_features
        self.own = bases[0].weight  # the model's own tensor
        self.weight = self.bias = None
        if any(type(b) is not nn.Linear for b in bases):
            self.kind, self.parts = "module", bases
            return
        wide = transpose and sum(self.sizes) > bases[0].in_features
        cast = dtype is not None and any(b.weight.dtype != dtype for b in bases)
        if not (wide or cast or pack) and len(bases) > 1:
            self.kind, self.parts = "each", [_Weights([p], dtype, transpose) for p in parts]
            return
        with torch.no_grad():
            w = torch.cat([b.weight for b in bases]) if len(bases) > 1 else bases[0].weight
            bias = None
            if any(b.bias is not None for b in bases):
                bias = torch.cat([b.bias if b.bias is not None else
                                  b.weight.new_zeros(b.out_features) for b in bases])
            if cast:  # the rounding autocast makes, once
                w = w.to(dtype)
                bias = bias.to(dtype) if bias is not None else None
            packed = _pack(w, bias) if pack else None
            if packed is not None:
                self.kind, self.dtype, w = "packed", w.dtype, packed
            elif wide:
                self.kind, w = "t", w.t().contiguous()
            else:
                self.kind = "w"
        self.weight, self.bias = w, bias

    @property
    def copied_bytes(self) -> int:
        """Bytes of weight copies this holds (none where it uses the model's own tensors)."""
        if self.kind == "each":
            return sum(p.copied_bytes for p in self.parts)
        if self.kind == "module" or self.weight is self.own:
            return 0
        return self.weight.nbytes + (self.bias.nbytes if self.bias is not None else 0)

    def __call__(self, x: torch.Tensor, segments: list[lora.Segment] | None
                 ) -> list[torch.Tensor]:
        if self.kind == "each":
            return [out for p in self.parts for out in p(x, segments)]
        if self.kind == "module":
            outs = [m(x) for m in self.parts]
        else:
            if self.kind == "t":
                y = torch.matmul(x, self.weight)
                if self.bias is not None:
                    y += self.bias
            elif self.kind == "packed":  # autocast would cast x the same way for F.linear
                flat = x.reshape(-1, x.shape[-1]).to(self.dtype).contiguous()
                y = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [],
                                                       "").view(*x.shape[:-1], -1)
            else:
                y = F.linear(x, self.weight, self.bias)
            outs = list(torch.split(y, self.sizes, dim=-1)) if len(self.sizes) > 1 else [y]
        if segments:
            outs = [out if module is None else _add_lora(out, x, module, segments)
                    for out, module in zip(outs, self.lora, strict=True)]
        return outs


def _pack(w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """`w` (bf16, CPU) in oneDNN's blocked layout (the op inductor uses for frozen linears), or
    None where that op is missing or does not give `F.linear`'s result bit for bit on a probe
    (then `F.linear` serves)."""
    if (w.device.type != "cpu" or w.dtype != torch.bfloat16
            or not torch.backends.mkldnn.is_available()):
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        probe = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.dtype)
        for x in (probe[:1], probe):
            got = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
            if not torch.equal(got, F.linear(x, w, bias)):
                return None
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    return packed


def _add_lora(y: torch.Tensor, x: torch.Tensor, module: lora.LoRALinear,
              segments: list[lora.Segment]) -> torch.Tensor:
    """`LoRALinear.forward` on the base output `y`: the same deltas, and the same dtype of the
    sum (under autocast an fp32 delta makes the sum fp32, for every row of the batch)."""
    path = module.path
    users = [s for s in segments if s.adapter is not None and path in s.adapter.A]
    if not users:
        return y
    if len(segments) == 1:
        return y + module._delta(x, users[0].adapter)
    stacked = module._stack(segments)
    if stacked is not None:
        a, b = stacked
        xs = x.reshape(len(segments), -1, x.shape[-1]).to(a.dtype)
        return y + torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2)
                             ).reshape(y.shape).to(y.dtype)
    deltas = [(seg, module._delta(x[seg.start:seg.stop], seg.adapter)) for seg in users]
    dtype = torch.promote_types(y.dtype, deltas[0][1].dtype)
    y = y.to(dtype, copy=True)  # rows without an adapter keep their values
    for seg, delta in deltas:
        y[seg.start:seg.stop] += delta
    return y


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama/Qwen RMSNorm: op for op, or (fp32 input and weight) the fused op,
    which computes the same fp32 ops."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Layer:
    def __init__(self, layer: nn.Module, dtype: torch.dtype | None, transpose: bool,
                 pack: bool) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _Weights([attn.q_proj, attn.k_proj, attn.v_proj], dtype, transpose, pack)
        self.o = _Weights([attn.o_proj], dtype, transpose, pack)
        self.gate_up = _Weights([mlp.gate_proj, mlp.up_proj], dtype, transpose, pack)
        self.down = _Weights([mlp.down_proj], dtype, transpose, pack)
        self.in_norm = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.post_norm = (layer.post_attention_layernorm.weight,
                          layer.post_attention_layernorm.variance_epsilon)
        q_norm = getattr(attn, "q_norm", None)
        self.qk_norm = None if q_norm is None else (
            (q_norm.weight, q_norm.variance_epsilon),
            (attn.k_norm.weight, attn.k_norm.variance_epsilon))
        self.scaling = attn.scaling
        self.head_dim = attn.head_dim
        act = mlp.act_fn
        self.act = F.silu if type(act).__name__ in _SILU else act

    def weights(self) -> list[_Weights]:
        return [self.qkv, self.o, self.gate_up, self.down]


class LeanModel:
    """The lean forward pass of one base model in one compute dtype."""

    def __init__(self, model: nn.Module, dtype: str, transpose: bool = True,
                 pack: bool = True) -> None:
        inner, config = model.model, model.config
        device = model.lm_head.weight.device
        # bf16: copies in bf16 (F.linear over them is what autocast computes). fp32 on CPU: a
        # transposed copy where the output is wider than the input (there `x @ wt` reads the
        # weight faster than a matrix-vector product over `[out, in]`; where it is not, it
        # reads it slower, and the model's own weight serves).
        cast = torch.bfloat16 if dtype == "bf16" else None
        transpose = transpose and cast is None and device.type == "cpu"
        pack = pack and cast is not None and device.type == "cpu"
        self.dtype = dtype
        self.device = device
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.layers = [_Layer(layer, cast, transpose, pack)
                       for layer in inner.layers[: config.num_hidden_layers]]
        self.norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.lm_head = _Weights([model.lm_head], cast, transpose, pack)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads

    @property
    def copied_bytes(self) -> int:
        """Memory held by weight copies, beyond the model's own."""
        return sum(w.copied_bytes for layer in self.layers for w in layer.weights()
                   ) + self.lm_head.copied_bytes

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers), MIN_CAPACITY)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.dtype == "bf16")

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                mask: torch.Tensor | None, segments: list[lora.Segment],
                all_logits: bool = False) -> torch.Tensor:
        """fp32 logits `[rows, T, vocab]` (`T` = 1 unless `all_logits`) of `ids` `[rows, T]` at
        `positions`, after the cache's columns; `mask` `[rows, columns + T]` (True = real) where
        rows are left-padded, else None. A prompt (T > 1) must start an empty cache."""
        rows, t = ids.shape
        assert t == 1 or cache.columns == 0
        if not any(s.adapter is not None for s in segments):
            segments = None  # no LoRA work anywhere
        with self.autocast():
            h = F.embedding(ids, self.embed)
            cos, sin = self.rotary(h, positions)
            cos, sin = cos[:, None], sin[:, None]
            cache.reserve(t)
            attn_mask = None if mask is None else mask[:, None, None, :]
            groups = self.num_heads // self.num_kv_heads
            for i, layer in enumerate(self.layers):
                x = _rms(h, *layer.in_norm)
                q, k, v = layer.qkv(x, segments)
                q = q.view(rows, t, -1, layer.head_dim)
                k = k.view(rows, t, -1, layer.head_dim)
                if layer.qk_norm is not None:
                    q, k = _rms(q, *layer.qk_norm[0]), _rms(k, *layer.qk_norm[1])
                heads = q.shape[2]
                if q.dtype == k.dtype:  # both rotated at once
                    qk = torch.cat((q, k), dim=2).transpose(1, 2)
                    qk = qk * cos + _rotate_half(qk) * sin
                    q, k = qk[:, :heads], qk[:, heads:]
                else:
                    q, k = q.transpose(1, 2), k.transpose(1, 2)
                    q = q * cos + _rotate_half(q) * sin
                    k = k * cos + _rotate_half(k) * sin
                v = v.view(rows, t, -1, layer.head_dim).transpose(1, 2)
                keys, values = cache.write(i, k, v)
                if attn_mask is None:
                    a = F.scaled_dot_product_attention(q, keys, values, scale=layer.scaling,
                                                       is_causal=t > 1, enable_gqa=True)
                else:
                    a = F.scaled_dot_product_attention(
                        q, keys.repeat_interleave(groups, dim=1),
                        values.repeat_interleave(groups, dim=1), attn_mask=attn_mask,
                        scale=layer.scaling)
                a = a.transpose(1, 2).reshape(rows, t, -1)
                h = h + layer.o(a, segments)[0]
                x = _rms(h, *layer.post_norm)
                g, u = layer.gate_up(x, segments)
                h = h + layer.down(layer.act(g) * u, segments)[0]
            cache.advance(t)
            if not all_logits:
                h = h[:, -1:]
            logits = self.lm_head(_rms(h, *self.norm), segments)[0]
        return logits.float()


_built: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, bool, bool], LeanModel] | None] = (
    weakref.WeakKeyDictionary())
_lock = threading.Lock()


def lean_model(model: nn.Module, dtype: str) -> LeanModel | None:
    """The lean forward of `model` in `dtype` (built once per base model and dtype, with its
    weight copies), or None when the model is not supported (logged once per model)."""
    key = (dtype, TRANSPOSE, PACK)
    with _lock:
        if model not in _built:
            reason = unsupported(model)
            if reason is not None:
                logger.info("%s decodes through the transformers forward pass: %s",
                            type(model).__name__, reason)
            _built[model] = None if reason is not None else {}
        per_key = _built[model]
        if per_key is None:
            return None
        if key not in per_key:
            per_key[key] = LeanModel(model, dtype, transpose=TRANSPOSE, pack=PACK)
        return per_key[key]


def copied_bytes(model: nn.Module) -> int:
    """Bytes of the weight copies held for decoding `model` (0 before it first decodes)."""
    with _lock:
        built = _built.get(model)
    return sum(lean.copied_bytes for lean in built.values()) if built else 0
