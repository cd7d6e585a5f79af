"""RunMetrics: step accounting, buffered vs written rows, live subscriptions; the tar stream."""

from __future__ import annotations

import asyncio
import io
import math
import tarfile

import numpy as np

from tuneforge.engine.optim import AdamParams
from tuneforge.engine.types import Datum, ForwardBackwardInput, ForwardBackwardResult
from tuneforge.server.routes.run_metrics import tar_gz
from tuneforge.server.run_metrics import RunMetrics
from tuneforge.storage.db import Database


def _fb(recorder: RunMetrics, run: str, loss: float, lengths: list[int],
        weights: list[float] | None = None) -> None:
    data = []
    for i, n in enumerate(lengths):
        inputs = {"target_tokens": np.zeros(n, np.int64)}
        if weights is not None:
            inputs["weights"] = np.full(n, weights[i], np.float32)
        data.append(Datum(tokens=np.zeros(n, np.int64), inputs=inputs))
    encode = recorder.recording_encoder(run, ForwardBackwardInput(data, "cross_entropy"),
                                        lambda result: b"payload")
    assert encode(ForwardBackwardResult(outputs=[], metrics={"loss:sum": loss})) == b"payload"


def _recorder(tmp_path) -> RunMetrics:
    recorder = RunMetrics(Database(f"sqlite:///{tmp_path / 'db.sqlite'}"), flush_seconds=3600)
    recorder.start()
    return recorder


def test_a_step_sums_its_forward_backwards(tmp_path):
    rm = _recorder(tmp_path)
    _fb(rm, "r", 1.5, [3, 2], weights=[0.5, 1.0])  # weight 1.5 + 2
    _fb(rm, "r", 2.25, [4])  # no weights: every target token weighs 1
    rm.optim_step("r", AdamParams(learning_rate=0.01, grad_clip_norm=1.0),
                  {"grad_norm:mean": 0.7, "learning_rate:mean": 0.01})
    (row,) = rm.rows("r")
    assert row["step"] == 1 and row["loss_sum"] == 3.75 and row["tokens"] == 9
    assert row["weight_sum"] == 7.5 and row["loss"] == 0.5
    assert row["lr"] == 0.01 and row["grad_clip_norm"] == 1.0 and row["grad_norm"] == 0.7
    assert "learning_rate" not in row
    rm.optim_step("r", AdamParams(), {})  # a step with no forward_backward before it
    second = rm.rows("r")[1]
    assert (second["step"], second["tokens"], second["loss_sum"], second["loss"]) == (2, 0, 0.0,
                                                                                      None)
    rm.stop()


def test_rows_are_the_same_before_and_after_writing_and_ids_continue(tmp_path):
    rm = _recorder(tmp_path)
    for i in range(3):
        _fb(rm, "a", float(i), [2])
        rm.optim_step("a", AdamParams(), {"grad_norm:mean": math.nan})
    _fb(rm, "b", 1.0, [2])
    rm.optim_step("b", AdamParams(), {})
    buffered = rm.rows("a")
    assert [r["id"] for r in buffered] == [1, 2, 3] and buffered[0]["grad_norm"] is None
    assert rm.flush() == 4 and rm.flush() == 0
    assert rm.rows("a") == buffered and rm.rows("a", after=1) == buffered[1:]
    assert rm.rows("a", limit=2) == buffered[:2]
    assert rm.latest(["a", "b", "c"])["a"]["step"] == 3
    rm.stop()
    again = RunMetrics(rm.db, flush_seconds=3600)
    again.start()
    assert again.rows("a") == buffered
    assert again.latest(["a"])["a"] == buffered[-1]
    _fb(again, "a2", 1.0, [2])
    again.optim_step("a2", AdamParams(), {})
    assert again.rows("a2")[0]["id"] == 5
    again.stop()


def test_subscribers_get_new_rows_of_their_run_only(tmp_path):
    rm = _recorder(tmp_path)

    async def scenario() -> None:
        sub = rm.subscribe("a", asyncio.get_running_loop())
        assert await sub.next_rows(0.01) == []
        rm.optim_step("b", AdamParams(), {})
        rm.optim_step("a", AdamParams(learning_rate=0.5), {})
        rows = await sub.next_rows(5)
        assert [(r["run_id"], r["lr"]) for r in rows] == [("a", 0.5)]
        rm.end_streams()
        assert await sub.next_rows(5) is None
        rm.unsubscribe(sub)
        assert rm.subscriber_count() == 0

    asyncio.run(scenario())
    rm.stop()


def test_tar_gz_streams_a_readable_archive(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(0).bytes(3000))
    small = tmp_path / "small.json"
    small.write_text("{}")
    content = b"".join(tar_gz([(big, "x/big.bin"), (small, "x/small.json")], chunk=1000))
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:gz") as tar:
        assert tar.getnames() == ["x/big.bin", "x/small.json"]
        assert tar.extractfile("x/big.bin").read() == big.read_bytes()
        assert tar.extractfile("x/small.json").read() == b"{}"
