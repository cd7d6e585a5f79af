"""Base models named by a local directory or by a Hugging Face id found in the local cache."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import numpy as np
import pytest
import tinker
from tinker import types

from tests.integration.server import ServerProcess

HUB_ID = "acme/tiny-chat"


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory, models_dir, server) -> Iterator[ServerProcess]:
    """A server whose Hugging Face cache holds a copy of the tiny model under `acme/tiny-chat`
    (the layout `huggingface_hub` reads offline: models--ORG--NAME/snapshots/REV + refs/main)."""
    hf_home = tmp_path_factory.mktemp("hf-home")
    repo, revision = hf_home / "hub" / "models--acme--tiny-chat", "0" * 40
    shutil.copytree(models_dir / "tuneforge--tiny-qwen3", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    proc = ServerProcess(tmp_path_factory.mktemp("hub-server"), models_dir, preload=(),
                         env={"HF_HOME": str(hf_home)}).start()
    yield proc
    proc.stop()


def train_a_little(sc: tinker.ServiceClient, base_model: str) -> tuple[list[float], str]:
    tc = sc.create_lora_training_client(base_model=base_model, rank=4, seed=0).result()
    tok = tc.get_tokenizer()
    ids = tok.encode("A local model is trained like any other.")
    d = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                    loss_fn_inputs={"target_tokens": np.array(ids[1:])})
    losses = []
    for _ in range(3):
        losses.append(tc.forward_backward([d], "cross_entropy").result().metrics["loss:sum"])
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return losses, tc.get_info().model_data.model_name


def test_local_directory_as_base_model(service_client, models_dir):
    folder = str(models_dir / "tuneforge--tiny-qwen3")
    losses, name = train_a_little(service_client, folder)
    assert name == folder
    assert losses[-1] < losses[0]


def test_hugging_face_id_from_the_local_cache(hub_server):
    sc = tinker.ServiceClient(base_url=hub_server.base_url, api_key=hub_server.api_key)
    losses, name = train_a_little(sc, HUB_ID)
    assert name == HUB_ID and losses[-1] < losses[0]
    with pytest.raises(tinker.RequestFailedError) as info:
        sc.create_lora_training_client(base_model="acme/not-in-the-cache", rank=4).result()
    assert "acme/not-in-the-cache" in str(info.value) and "tuneforge/tiny-qwen3" in str(info.value)
