"""Per-model seq_id ordering, idempotent resubmission, cross-model batching and failure isolation.

The scheduler is driven with a recording stand-in for the engine (the real engine's batching is
tested in test_batching.py and, end to end, in the integration tests)."""

from __future__ import annotations

import threading
import time

import numpy as np

from tuneforge.engine.types import Datum, ForwardBackwardInput, ForwardBackwardResult
from tuneforge.engine.worker import WorkerStats
from tuneforge.errors import UserError
from tuneforge.scheduler.futures import FutureStore
from tuneforge.scheduler.queue import Scheduler, Work


class RecordingEngine:
    """Records what the scheduler asks for; forward_backward answers the model id."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def decoding(self) -> bool:
        return False

    def stats(self) -> WorkerStats:
        return WorkerStats()

    def forward_backward_batch(self, requests):
        self.gate.wait(10)
        self.calls.append([m for m, _ in requests])
        return [UserError("bad") if m == "bad" else
                ForwardBackwardResult(outputs=[], metrics={"loss:sum": float(ord(m[0]))})
                for m, _ in requests]


def fb(tokens: int = 4) -> ForwardBackwardInput:
    datum = Datum(tokens=np.zeros(tokens, np.int64), inputs={})
    return ForwardBackwardInput(data=[datum], loss_fn="cross_entropy")


def wait_all(futures, timeout=10.0):
    deadline = time.monotonic() + timeout
    while any(f.state == "pending" for f in futures):
        assert time.monotonic() < deadline, "futures did not finish"
        time.sleep(0.01)


def scheduler(engine=None, batch_tokens=1000) -> Scheduler:
    sched = Scheduler(FutureStore(), engine or RecordingEngine(), batch_tokens=batch_tokens)
    for m in ("a", "b", "c", "bad", "m"):
        sched.open_model(m)
    return sched


def test_requests_run_in_seq_order_and_repeats_get_the_same_future():
    sched = scheduler()
    order: list[int] = []
    lock = threading.Lock()

    def job(n):
        def run(_engine):
            with lock:
                order.append(n)
            return {"n": n}
        return Work(run=run, model_id="m")

    sched.start()
    try:
        f3 = sched.submit_ordered("m", 3, "X", "o", job(3))
        f2 = sched.submit_ordered("m", 2, "X", "o", job(2))
        time.sleep(0.05)
        assert f3.state == "pending" and f2.state == "pending" and order == []  # waiting for 1
        f1 = sched.submit_ordered("m", 1, "X", "o", job(1))
        again = sched.submit_ordered("m", 2, "X", "o", job(99))
        assert again is f2
        wait_all([f1, f2, f3])
        assert order == [1, 2, 3]
        assert [f.result for f in (f1, f2, f3)] == [{"n": 1}, {"n": 2}, {"n": 3}]
        late = sched.submit_ordered("m", 1, "X", "o", job(100))
        assert late is f1  # a retry long after completion still gets the original answer
    finally:
        sched.stop()


def test_forward_backwards_of_different_models_share_a_pass_in_order():
    engine = RecordingEngine()
    engine.gate.clear()  # hold the engine until everything is queued
    sched = scheduler(engine, batch_tokens=10)
    encode = lambda result: str(result.metrics["loss:sum"]).encode()  # noqa: E731
    done: list[str] = []
    sched.start()
    try:
        first = sched.submit_ordered("c", 1, "FB", "o", Work(fb=fb(), encode_fb=encode,
                                                             model_id="c"))
        time.sleep(0.05)  # "c" is now in the engine, alone
        futs = [
            sched.submit_ordered("a", 1, "FB", "o", Work(fb=fb(), encode_fb=encode, model_id="a")),
            sched.submit_ordered("a", 2, "Opt", "o", Work(run=lambda _: done.append("a2") or {},
                                                           model_id="a")),
            sched.submit_ordered("a", 3, "FB", "o", Work(fb=fb(), encode_fb=encode, model_id="a")),
            sched.submit_ordered("b", 1, "FB", "o", Work(fb=fb(), encode_fb=encode, model_id="b")),
            sched.submit_ordered("bad", 1, "FB", "o", Work(fb=fb(), encode_fb=encode,
                                                           model_id="bad")),
            sched.submit_ordered("c", 2, "FB", "o", Work(fb=fb(6), encode_fb=encode,
                                                         model_id="c")),
        ]
        engine.gate.set()
        wait_all([first, *futs])
    finally:
        sched.stop()
    # a1 and b1 share a pass (4 + 4 tokens of a 10-token budget); a3 must wait behind a's
    # optimizer step, which runs alone next; 'bad' then joins a3 (8 tokens) but c2 (6) does
    # not fit and runs last; 'bad' fails alone
    assert engine.calls == [["c"], ["a", "b"], ["a", "bad"], ["c"]]
    # each future got its own model's result (a: 97, b: 98, c: 99)
    assert [f.result for f in (first, futs[0], futs[2], futs[3], futs[5])] == [
        b"99.0", b"97.0", b"97.0", b"98.0", b"99.0"]
    assert futs[4].state == "failed" and futs[4].error == "bad"
    assert futs[2].state == "done" and done == ["a2"]


def test_a_failing_job_fails_only_its_future():
    sched = scheduler()
    sched.start()
    try:
        def bad(_engine):
            raise UserError("data[0]: wrong")

        def crash(_engine):
            raise RuntimeError("boom")

        f1 = sched.submit_ordered("m", 1, "X", "o", Work(run=bad))
        f2 = sched.submit_ordered("m", 2, "X", "o", Work(run=crash))
        f3 = sched.submit_ordered("m", 3, "X", "o", Work(run=lambda _: {"ok": True}))
        f4 = sched.submit_ordered("nobody", 1, "X", "o", Work(run=lambda _: {"ok": True}))
        wait_all([f1, f2, f3, f4])
        assert (f1.state, f1.category, f1.error) == ("failed", "user", "data[0]: wrong")
        assert (f2.state, f2.category) == ("failed", "server") and "boom" in f2.error
        assert (f3.state, f3.result) == ("done", {"ok": True})
        assert f4.state == "failed" and "not a training model" in f4.error
    finally:
        sched.stop()


def test_request_ids_of_an_earlier_process_are_recognised():
    old, new = FutureStore(), FutureStore()
    fid = old.create("X", "o").request_id
    assert new.is_from_earlier_process(fid)
    assert not old.is_from_earlier_process(fid)
    assert not new.is_from_earlier_process("something-else")
