"""Checkpoints: exact resume, PEFT round trips, export and import, the SDK's own CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from tinker import types
from transformers import AutoModelForCausalLM

MODEL = "tuneforge/tiny-qwen3"
TEXT = "Checkpoints must resume exactly where they stopped."


def datum(ids: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": np.array(ids[1:], dtype=np.int64)})


def step(tc, data, lr=2e-2) -> float:
    fb = tc.forward_backward(data, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=lr, weight_decay=0.01)).result()
    return fb.result().metrics["loss:sum"]


def folder_of(server, tinker_path: str) -> Path:
    run, kind, name = tinker_path.removeprefix("tinker://").split("/")
    return server.data_dir / "checkpoints" / run / kind / name


def tuneforge_cli(server, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "tuneforge", *args, "--data-dir", str(server.data_dir),
         "--models-dir", str(server.models_dir)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def reference_logprobs(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


@pytest.fixture(scope="module")
def trained(service_client):
    """A client trained 3 steps, its training checkpoint, and its live logprobs."""
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=8, seed=0).result()
    ids = tc.get_tokenizer().encode(TEXT)
    for _ in range(3):
        step(tc, [datum(ids)])
    path = tc.save_state("three-steps").result().path
    live = tc.forward([datum(ids)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
    return tc, ids, path, live.to_numpy()


def test_resume_with_optimizer_continues_the_exact_trajectory(service_client, trained):
    tc, ids, path, _ = trained
    data = [datum(ids)]
    uninterrupted = [step(tc, data) for _ in range(3)]
    resumed = service_client.create_training_client_from_state_with_optimizer(path).result()
    continued = [step(resumed, data) for _ in range(3)]
    print("uninterrupted", uninterrupted, "resumed", continued)
    np.testing.assert_allclose(continued, uninterrupted, rtol=0, atol=1e-5)
    fresh_optimizer = service_client.create_training_client_from_state(path).result()
    without = [step(fresh_optimizer, data) for _ in range(3)]
    assert abs(without[1] - uninterrupted[1]) > 1e-3  # the optimizer state really mattered


def test_peft_loads_a_checkpoint_and_gives_the_same_logits(server, trained):
    _tc, ids, path, live = trained
    folder = folder_of(server, path)
    assert {p.name for p in folder.iterdir()} == {"adapter_model.safetensors",
                                                 "adapter_config.json", "optimizer.pt",
                                                 "tuneforge.json"}
    base = AutoModelForCausalLM.from_pretrained(str(server.models_dir / "tuneforge--tiny-qwen3"))
    model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    np.testing.assert_allclose(reference_logprobs(model, ids), live, rtol=0, atol=1e-5)


def test_export_adapter_and_merged_model(server, trained, tmp_path):
    _tc, ids, path, live = trained
    adapter_dir = Path(tuneforge_cli(server, "export", path, "--to", str(tmp_path / "adapter")))
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json",
                                                             "adapter_model.safetensors"]
    merged_dir = Path(tuneforge_cli(server, "export", path, "--to", str(tmp_path / "merged"),
                                    "--merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    assert not merged.config.tie_word_embeddings  # lm_head was adapted, so it got its own weight
    np.testing.assert_allclose(reference_logprobs(merged, ids), live, rtol=0, atol=1e-4)


def test_import_a_peft_adapter_trained_elsewhere(server, service_client, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(str(server.models_dir / "tuneforge--tiny-qwen3"))
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "elsewhere")
    ids = list(range(100, 120))
    expected = reference_logprobs(model.eval(), ids)

    path = tuneforge_cli(server, "import", str(tmp_path / "elsewhere"), "--base-model", MODEL,
                         "--name", "from-peft")
    assert path.startswith("tinker://import-") and path.endswith("/weights/from-peft")
    tc = service_client.create_training_client_from_state(path).result()
    got = tc.forward([datum(ids)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
    np.testing.assert_allclose(got.to_numpy(), expected, rtol=0, atol=1e-5)
    losses = [step(tc, [datum(ids)]) for _ in range(3)]
    assert losses[-1] < losses[0]


def test_import_refuses_what_it_cannot_train(server, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(str(server.models_dir / "tuneforge--tiny-qwen3"))
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)) \
        .save_pretrained(tmp_path / "dora")
    out = subprocess.run(
        [sys.executable, "-m", "tuneforge", "import", str(tmp_path / "dora"), "--base-model",
         MODEL, "--name", "x", "--data-dir", str(server.data_dir), "--models-dir",
         str(server.models_dir)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "use_dora" in out.stderr


def test_tinker_cli_lists_and_downloads(server, trained, tmp_path):
    tc, _ids, path, _live = trained
    env = {**os.environ, "TINKER_BASE_URL": server.base_url, "TINKER_API_KEY": server.api_key}
    tinker_cli = str(Path(sys.executable).parent / "tinker")  # the SDK's console script
    listed = subprocess.run([tinker_cli, "checkpoint", "list", "--run-id", tc.model_id],
                            capture_output=True, text=True, timeout=120, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "three-steps" in listed.stdout
    everything = subprocess.run([tinker_cli, "checkpoint", "list"], capture_output=True,
                                text=True, timeout=120, env=env)
    assert everything.returncode == 0 and "three-steps" in everything.stdout, everything.stderr
    info = subprocess.run([tinker_cli, "checkpoint", "info", path], capture_output=True, text=True,
                          timeout=120, env=env)
    assert info.returncode == 0 and "three-steps" in info.stdout, info.stderr
    got = subprocess.run([tinker_cli, "checkpoint", "download", path, "--output", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert got.returncode == 0, got.stdout + got.stderr
    [target] = list(tmp_path.iterdir())
    files = {p.name for p in target.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    original = (folder_of(server, path) / "adapter_model.safetensors").read_bytes()
    assert (target / "adapter_model.safetensors").read_bytes() == original
