"""Exports of a run on a 4-bit base (`tuneforge/tiny-qwen3@nf4`), checked against the server.

- The PEFT adapter (the checkpoint archive) loads with `PeftModel.from_pretrained` onto the
  base quantized by transformers' `BitsAndBytesConfig` (the config the server uses) and gives
  the server's logprobs.
- The merged export (the archive with `merged=true`, and `tuneforge export --merged`) is a plain
  16-bit model: the dequantized base with the adapter merged in, each weight rounded once to
  bf16, no quantization_config; plain `AutoModelForCausalLM.from_pretrained` loads it and gives
  the server's logprobs up to that rounding.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
import torch
from safetensors.torch import load_file
from tinker import types
from transformers import AutoModelForCausalLM

from tests.integration.server import ServerProcess
from tuneforge.engine import quantized

MODEL = "tuneforge/tiny-qwen3"
SERVED = f"{MODEL}@nf4"
TEXT = "A four-bit base, a sixteen-bit export, and the same logits on both sides."
# bf16 keeps 8 significant bits: rounding a weight to it moves it by at most 2^-8 of itself.
BF16_ROUNDING = 2.0 ** -8
# Max |logprob - server's| of the merged export, from its bf16 weights alone. Measured on this
# model and text: 0.0021 computing in fp32, 0.017 computing in bf16 (the default, from the
# config's dtype); about 4x that, while the adapter moves logprobs by several nats.
MERGED_FP32_COMPUTE_ATOL = 0.01
MERGED_BF16_COMPUTE_ATOL = 0.08


@dataclass
class Trained:
    run_id: str
    name: str
    tinker_path: str
    ids: list[int]
    untrained: np.ndarray  # the server's logprobs of TEXT before training
    live: np.ndarray  # ... and after


def datum(ids: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": np.array(ids[1:], dtype=np.int64)})


def server_logprobs(tc, ids: list[int]) -> np.ndarray:
    out = tc.forward([datum(ids)], "cross_entropy").result()
    return out.loss_fn_outputs[0]["logprobs"].to_numpy()


def reference_logprobs(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    proc = ServerProcess(tmp_path_factory.mktemp("qlora-export"), models_dir,
                         preload=(SERVED,)).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def trained(server) -> Trained:
    """Four steps of a rank-8 adapter (every module group, lm_head included) on the 4-bit base."""
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
    tc = sc.create_lora_training_client(base_model=SERVED, rank=8, seed=0).result()
    ids = tc.get_tokenizer().encode(TEXT)
    untrained = server_logprobs(tc, ids)
    for _ in range(4):
        tc.forward_backward([datum(ids)], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    path = tc.save_state("four-steps").result().path
    return Trained(tc.model_id, "four-steps", path, ids, untrained, server_logprobs(tc, ids))


def archive(server: ServerProcess, trained: Trained, dest: Path, merged: bool) -> Path:
    """The checkpoint's archive from the server, unpacked into `dest`; returns its folder."""
    r = httpx.get(f"{server.base_url}/api/runs/{trained.run_id}/checkpoints/weights/"
                  f"{trained.name}/archive", params={"merged": str(merged).lower()},
                  headers={"X-API-Key": server.api_key}, timeout=300)
    assert r.status_code == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
    (folder,) = dest.iterdir()
    return folder


def bnb_base(models_dir: Path, server_kernel: bool = True):
    """The tiny model quantized by transformers with the server's `BitsAndBytesConfig`.
    `server_kernel`: compute as the server does. bitsandbytes' default, on a CPU with
    AVX512-BF16, repacks each 4-bit weight at its first eval-mode forward without gradients
    and then multiplies in bf16; the server turns that off (engine/quantized.py)."""
    model = AutoModelForCausalLM.from_pretrained(
        str(models_dir / "tuneforge--tiny-qwen3"), dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=quantized.config("nf4", True, torch.float32))
    for _, layer in quantized.quantized_layers(model):
        if server_kernel and hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
    return model


def test_the_training_moved_the_logprobs(trained):
    """What the comparisons below would miss if the adapter were dropped: several nats."""
    assert np.abs(trained.live - trained.untrained).max() > 1.0
    assert trained.live.sum() > trained.untrained.sum() + 5.0


def test_peft_adapter_on_a_bitsandbytes_base_gives_the_server_logprobs(
        server, trained, models_dir, tmp_path, capsys):
    import peft

    folder = archive(server, trained, tmp_path, merged=False)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json",
                                                        "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == MODEL  # the model PEFT loads, not "…@nf4"
    model = peft.PeftModel.from_pretrained(bnb_base(models_dir), str(folder)).eval()
    assert len(quantized.quantized_layers(model)) == 4 * 7  # every projection stays 4-bit
    diff = np.abs(reference_logprobs(model, trained.ids) - trained.live).max()

    default = peft.PeftModel.from_pretrained(bnb_base(models_dir, server_kernel=False),
                                             str(folder)).eval()
    default_diff = np.abs(reference_logprobs(default, trained.ids) - trained.live).max()
    with capsys.disabled():
        print(f"\nPEFT on the BitsAndBytesConfig base vs the server: max |dlogprob| {diff:.2e}; "
              f"with bitsandbytes' default CPU kernel {default_diff:.2e}")
    assert diff <= 1e-4
    assert default_diff <= 1e-3


def test_merged_export_is_the_dense_twin_merged_in_bf16(server, trained, models_dir, tmp_path,
                                                       capsys):
    folder = archive(server, trained, tmp_path, merged=True)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    weights = load_file(str(folder / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}

    adapter = load_file(str(server.data_dir / "checkpoints" / trained.run_id / "weights" /
                            trained.name / "adapter_model.safetensors"))
    base = bnb_base(models_dir)
    scaling = 32.0 / 8
    checked = 0
    for path, layer in quantized.quantized_layers(base):
        prefix = f"base_model.model.{path}"
        dense = quantized.dequantized_weight(layer).double()
        delta = scaling * (adapter[f"{prefix}.lora_B.weight"].double()
                           @ adapter[f"{prefix}.lora_A.weight"].double())
        want, got = dense + delta, weights[f"{path}.weight"].double()
        # Rounded once to bf16 from the dense twin plus the delta (summed in fp32: that adds
        # 2^-24 of the terms, which shows where they cancel). Re-quantizing to 4 bits would
        # move weights by up to 1/14 of their block's largest.
        bound = BF16_ROUNDING * want.abs() + 2.0 ** -23 * (dense.abs() + delta.abs())
        assert torch.all((got - want).abs() <= bound), path
        assert (got - dense).abs().max() > 1e-3, path  # the adapter is in there
        checked += 1
    assert checked == 4 * 7

    fp32 = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert bf16.dtype == torch.bfloat16 and not hasattr(bf16.config, "quantization_config")
    fp32_diff = np.abs(reference_logprobs(fp32, trained.ids) - trained.live).max()
    bf16_diff = np.abs(reference_logprobs(bf16, trained.ids) - trained.live).max()
    with capsys.disabled():
        print(f"\nmerged bf16 export vs the server: max |dlogprob| {fp32_diff:.4f} computing "
              f"in fp32, {bf16_diff:.4f} in bf16")
    assert fp32_diff <= MERGED_FP32_COMPUTE_ATOL
    assert bf16_diff <= MERGED_BF16_COMPUTE_ATOL


def test_cli_merged_export_matches_the_archive(server, trained, tmp_path):
    """`tuneforge export --merged` (admin.py) writes the same weights as the server's archive,
    whatever compute dtype it is set to (here bf16, the server fp32): a merge never computes
    with the 4-bit layers, it only reads the values they hold."""
    out = subprocess.run(
        [sys.executable, "-m", "tuneforge", "export", trained.tinker_path, "--to",
         str(tmp_path / "cli"), "--merged", "--data-dir", str(server.data_dir), "--models-dir",
         str(server.models_dir)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TUNEFORGE_DTYPE": "bf16"})
    assert out.returncode == 0, out.stderr
    cli = load_file(str(Path(out.stdout.strip()) / "model.safetensors"))
    served = load_file(str(archive(server, trained, tmp_path / "archive", merged=True)
                           / "model.safetensors"))
    assert cli.keys() == served.keys()
    assert all(torch.equal(cli[k], served[k]) for k in cli)
    assert "quantization_config" not in json.loads((tmp_path / "cli" / "config.json").read_text())
