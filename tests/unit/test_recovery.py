"""Start-up recovery reconciles checkpoint folders with the database after a crash."""

from __future__ import annotations

import torch
from sqlalchemy import select

from tuneforge.storage import checkpoints, recovery
from tuneforge.storage.db import CheckpointRow, Database, SessionRow, TrainingRunRow
from tuneforge.storage.paths import DataPaths


def write(paths: DataPaths, run: str, name: str) -> None:
    A = {"model.layers.0.self_attn.q_proj": torch.ones(2, 4)}
    B = {"model.layers.0.self_attn.q_proj": torch.zeros(4, 2)}
    checkpoints.save(paths.checkpoint(run, "weights", name), A, B,
                     checkpoints.peft_adapter_config("m", 2, 32.0, list(A)),
                     {"user_metadata": {"note": name}})


def test_recover_removes_partials_records_orphans_and_drops_missing(tmp_path):
    paths = DataPaths(tmp_path)
    paths.ensure()
    db = Database(f"sqlite:///{tmp_path / 'meta.db'}")
    db.add(SessionRow(id="s", owner="key-a"))
    db.add(TrainingRunRow(id="s:train:0", session_id="s", owner="key-a", base_model="m",
                          lora_rank=2, train_attn=True, train_mlp=False, train_unembed=False))
    write(paths, "s:train:0", "complete-unrecorded")
    write(paths, "s:train:0", "recorded")
    db.add(CheckpointRow(tinker_path="tinker://s:train:0/weights/recorded",
                         training_run_id="s:train:0", owner="key-a", kind="weights",
                         name="recorded"))
    db.add(CheckpointRow(tinker_path="tinker://s:train:0/weights/gone",
                         training_run_id="s:train:0", owner="key-a", kind="weights", name="gone"))
    partial = paths.checkpoints / "s:train:0" / "weights" / ".tmp-half-1234"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"truncated")

    report = recovery.recover(db, paths)
    assert report == {"partial_removed": 1, "unrecorded_added": 1, "missing_dropped": 1}
    assert not partial.exists()
    rows = {r.name: r for r in db.select(select(CheckpointRow))}
    assert set(rows) == {"recorded", "complete-unrecorded"}
    assert rows["complete-unrecorded"].owner == "key-a"
    assert rows["complete-unrecorded"].user_metadata == {"note": "complete-unrecorded"}
    assert recovery.recover(db, paths) == {"partial_removed": 0, "unrecorded_added": 0,
                                           "missing_dropped": 0}
