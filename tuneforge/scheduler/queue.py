"""The scheduler: orders each model's requests, batches across models, and drives the engine.

Ordering and idempotency (the SDK relies on both): a training client numbers its requests
1, 2, 3, … per model and may send chunks of one call concurrently or re-send after a network
error. A request is held until its predecessor arrived, then queued; a repeated
`(model_id, seq_id)` gets the original future back.

Queues. Work is queued per base model ("lane"). One engine thread serves everything, in a loop:
1. admit waiting sampling requests into their base model's running decode batch, oldest first,
   while there is room (a request never overtakes an older one that does not fit yet);
2. run one training unit from the next lane in round-robin order: the lane's oldest request,
   and, if it is a forward / forward_backward, the oldest forward / forward_backward of every
   other model in that lane whose turn it is, up to a token budget, all in shared passes;
3. run one decoding step for every base model with rows running.

Fairness, therefore: base models take turns; within one, requests go in arrival order; a model
contributes at most one request to a pass, so a tenant that sends huge requests delays the others
by at most one pass, and every sampling request advances by one token per loop turn however much
training is queued. An `optim_step` waits only for its own model's earlier requests.

A streaming sampling request (its future carries a `TokenStream`) gets its tokens from the
decoder at every step; one whose reader went away before admission is failed without decoding.

A request that fails fails only its own future: a `TuneforgeError` with its own message and
category, anything else as a server error with the traceback logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tuneforge.engine.sampler import SampleRequest, SampleResult
from tuneforge.engine.types import ForwardBackwardInput, ForwardBackwardResult
from tuneforge.engine.worker import EngineWorker, WorkerStats
from tuneforge.errors import TuneforgeError, UserError
from tuneforge.scheduler.futures import Future, FutureStore
from tuneforge.scheduler.stats import Stats

logger = logging.getLogger(__name__)

_DEDUPE_HISTORY = 4096
_CREDIT = 3
STATS_SECONDS = 0.05


@dataclass
class Work:
    """What a queued request does. Exactly one of `run`, `fb`, `sample` is set; `run` and
    `sample` are called on the engine thread with the engine worker that serves the request."""

    lane: str = ""  # the base model it runs on ("" = none)
    model_id: str | None = None
    sampler_id: str | None = None  # sampling: the sampler (or family of them) placed together
    run: Callable[[EngineWorker], dict | bytes] | None = None
    fb: ForwardBackwardInput | None = None
    encode_fb: Callable[[ForwardBackwardResult], bytes] | None = None
    # validate and load the weights → (sampler id, request)
    sample: Callable[[EngineWorker], tuple[str, SampleRequest]] | None = None
    encode_sample: Callable[[SampleResult], bytes] | None = None

    @property
    def cost(self) -> int:
        return sum(len(d.tokens) for d in self.fb.data) if self.fb is not None else 0


@dataclass
class _Sequencer:
    next_seq: int = 1
    waiting: dict[int, tuple[Future, Work]] = field(default_factory=dict)
    seen: OrderedDict[int, Future] = field(default_factory=OrderedDict)


class Scheduler:
    """Drives one engine worker from one thread (see the module docstring).

    `worker_stats` holds the worker's `stats()` for readers on other threads, read before each
    answer and every few decoding steps."""

    def __init__(self, futures: FutureStore, engine: EngineWorker, batch_tokens: int = 16384,
                 batch_wait: float = 0.06, batch_requests: int = 32,
                 on_thread_start: Callable[[], None] | None = None,
                 name: str = "engine") -> None:
        self.futures = futures
        self.engine = engine
        self.name = name
        self.worker_stats = WorkerStats()
        self._stats_read = 0.0
        self.batch_tokens = batch_tokens
        self.batch_wait = batch_wait
        self.batch_requests = batch_requests
        self._recent: dict[str, dict[str, float]] = {}  # lane -> model -> last forward time
        self._held: dict[str, float] = {}  # request id -> when it first waited for batch mates
        self._credit: dict[str, int] = {}  # lane -> how many more fruitless waits it allows
        self._credit_skips: dict[str, int] = {}
        self.stats = Stats()
        self._lanes: dict[str, deque[tuple[Future, Work]]] = {}
        self._samples: deque[tuple[Future, Work]] = deque()
        self._decoding: dict[str, tuple[Future, Work]] = {}
        self._sequencers: dict[str, _Sequencer] = {}
        self._cond = threading.Condition()
        self._round = 0
        self._stopping = False
        self._on_thread_start = on_thread_start
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"tuneforge-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def depth(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._lanes.values()) + len(self._samples)

    def depths(self) -> dict[str, int]:
        with self._cond:
            out = {lane: len(q) for lane, q in self._lanes.items()}
        out["(sampling admission)"] = len(self._samples)
        return out

    # ---- submission ---------------------------------------------------------------------------

    def submit(self, fut: Future, work: Work) -> Future:
        with self._cond:
            if work.sample is not None:
                self._samples.append((fut, work))
            else:
                self._lanes.setdefault(work.lane, deque()).append((fut, work))
            self._cond.notify()
        return fut

    def open_model(self, model_id: str, next_seq: int = 1) -> None:
        """Start ordering `model_id`'s requests; its first expected `seq_id` is `next_seq`."""
        with self._cond:
            self._sequencers.setdefault(model_id, _Sequencer(next_seq=next_seq))

    def close_model(self, model_id: str) -> None:
        with self._cond:
            self._sequencers.pop(model_id, None)

    def fail_queued(self, model_ids: set[str], messages: dict[str, str]) -> None:
        """Fail the queued requests of `model_ids` (their worker lost them) with their
        model's message."""
        with self._cond:
            failed = []
            for queue in self._lanes.values():
                keep = [item for item in queue if item[1].model_id not in model_ids]
                failed += [item for item in queue if item[1].model_id in model_ids]
                queue.clear()
                queue.extend(keep)
        for fut, work in failed:
            self.futures.fail(fut, messages.get(work.model_id, "worker lost"), "server")

    def submit_ordered(self, model_id: str, seq_id: int, request_type: str, owner: str,
                       work: Work) -> Future:
        """Queue `work` as request `seq_id` of `model_id`, or return the future of a repeat."""
        with self._cond:
            seqr = self._sequencers.get(model_id)
            if seqr is not None and seq_id in seqr.seen:
                return seqr.seen[seq_id]
            fut = self.futures.create(request_type, owner, model_id)
            if seqr is None:
                self.futures.fail(fut, f"model_id {model_id!r} is not a training model on this "
                                       "server", "user")
                return fut
            if seq_id < seqr.next_seq:
                self.futures.fail(fut, f"seq_id {seq_id} of {model_id} was already executed "
                                       f"(next expected: {seqr.next_seq})", "user")
                return fut
            seqr.seen[seq_id] = fut
            while len(seqr.seen) > _DEDUPE_HISTORY:
                seqr.seen.popitem(last=False)
            seqr.waiting[seq_id] = (fut, work)
            if work.fb is not None:
                self._recent.setdefault(work.lane, {})[model_id] = time.monotonic()
            while seqr.next_seq in seqr.waiting:
                ready_fut, ready_work = seqr.waiting.pop(seqr.next_seq)
                self._lanes.setdefault(ready_work.lane, deque()).append((ready_fut, ready_work))
                seqr.next_seq += 1
            self._cond.notify()
        return fut

    # ---- the engine thread --------------------------------------------------------------------

    def _loop(self) -> None:
        if self._on_thread_start is not None:
            self._on_thread_start()
        decoding = False
        while True:
            with self._cond:
                while not (self._stopping or self._samples or decoding
                           or any(self._lanes.values())):
                    self._cond.wait()
                if self._stopping:
                    return
                unit = self._take_unit()
            self._admit_samples()
            if unit:
                self._run_unit(unit)
            decoding = self.engine.decoding()
            if decoding:
                self._decode_step()
                decoding = self.engine.decoding()
            self._read_stats()

    def _read_stats(self, now: bool = False) -> None:
        """Refresh `worker_stats`: `now` before answering a request, else at most every
        `STATS_SECONDS`."""
        clock = time.monotonic()
        if not now and clock - self._stats_read < STATS_SECONDS:
            return
        self._stats_read = clock
        self.worker_stats = self.engine.stats()

    def _take_unit(self) -> list[tuple[Future, Work]]:
        """The next lane's oldest request, with its batch mates. Caller holds the lock."""
        lanes = [lane for lane, q in self._lanes.items() if q]
        if not lanes:
            return []
        self._round += 1
        lane = lanes[self._round % len(lanes)]
        queue = self._lanes[lane]
        head = queue.popleft()
        if head[1].fb is None:
            return [head]
        unit = self._gather(queue, head)
        peers = self._active_peers(lane, head[1].model_id)
        first_seen = self._held.setdefault(head[0].request_id, time.monotonic())
        waited = False
        while len(unit) <= len(peers) and self._credit.get(lane, _CREDIT) > 0:
            # Other models of this base model were training a moment ago: their next requests
            # are probably on their way, and one shared pass serves them all far cheaper. Run
            # other queued work meanwhile (a peer's optimizer step, which its next forward
            # waits behind), or wait a little; never longer than `batch_wait` in all.
            left = first_seen + self.batch_wait - time.monotonic()
            if left <= 0:
                break
            queue.extendleft(reversed(unit))
            other = self._first_runnable(queue, exclude=head[1].model_id)
            if other is not None:
                queue.remove(other)
                return [other]
            queue.popleft()  # the head again
            waited = True
            self._cond.wait(left)
            unit = self._gather(queue, head)
        self._held.pop(head[0].request_id, None)
        self._settle_credit(lane, waited, gained=len(unit) > 1)
        return unit

    def _settle_credit(self, lane: str, waited: bool, gained: bool) -> None:
        """Keep waiting for batch mates only while waiting pays: tenants that take turns rather
        than train at once would only be delayed by it. After fruitless waits the lane stops
        waiting, and tries again now and then."""
        credit = self._credit.get(lane, _CREDIT)
        if waited:
            credit = min(credit + 1, _CREDIT) if gained else credit - 1
        elif credit <= 0:
            self._credit_skips[lane] = self._credit_skips.get(lane, 0) + 1
            if self._credit_skips[lane] % 16 == 0:
                credit = 1  # probe whether tenants train at once again
        self._credit[lane] = credit

    @staticmethod
    def _first_runnable(queue: deque, exclude: str | None) -> tuple[Future, Work] | None:
        """The oldest non-forward request of another model that nothing of its model precedes."""
        seen: set[str | None] = {exclude}
        for item in queue:
            model = item[1].model_id
            if item[1].fb is None and model not in seen:
                return item
            seen.add(model)
        return None

    def _active_peers(self, lane: str, model_id: str) -> set[str]:
        now, recent = time.monotonic(), self._recent.get(lane, {})
        for m in [m for m, t in recent.items() if now - t > 2.0]:
            del recent[m]
        return set(recent) - {model_id}

    def _gather(self, queue: deque, head: tuple[Future, Work]) -> list[tuple[Future, Work]]:
        """`head` and the oldest forward/forward_backward of each other model whose turn it is,
        within the token budget (taken out of `queue`)."""
        unit, cost, taken, blocked, skipped = [head], head[1].cost, {head[1].model_id}, set(), []
        while queue:
            fut, work = queue.popleft()
            fits = cost + work.cost <= self.batch_tokens and len(unit) < self.batch_requests
            if work.fb is not None and fits and work.model_id not in taken | blocked:
                unit.append((fut, work))
                taken.add(work.model_id)
                cost += work.cost
            else:
                if work.model_id is not None:
                    blocked.add(work.model_id)  # its later requests must wait behind it
                skipped.append((fut, work))
        queue.extend(skipped)
        return unit

    def _admit_samples(self) -> None:
        while True:
            with self._cond:
                if not self._samples:
                    return
                fut, work = self._samples[0]
            if fut.stream is not None and fut.stream.cancelled:  # its reader left while queued
                self._finish(fut, error=UserError("the streaming request was cancelled by its "
                                                  "client before decoding began"))
                with self._cond:
                    self._samples.popleft()
                continue
            try:
                sampler_id, request = work.sample(self.engine)
                if not self.engine.has_room(sampler_id, request):
                    return  # it waits for rows to free up; younger requests wait behind it
                self.engine.admit(fut.request_id, sampler_id, request)
            except Exception as e:
                self._finish(fut, error=e)
            else:
                self._decoding[fut.request_id] = (fut, work)
                self.stats.sample_requests += 1
            with self._cond:
                self._samples.popleft()

    def _run_unit(self, unit: list[tuple[Future, Work]]) -> None:
        started = time.monotonic()
        try:
            self._run_unit_inner(unit, started)
        finally:
            self.stats.busy_seconds += time.monotonic() - started

    def _run_unit_inner(self, unit: list[tuple[Future, Work]], started: float) -> None:
        if unit[0][1].fb is None:
            fut, work = unit[0]
            try:
                result = work.run(self.engine)
            except Exception as e:
                self._read_stats(now=True)
                self._finish(fut, error=e)
            else:
                self._read_stats(now=True)  # what a client sees next is no older than this
                self._finish(fut, result=result)
            return
        requests = [(work.model_id, work.fb) for _, work in unit]
        try:
            outcomes = self.engine.forward_backward_batch(requests)
        except Exception as e:  # the engine already retried each request alone
            outcomes = [e] * len(unit)
        self._read_stats(now=True)
        for (fut, work), outcome in zip(unit, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self._finish(fut, error=outcome)
            else:
                self._finish(fut, result=work.encode_fb(outcome))
        self.stats.record_pass(len(unit), sum(work.cost for _, work in unit),
                               time.monotonic() - started)

    def _decode_step(self) -> None:
        started = time.monotonic()
        try:
            finished = self.engine.decode_step()
        except Exception as e:  # every request in the batch shares the failed step
            logger.exception("decoding step failed")
            try:
                self.engine.reset_decoding()
            except Exception:
                logger.exception("engine worker %s: resetting decoding failed", self.name)
            for fut, _ in self._decoding.values():
                self._finish(fut, error=e)
            self._decoding.clear()
            return
        self.stats.decode_steps += 1
        self.stats.busy_seconds += time.monotonic() - started
        if finished:
            self._read_stats(now=True)
        for handle, result in finished:
            fut, work = self._decoding.pop(handle)
            self.stats.sampled_tokens += sum(len(s.tokens) for s in result.sequences)
            try:
                payload = work.encode_sample(result)
            except Exception as e:
                self._finish(fut, error=e)
            else:
                self._finish(fut, result=payload)

    def _finish(self, fut: Future, result: dict | bytes | None = None,
                error: Exception | None = None) -> None:
        if error is None:
            self.futures.resolve(fut, result)
        elif isinstance(error, TuneforgeError):
            self.futures.fail(fut, error.message, error.category)
        else:  # a bug or a resource failure: fail this request, keep serving
            logger.error("request %s (%s) failed", fut.request_id, fut.request_type,
                         exc_info=error)
            self.futures.fail(fut, f"internal error: {type(error).__name__}: {error}", "server")
