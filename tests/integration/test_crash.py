"""SIGKILL in the middle of saving: after a restart only complete checkpoints are listed, the
last one loads and training continues, and futures that were in flight fail clearly."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import tinker
from tinker import types

from tests.integration.server import ServerProcess

MODEL = "tuneforge/tiny-qwen3-l"
FILES = {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "tuneforge.json"}
DATA = [types.Datum(model_input=types.ModelInput.from_ints(list(range(10, 40))),
                    loss_fn_inputs={"target_tokens": np.arange(11, 41)})]

SAVES = 40  # back-to-back saves per attempt, some of them cut by the kill

pytestmark = pytest.mark.slow


def partial_writes(server: ServerProcess) -> list:
    return list((server.data_dir / "checkpoints").rglob(".tmp-*"))


def complete_and_listed(server: ServerProcess, rest: tinker.RestClient, run_ids: list[str]):
    listed = [c for run in run_ids for c in rest.list_checkpoints(run).result().checkpoints]
    for c in listed:
        run, kind, name = c.tinker_path.removeprefix("tinker://").split("/")
        folder = server.data_dir / "checkpoints" / run / kind / name
        assert {p.name for p in folder.iterdir()} == FILES, c.tinker_path
    return listed


def test_sigkill_during_saves(tmp_path, models_dir):
    server = ServerProcess(tmp_path / "data", models_dir, preload=(MODEL,)).start()
    rng = random.Random(0)
    try:
        sc = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
        tc = sc.create_lora_training_client(base_model=MODEL, rank=64, seed=0).result()
        run_ids, saw_partial, in_flight = [tc.model_id], False, None
        for attempt in range(6):
            tc.forward_backward(DATA, "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
            # Keep the engine saving back to back, then pull the plug at a random moment.
            pending = [tc.save_state(f"a{attempt}-{i:02d}") for i in range(SAVES)]
            time.sleep(rng.uniform(0.8, 2.0))
            server.proc.kill()
            server.proc.wait()
            saw_partial = saw_partial or bool(partial_writes(server))
            server.start()
            assert partial_writes(server) == []  # cleaned up at start
            rest = tinker.RestClient(base_url=server.base_url, api_key=server.api_key)
            listed = complete_and_listed(server, rest, run_ids)
            assert listed, "no checkpoint completed before the kill"
            # the last save is in flight only if the kill came before it completed (on a fast
            # machine all of them may have)
            if f"a{attempt}-{SAVES - 1:02d}" not in {c.tinker_path.rsplit("/", 1)[1]
                                                     for c in listed}:
                in_flight = pending[-1]
            latest = max(listed, key=lambda c: c.time)
            sc = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
            tc = sc.create_training_client_from_state_with_optimizer(latest.tinker_path).result()
            run_ids.append(tc.model_id)
            if saw_partial and in_flight is not None and attempt >= 1:
                break
        assert saw_partial, "the kill never landed in the middle of a checkpoint write"
        assert in_flight is not None, "every save had completed before each kill"

        with pytest.raises(tinker.RequestFailedError, match="restarted"):
            in_flight.result(timeout=180)

        losses = []
        for _ in range(3):
            fb = tc.forward_backward(DATA, "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
            losses.append(fb.result().metrics["loss:sum"])
        assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    finally:
        server.stop()
