"""Engine workers as Ray actors: `EngineActor` holds an `Engine`; `RayWorker` is its proxy.

`RayWorker` implements the engine seam (worker.py) by calling the actor, one call at a time
from the scheduler thread that drives it, so the actor runs requests in the scheduler's order.
What the seam passes is plain data and travels by pickle; the rest is relayed here:

- streaming: a streaming request's listener stays in the server. The actor collects each
  decoding step's tokens for it and returns them with the step; the proxy pushes them to the
  listener, and tells the actor which readers went away before the next step.
- observation: every reply carries the worker's stats, so reading them costs no round trip.
- faults: a call to a worker whose process died raises `WorkerLost`, and the proxy's loss
  listeners hear of it once (the dispatcher then forgets the worker's models). Ray restarts the
  actor, empty; every actor life has its own `incarnation`, so a death between calls is noticed
  by the next reply (or by the server's heartbeat, `ping`).

Ray is imported only here, and this module only with `--ray`.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import secrets
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Hashable
from dataclasses import replace
from pathlib import Path

import ray
import torch
import torch.distributed as dist
from ray.exceptions import GetTimeoutError, RayActorError

from tuneforge.engine.engine import Engine
from tuneforge.engine.models import ModelRegistry
from tuneforge.engine.sampler import SampleRequest, SampleResult, TokenDelta
from tuneforge.engine.worker import WorkerStats
from tuneforge.errors import EngineError, WorkerLost
from tuneforge.settings import Settings
from tuneforge.storage.paths import DataPaths

logger = logging.getLogger(__name__)

PING_TIMEOUT_S = 10.0
_WAY_BACK = ("what it held in memory is gone: continue a training run from its last checkpoint "
             "with create_training_client_from_state_with_optimizer")


class _Relay:
    """A streaming request's listener inside the actor: collects what the decoder pushes."""

    def __init__(self) -> None:
        self.deltas: list[TokenDelta] = []
        self.cancelled = False

    def push(self, deltas: list[TokenDelta]) -> None:
        self.deltas.extend(deltas)


# methods the actor serves itself (as `_NAME`), around its engine's
_OWN = frozenset({"admit", "decode_step", "reset_decoding", "join_group", "optim_step_reduced"})


class EngineActor:
    """One engine worker in its own process (wrapped with `ray.remote` by `start_workers`)."""

    def __init__(self, settings: dict, index: int) -> None:
        self.settings = Settings(**settings)
        self.index = index
        torch.set_num_threads(self.settings.worker_threads)
        paths = DataPaths(self.settings.data_dir)
        offload = paths.offload / f"worker-{index}"
        shutil.rmtree(offload, ignore_errors=True)  # what an earlier life offloaded is gone
        offload.mkdir(parents=True, exist_ok=True)
        registry = ModelRegistry.from_settings(self.settings, paths.models)
        self.engine = Engine.from_settings(self.settings, registry, paths.samplers, offload)
        self.incarnation = uuid.uuid4().hex
        self.relays: dict[Hashable, _Relay] = {}
        self.last_stats = self.engine.stats()
        self.dp_group = None  # the torch.distributed group of its data-parallel set

    # ---- calls from the proxy ----------------------------------------------------------------

    def call(self, method: str, args: tuple, kwargs: dict) -> tuple[str, bool, object, object]:
        """Run one engine method: (incarnation, ok, result or exception, stats)."""
        try:
            target = getattr(self, f"_{method}") if method in _OWN else getattr(self.engine,
                                                                                 method)
            ok, value = True, target(*args, **kwargs)
        except Exception as e:
            ok, value = False, _portable(e)
        try:
            self.last_stats = self.engine.stats()
        except Exception:  # never lose a result over its stats
            logger.exception("reading worker stats failed")
        return self.incarnation, ok, value, self.last_stats

    @ray.method(concurrency_group="control")
    def ping(self) -> tuple[str, int, str]:
        """(incarnation, process id, node address), answered beside running work."""
        return self.incarnation, os.getpid(), ray.util.get_node_ip_address()

    # ---- what the engine does not do by itself -----------------------------------------------

    def _admit(self, handle: Hashable, sampler_id: str, request: SampleRequest,
               streaming: bool) -> str:
        if streaming:
            relay = _Relay()
            request = replace(request, stream=relay)
        name = self.engine.admit(handle, sampler_id, request)
        if streaming:
            self.relays[handle] = relay
        return name

    def _decode_step(self, cancelled: list[Hashable]
                     ) -> tuple[list[tuple[Hashable, SampleResult]], dict[Hashable, list]]:
        for handle in cancelled:
            if handle in self.relays:
                self.relays[handle].cancelled = True
        finished = self.engine.decode_step()
        deltas = {h: r.deltas for h, r in self.relays.items() if r.deltas}
        for relay in self.relays.values():
            relay.deltas = []
        for handle, _ in finished:
            self.relays.pop(handle, None)
        return finished, deltas

    def _reset_decoding(self) -> None:
        self.relays.clear()
        self.engine.reset_decoding()

    # ---- data parallel ----------------------------------------------------------------------

    def _join_group(self, rank: int, world: int, rendezvous: str, timeout_s: float) -> None:
        """Join a data-parallel group. The members meet through a file (`rendezvous`, in the
        data directory every worker shares): a TCP rendezvous would listen on every
        interface. Gloo then connects the members over the interface GLOO_SOCKET_IFNAME
        names (loopback for a cluster on one machine)."""
        if dist.is_initialized():
            dist.destroy_process_group()
        backend = "nccl" if self.engine.registry.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
        self.dp_group = dist.group.WORLD

    def _optim_step_reduced(self, model_id: str, hp) -> dict[str, float]:
        return self.engine.optim_step(model_id, hp, reduce=self._all_reduce)

    def _all_reduce(self, params: list) -> None:
        """Sum the replicas' accumulated gradients (one flat buffer, one collective)."""
        if self.dp_group is None:
            raise EngineError("data-parallel step on a worker that joined no group")
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.dp_group)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()


def _portable(e: Exception) -> Exception:
    """`e` if it survives pickling, else an EngineError with its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return EngineError(f"{type(e).__name__}: {e}")


class RayWorker:
    """The engine seam, served by an `EngineActor` (see the module docstring)."""

    def __init__(self, actor, name: str) -> None:
        self.actor = actor
        self.name = name
        self.incarnation: str | None = None  # the actor life served; None: unknown or dead
        self.pid: int | None = None
        self.node: str | None = None
        self.losses = 0
        self._stats = WorkerStats()
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []
        self._streams: dict[Hashable, object] = {}  # handle -> the server-side listener
        self._decoding: set[Hashable] = set()

    def add_lost_listener(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    # ---- calling the actor -------------------------------------------------------------------

    def submit(self, method: str, *args, **kwargs):
        return self.actor.call.remote(method, args, kwargs)

    def result(self, ref):
        try:
            incarnation, ok, value, stats = ray.get(ref)
        except RayActorError as e:
            why = _death_reason(e)
            self._lost(why, None)
            raise WorkerLost(f"worker lost: engine worker {self.name} went away while serving "
                             f"this request ({why}); {_WAY_BACK}") from None
        if self._observe(incarnation):
            raise WorkerLost(f"worker lost: engine worker {self.name} was restarted; "
                             f"{_WAY_BACK}")
        self._stats = stats
        if not ok:
            raise value
        return value

    def call(self, method: str, *args, **kwargs):
        return self.result(self.submit(method, *args, **kwargs))

    def ping(self, timeout: float = PING_TIMEOUT_S) -> bool:
        """Whether the worker answers; notices a death or a restart between calls."""
        try:
            incarnation, self.pid, self.node = ray.get(self.actor.ping.remote(), timeout=timeout)
        except GetTimeoutError:
            return False
        except RayActorError as e:
            self._lost(_death_reason(e), None)
            return False
        self._observe(incarnation)
        return True

    @property
    def alive(self) -> bool:
        return self.incarnation is not None

    def _observe(self, incarnation: str) -> bool:
        """Adopt the actor life that answered; True if it replaced one we served (a restart
        that no error reported)."""
        if incarnation == self.incarnation:
            return False
        if self.incarnation is None:  # the first answer, or the first after a reported death
            self.incarnation = incarnation
            return False
        self._lost("it was restarted", incarnation)
        return True

    def _lost(self, why: str, new_incarnation: str | None) -> None:
        """Forget the actor life we served (once per life) and tell the listeners."""
        with self._lock:
            old, self.incarnation = self.incarnation, new_incarnation
            self._streams.clear()
            self._decoding.clear()
            if old is None:
                return  # already reported
            self.losses += 1
        logger.error("engine worker %s lost: %s", self.name, why)
        for listener in self._listeners:
            listener(why)

    # ---- the seam ----------------------------------------------------------------------------

    def __getattr__(self, method: str):
        if method.startswith("_") or method not in _PLAIN:
            raise AttributeError(method)
        return lambda *args, **kwargs: self.call(method, *args, **kwargs)

    def has_room(self, sampler_id: str, request: SampleRequest) -> bool:
        return self.call("has_room", sampler_id, replace(request, stream=None))

    def admit(self, handle: Hashable, sampler_id: str, request: SampleRequest) -> str:
        stream = request.stream
        name = self.call("admit", handle, sampler_id, replace(request, stream=None),
                         stream is not None)
        self._decoding.add(handle)
        if stream is not None:
            self._streams[handle] = stream
        return name

    def decode_step(self) -> list[tuple[Hashable, SampleResult]]:
        cancelled = [h for h, s in self._streams.items() if s.cancelled]
        finished, deltas = self.call("decode_step", cancelled)
        for handle, batch in deltas.items():
            stream = self._streams.get(handle)
            if stream is not None:
                stream.push(batch)
        for handle, _ in finished:
            self._decoding.discard(handle)
            self._streams.pop(handle, None)
        return finished

    def decoding(self) -> bool:
        return bool(self._decoding)

    def reset_decoding(self) -> None:
        self._decoding.clear()
        self._streams.clear()
        self.call("reset_decoding")

    def stats(self) -> WorkerStats:
        return self._stats


# seam methods that pass straight through to the actor's engine
_PLAIN = frozenset({
    "load_base", "create_model", "load_model", "load_into", "model_info", "forget_model",
    "forward_backward_batch", "optim_step", "save", "add_sampler_snapshot",
    "add_sampler_from_checkpoint", "add_sampler_for_base", "has_sampler", "sampler_ids",
    "spilled_sampler", "drop", "settle",
})


def _death_reason(e: RayActorError) -> str:
    return f"its process exited; Ray reports {type(e).__name__}"


# ---- the cluster ------------------------------------------------------------------------------

def connect(settings: Settings) -> None:
    """Start Ray on this machine (`auto`: every socket on 127.0.0.1) or join a cluster."""
    if ray.is_initialized():
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if settings.ray == "auto":
        # Every socket on loopback: the caller set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before
        # importing ray. The token file goes under the data directory, not the home folder.
        if ray._private.ray_constants.ENABLE_RAY_CLUSTER:
            raise EngineError("ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was "
                              "set: it would listen on every interface")
        if not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ):
            token = Path(settings.data_dir) / "ray" / "auth_token"
            if not token.exists():
                token.parent.mkdir(parents=True, exist_ok=True)
                token.touch(mode=0o600)
                token.write_text(secrets.token_hex(32))
            os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
        cpus = max(os.cpu_count() or 1, settings.workers * settings.worker_threads)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", object_store_memory=256 << 20,
                 log_to_driver=False, configure_logging=False,
                 _temp_dir=_session_root(Path(settings.data_dir) / "ray"))
    else:
        ray.init(address=settings.ray, log_to_driver=False, configure_logging=False)
    logger.info("connected to Ray (%s): %s", settings.ray, ray.cluster_resources())


# Ray's sockets live at <root>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store, and a
# Unix socket's path is at most 107 bytes: the part after the root takes up to 67.
_MAX_SESSION_ROOT = 107 - 67
_short_root: str | None = None


def _session_root(preferred: Path) -> str:
    """`preferred` when Ray's socket paths under it fit, else a short folder in the temp dir."""
    global _short_root
    if len(str(preferred.resolve())) <= _MAX_SESSION_ROOT:
        return str(preferred)
    _short_root = tempfile.mkdtemp(prefix="tuneforge-ray-")
    logger.info("Ray's session files go to %s: under %s its socket paths would pass the "
                "107-byte limit of a Unix socket", _short_root, preferred)
    return _short_root


def start_workers(settings: Settings) -> list[RayWorker]:
    """One actor per worker, each with its own device; returns once every one answers."""
    gpus = settings.worker_gpus
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    env = {"OMP_NUM_THREADS": str(settings.worker_threads), "TOKENIZERS_PARALLELISM": "false"}
    if settings.ray == "auto":
        env["GLOO_SOCKET_IFNAME"] = "lo"
    actor_class = ray.remote(concurrency_groups={"control": 1})(EngineActor).options(
        num_cpus=0 if gpus else settings.worker_threads, num_gpus=gpus, max_restarts=-1,
        max_task_retries=0, runtime_env={"env_vars": env})
    dump = settings.model_dump(mode="json")
    workers = [RayWorker(actor_class.remote(dump, i), f"worker-{i}")
               for i in range(settings.workers)]
    for worker in workers:
        if not worker.ping(timeout=600):
            raise EngineError(f"engine worker {worker.name} did not start within 600 s")
    logger.info("%d engine workers up (%s GPU each): %s", len(workers), gpus,
                ", ".join(f"{w.name} pid {w.pid}" for w in workers))
    return workers


def shutdown(workers: list[RayWorker]) -> None:
    for worker in workers:
        try:
            ray.kill(worker.actor, no_restart=True)
        except Exception:  # already gone
            pass
    if ray.is_initialized():
        ray.shutdown()
    global _short_root
    if _short_root is not None:
        shutil.rmtree(_short_root, ignore_errors=True)
        _short_root = None
