"""API keys from the command line; one key never sees another's runs; admin sees all."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.integration.server import ServerProcess

MODEL = "tuneforge/tiny-qwen3"


@pytest.fixture(scope="module")
def server2(tmp_path_factory, models_dir) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("isolation"), models_dir,
                         env={"TUNEFORGE_MAX_MODELS_PER_KEY": "2"}).start()
    yield proc
    proc.stop()


def cli(server, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tuneforge", *args, "--data-dir",
                          str(server.data_dir)], capture_output=True, text=True, timeout=120,
                         env=os.environ)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def new_key(server, name: str) -> tuple[str, str]:
    kid, key = cli(server, "keys", "create", "--name", name).split()
    return kid, key


@pytest.fixture(scope="module")
def alice(server2):
    kid, key = new_key(server2, "alice")
    sc = tinker.ServiceClient(base_url=server2.base_url, api_key=key)
    tc = sc.create_lora_training_client(base_model=MODEL, rank=2, seed=0).result()
    ids = [5, 6, 7, 8, 9, 10]
    tc.forward_backward([types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                     loss_fn_inputs={"target_tokens": np.array(ids[1:])})],
                        "cross_entropy").result()
    state = tc.save_state("alice-state").result().path
    sampler = tc.save_weights_for_sampler("alice-sampler").result().path
    return {"kid": kid, "key": key, "sc": sc, "tc": tc, "state": state, "sampler": sampler}


def test_keys_are_listed_by_id_and_stored_hashed(server2, alice):
    listing = cli(server2, "keys", "list")
    assert alice["kid"] in listing and "alice" in listing and "admin" in listing
    assert alice["key"] not in listing
    import sqlite3

    dump = "\n".join(sqlite3.connect(server2.data_dir / "tuneforge.db").iterdump())
    assert alice["key"] not in dump and alice["kid"] in dump


def test_another_key_can_neither_list_get_load_sample_nor_delete(server2, alice):
    _, bob_key = new_key(server2, "bob")
    bob = tinker.ServiceClient(base_url=server2.base_url, api_key=bob_key)
    rest = tinker.RestClient(base_url=server2.base_url, api_key=bob_key)
    run_id = alice["tc"].model_id

    assert run_id not in [r.training_run_id for r in rest.list_training_runs().result()
                          .training_runs]
    assert rest.list_user_checkpoints().result().checkpoints == []
    with pytest.raises(tinker.NotFoundError):
        rest.get_training_run(run_id).result()
    with pytest.raises(tinker.NotFoundError):
        rest.list_checkpoints(run_id).result()
    with pytest.raises(tinker.NotFoundError):
        bob.create_training_client_from_state(alice["state"]).result()
    with pytest.raises(tinker.NotFoundError):
        bob.create_sampling_client(model_path=alice["sampler"]).result()
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(alice["state"]).result()
    # Bob cannot drive Alice's model either; the answer is the one for a model that does not exist
    headers = {"X-API-Key": bob_key}
    r = httpx.post(f"{server2.base_url}/api/v1/optim_step", headers=headers,
                   json={"model_id": run_id, "seq_id": 3, "adam_params": {}})
    failed = httpx.post(f"{server2.base_url}/api/v1/retrieve_future", headers=headers,
                        json={"request_id": r.json()["request_id"]}).json()
    assert "not a training model" in failed["error"]
    # ... and nothing of Alice's was touched
    alice_rest = tinker.RestClient(base_url=server2.base_url, api_key=alice["key"])
    assert len(alice_rest.list_checkpoints(run_id).result().checkpoints) == 2


def test_admin_key_sees_every_run(server2, alice):
    admin = tinker.RestClient(base_url=server2.base_url, api_key=server2.api_key)
    runs = admin.list_training_runs(limit=100).result().training_runs
    assert alice["tc"].model_id in [r.training_run_id for r in runs]
    assert admin.get_training_run(alice["tc"].model_id).result().model_owner == alice["kid"]


def test_revoked_key_is_refused_at_once(server2):
    kid, key = new_key(server2, "carol")
    url = f"{server2.base_url}/api/v1/sessions"
    assert httpx.get(url, headers={"X-API-Key": key}).status_code == 200
    cli(server2, "keys", "revoke", kid)
    r = httpx.get(url, headers={"X-API-Key": key})
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_cap_on_loaded_models_per_key(server2):
    _, key = new_key(server2, "dave")
    sc = tinker.ServiceClient(base_url=server2.base_url, api_key=key)
    for _ in range(2):
        sc.create_lora_training_client(base_model=MODEL, rank=2).result()
    with pytest.raises(tinker.RequestFailedError, match="max_models_per_key=2"):
        sc.create_lora_training_client(base_model=MODEL, rank=2).result()
    sc.close("success").result()  # finishing the session frees its models
    again = tinker.ServiceClient(base_url=server2.base_url, api_key=key)
    again.create_lora_training_client(base_model=MODEL, rank=2).result()
