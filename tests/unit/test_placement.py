"""Placement over several engine workers: spreading new models, following a model's samplers,
data-parallel groups, and forgetting what a lost worker held (stand-in engines; the Ray
workers themselves are tested end to end in tests/integration/test_ray.py)."""

from __future__ import annotations

import time

from tuneforge.engine.worker import WorkerStats
from tuneforge.scheduler.futures import FutureStore
from tuneforge.scheduler.placement import Dispatcher
from tuneforge.scheduler.queue import Scheduler, Work


class StubEngine:
    def __init__(self, bases=()) -> None:
        self.bases = set(bases)
        self.listeners = []
        self.alive = True
        self.ran: list[str] = []

    def add_lost_listener(self, listener) -> None:
        self.listeners.append(listener)

    def decoding(self) -> bool:
        return False

    def stats(self) -> WorkerStats:
        return WorkerStats(base_models=dict.fromkeys(self.bases, 1))


def dispatcher(n: int = 2, groups=()) -> tuple[Dispatcher, list[StubEngine]]:
    futures = FutureStore()
    engines = [StubEngine() for _ in range(n)]
    workers = [Scheduler(futures, e, name=f"w{i}") for i, e in enumerate(engines)]
    dp = {base: Scheduler(futures, StubEngine(), name=f"dp-{base}") for base in groups}
    return Dispatcher(futures, workers, dp), engines


def wait(fut, timeout=10.0):
    deadline = time.monotonic() + timeout
    while fut.state == "pending":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return fut


def test_new_models_spread_and_stay_where_they_were_placed():
    d, _ = dispatcher(2)
    for i in range(6):
        d.open_model(f"m{i}", "base")
    assert [d.worker_of(f"m{i}") for i in range(6)] == ["w0", "w1"] * 3
    d.close_model("m1")
    d.open_model("m6", "base")  # w1 has room again
    assert d.worker_of("m6") == "w1" and d.worker_of("m0") == "w0"


def test_a_worker_holding_the_base_is_preferred_and_a_lost_one_avoided():
    d, engines = dispatcher(2)
    engines[1].bases.add("big")
    for sched in d.workers:
        sched._read_stats(now=True)
    d.open_model("a", "small")  # w0 (nothing placed anywhere yet)
    d.open_model("b", "big")  # w1 holds it
    d.open_model("c", "big")
    assert [d.worker_of(m) for m in "abc"] == ["w0", "w1", "w1"]
    engines[0].alive = False
    d.open_model("e", "small")
    assert d.worker_of("e") == "w1"


def test_data_parallel_bases_go_to_their_group_and_samplers_follow_models():
    d, _ = dispatcher(2, groups=("dp-base",))
    d.open_model("m", "dp-base")
    assert d.worker_of("m") == "dp-dp-base"
    d.open_model("n", "plain")
    d.place_sampler("n:sample:0", "n")
    assert d._for_work(Work(sampler_id="n:sample:0", lane="plain")).name == d.worker_of("n")


def test_a_lost_worker_fails_its_models_requests_with_the_way_back():
    d, engines = dispatcher(2)
    d.start()
    try:
        d.open_model("kept", "base")
        d.open_model("gone", "base")
        lost_models = []
        d.on_models_lost = lost_models.extend
        assert d.worker_of("gone") == "w1"
        engines[1].listeners[0]("its process exited")
        assert lost_models == ["gone"] and d.worker_of("gone") is None
        fut = wait(d.submit_ordered("gone", 1, "X", "o", Work(run=lambda e: {})))
        assert fut.state == "failed" and fut.category == "server"
        assert "worker lost" in fut.error and "its process exited" in fut.error
        assert "create_training_client_from_state_with_optimizer" in fut.error
        assert d.lost_reason("gone") == fut.error
        ok = wait(d.submit_ordered("kept", 1, "X", "o", Work(run=lambda e: {"ok": 1})))
        assert ok.state == "done"
    finally:
        d.stop()


def test_stats_add_up_over_workers():
    parts = [WorkerStats(residency={"device": 1, "cpu": 0, "disk": 2}, samplers_resident=1,
                         memory_bytes=10, decode_rows={"b": 2}, base_models={"b": 5}),
             WorkerStats(residency={"device": 3, "cpu": 1, "disk": 0}, memory_bytes=5,
                         decode_rows={"b": 1, "c": 4}, base_models={"b": 5})]
    total = WorkerStats.total(parts)
    assert total.residency == {"device": 4, "cpu": 1, "disk": 2}
    assert (total.samplers_resident, total.memory_bytes) == (1, 15)
    assert total.decode_rows == {"b": 3, "c": 4} and total.base_models == {"b": 10}


def test_requests_queued_for_a_lost_worker_fail_at_once():
    d, engines = dispatcher(1)  # not started: requests stay queued
    d.open_model("m", "base")
    queued = d.submit_ordered("m", 1, "X", "o", Work(run=lambda e: {}, model_id="m"))
    assert queued.state == "pending"
    engines[0].listeners[0]("out of memory")
    assert queued.state == "failed" and "worker lost" in queued.error
