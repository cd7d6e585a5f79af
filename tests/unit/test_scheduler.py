"""Per-model seq_id ordering, idempotent resubmission, and failure isolation."""

from __future__ import annotations

import threading
import time

from tuneforge.errors import UserError
from tuneforge.scheduler.futures import FutureStore
from tuneforge.scheduler.queue import Scheduler


def wait_all(futures, timeout=10.0):
    deadline = time.monotonic() + timeout
    while any(f.state == "pending" for f in futures):
        assert time.monotonic() < deadline, "futures did not finish"
        time.sleep(0.01)


def test_requests_run_in_seq_order_and_repeats_get_the_same_future():
    store = FutureStore()
    sched = Scheduler(store)
    order: list[int] = []
    lock = threading.Lock()

    def job(n):
        def run():
            with lock:
                order.append(n)
            return {"n": n}
        return run

    sched.open_model("m")
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


def test_a_failing_job_fails_only_its_future():
    store = FutureStore()
    sched = Scheduler(store)
    sched.open_model("m")
    sched.start()
    try:
        def bad():
            raise UserError("data[0]: wrong")

        def crash():
            raise RuntimeError("boom")

        f1 = sched.submit_ordered("m", 1, "X", "o", bad)
        f2 = sched.submit_ordered("m", 2, "X", "o", crash)
        f3 = sched.submit_ordered("m", 3, "X", "o", lambda: {"ok": True})
        f4 = sched.submit_ordered("nobody", 1, "X", "o", lambda: {"ok": True})
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
