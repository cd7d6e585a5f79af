"""Shared pieces of the benchmarks: a server subprocess, results rows, timing helpers."""

from __future__ import annotations

import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.integration.server import ServerProcess  # noqa: E402

MODELS_DIR = REPO / ".cache" / "bench-models"
RESULTS = REPO / "bench" / "RESULTS.md"


def start_server(tmp: Path, model: str, threads: int, **env: str) -> ServerProcess:
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(tmp, MODELS_DIR, preload=(model,), threads=threads,
                           env={"TUNEFORGE_MAX_MODELS_PER_KEY": "1000", **env})
    return server.start()


def engine_busy(server: ServerProcess) -> float:
    """Seconds the server's engine has spent on work so far."""
    return server.metrics()["tuneforge_engine_busy_seconds_total"]


def run_all(fns) -> list:
    """Run the callables at once, each in its own thread; their results, or the first error."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(fns)) as pool:
        return [f.result() for f in [pool.submit(fn) for fn in fns]]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def record(section: str, row: str) -> None:
    """Append a dated row under `section` of RESULTS.md (the section must exist)."""
    text = RESULTS.read_text()
    marker = f"<!-- {section} rows -->"
    if marker not in text:
        raise SystemExit(f"RESULTS.md has no {marker}")
    RESULTS.write_text(text.replace(marker, f"| {dt.date.today().isoformat()} | {row} |\n{marker}"))


def random_datums(model: str, seq: int, seed: int = 0):
    """A function making cross-entropy datums of `seq` random tokens of `model`'s vocabulary."""
    import numpy as np
    from tinker import types

    vocab = 8192 if model.startswith("tuneforge/") else 49152
    rng = np.random.default_rng(seed)

    def datum() -> types.Datum:
        t = rng.integers(0, vocab, seq + 1)
        return types.Datum(model_input=types.ModelInput.from_ints(t[:-1].tolist()),
                           loss_fn_inputs={"target_tokens": t[1:]})

    return datum


def train_step(tc, batch, adam) -> None:
    """One cross-entropy step, both requests sent before either answer is awaited."""
    fb = tc.forward_backward(batch, "cross_entropy")
    opt = tc.optim_step(adam)
    fb.result()
    opt.result()
