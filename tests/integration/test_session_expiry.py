"""A client that dies without finishing its session: after TUNEFORGE_SESSION_TIMEOUT_SECONDS
without heartbeats the server finishes the session and frees its models; a live client (the SDK
heartbeats every 10 s) keeps its own, and a dead client's run comes back from its checkpoint."""

from __future__ import annotations

import subprocess
import sys
import time

import tinker
from tinker import types

from tests.integration.server import ServerProcess

MODEL = "tuneforge/tiny-qwen3"
DATUM = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
                    loss_fn_inputs={"target_tokens": [2, 3, 4, 5]})
DIES = """
import os, sys, tinker
from tinker import types
sc = tinker.ServiceClient(base_url=sys.argv[1], api_key=sys.argv[2])
tc = sc.create_lora_training_client(base_model="tuneforge/tiny-qwen3", rank=4).result()
datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
                    loss_fn_inputs={"target_tokens": [2, 3, 4, 5]})
tc.forward_backward([datum], "cross_entropy").result()
print(tc.save_state("before-dying").result().path, flush=True)
os._exit(0)  # no close, no more heartbeats
"""


def loaded_models(server: ServerProcess) -> float:
    return sum(v for k, v in server.metrics().items() if k.startswith("tuneforge_training_models{"))


def test_dead_clients_sessions_expire_live_ones_stay(tmp_path, models_dir):
    server = ServerProcess(tmp_path / "data", models_dir,
                           env={"TUNEFORGE_SESSION_TIMEOUT_SECONDS": "15"}).start()
    try:
        sc = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
        live = sc.create_lora_training_client(base_model=MODEL, rank=4).result()
        live.forward_backward([DATUM], "cross_entropy").result()
        died = subprocess.run([sys.executable, "-c", DIES, server.base_url, server.api_key],
                              capture_output=True, text=True, timeout=300)
        assert died.returncode == 0, died.stderr
        state_path = died.stdout.strip().splitlines()[-1]
        assert loaded_models(server) == 2
        deadline = time.monotonic() + 60
        while loaded_models(server) > 1 and time.monotonic() < deadline:
            time.sleep(1)
        waited = 60 - (deadline - time.monotonic())
        print(f"\nthe dead client's model was freed after {waited:.0f} s")
        assert loaded_models(server) == 1
        assert "sent no heartbeat" in server.log()
        # the live client, idle all that time apart from its heartbeats, still trains
        live.forward_backward([DATUM], "cross_entropy").result()
        live.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        # and the dead client's run continues from its checkpoint
        back = sc.create_training_client_from_state(state_path).result()
        assert back.forward([DATUM], "cross_entropy").result().metrics["loss:sum"] > 0
    finally:
        server.stop()
