"""Checkpoints whose TTL has passed are deleted, files and record."""

from __future__ import annotations

import datetime as dt

import torch
from sqlalchemy import select

from tuneforge.server.app import _expire_checkpoints
from tuneforge.server.state import ServerState
from tuneforge.settings import Settings
from tuneforge.storage import checkpoints
from tuneforge.storage.db import CheckpointRow, SessionRow, TrainingRunRow, utcnow


def test_expired_checkpoints_are_deleted(tmp_path):
    state = ServerState(Settings(data_dir=tmp_path, preload_models=[]))
    state.db.add(SessionRow(id="s", owner="key-a"))
    state.db.add(TrainingRunRow(id="s:train:0", session_id="s", owner="key-a", base_model="m",
                                lora_rank=1, train_attn=True, train_mlp=False,
                                train_unembed=False))
    now = utcnow()
    for name, expires in (("old", now - dt.timedelta(seconds=5)),
                          ("young", now + dt.timedelta(hours=1)), ("forever", None)):
        A, B = {"x.q_proj": torch.ones(1, 2)}, {"x.q_proj": torch.ones(2, 1)}
        checkpoints.save(state.paths.checkpoint("s:train:0", "weights", name), A, B,
                         checkpoints.peft_adapter_config("m", 1, 32.0, list(A)), {})
        state.db.add(CheckpointRow(tinker_path=f"tinker://s:train:0/weights/{name}",
                                   training_run_id="s:train:0", owner="key-a", kind="weights",
                                   name=name, expires_at=expires))
    _expire_checkpoints(state)
    assert sorted(r.name for r in state.db.select(select(CheckpointRow))) == ["forever", "young"]
    assert not state.paths.checkpoint("s:train:0", "weights", "old").exists()
    assert state.paths.checkpoint("s:train:0", "weights", "young").exists()
    state.db.close()
