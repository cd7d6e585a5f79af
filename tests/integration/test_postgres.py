"""The same server on PostgreSQL: train, save, restart, list, resume."""

from __future__ import annotations

import numpy as np
import tinker
from tinker import types

from tests.integration.server import ServerProcess

DATA = [types.Datum(model_input=types.ModelInput.from_ints(list(range(20, 40))),
                    loss_fn_inputs={"target_tokens": np.arange(21, 41)})]


def test_train_save_restart_resume_on_postgres(tmp_path, models_dir, postgres_url):
    server = ServerProcess(tmp_path / "data", models_dir,
                           env={"TUNEFORGE_DATABASE_URL": postgres_url}).start()
    try:
        sc = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
        tc = sc.create_lora_training_client(base_model="tuneforge/tiny-qwen3", rank=4,
                                            user_metadata={"db": "postgres"}).result()
        for _ in range(2):
            tc.forward_backward(DATA, "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        path = tc.save_state("pg").result().path
        expected = tc.forward(DATA, "cross_entropy").result().metrics["loss:sum"]
        server.stop()
        assert not (tmp_path / "data" / "tuneforge.db").exists()  # metadata lives in Postgres

        server.start()
        rest = tinker.RestClient(base_url=server.base_url, api_key=server.api_key)
        run = rest.get_training_run(tc.model_id).result()
        assert run.user_metadata == {"db": "postgres"}
        assert [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints] \
            == [path]
        sc = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
        resumed = sc.create_training_client_from_state_with_optimizer(path).result()
        got = resumed.forward(DATA, "cross_entropy").result().metrics["loss:sum"]
        assert abs(got - expected) <= 1e-5
    finally:
        server.stop()
