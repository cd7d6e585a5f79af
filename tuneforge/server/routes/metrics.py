"""`/metrics`: the server's load in Prometheus text format.

Aggregate numbers only (no key, run or sampler names), so it is served without an API key, for
scrapers. Counters are totals since start; rates are the scraper's job.
"""

from __future__ import annotations

import resource

import torch
from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from tuneforge.scheduler.stats import BATCH_SIZE_BUCKETS
from tuneforge.server import workers
from tuneforge.server.deps import State

router = APIRouter()


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_: str,
               samples: list[tuple[dict[str, str], float]] | float) -> None:
        self.lines += [f"# HELP tuneforge_{name} {help_}", f"# TYPE tuneforge_{name} {kind}"]
        if not isinstance(samples, list):
            samples = [({}, samples)]
        for labels, value in samples:
            inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            self.lines.append(f"tuneforge_{name}{{{inner}}} {value}" if inner
                              else f"tuneforge_{name} {value}")


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(state: State) -> str:
    out, stats = _Text(), state.scheduler.stats
    out.metric("queue_depth", "gauge", "Requests waiting, per base-model queue.",
               [({"queue": lane or "(control)"}, n) for lane, n in
                state.scheduler.depths().items()])
    out.metric("pending_futures", "gauge", "Submitted requests without a result yet.",
               state.futures.pending_count())
    out.metric("engine_busy_seconds_total", "counter", "Time the engine thread spent working.",
               round(stats.busy_seconds, 6))
    out.metric("training_passes_total", "counter", "Shared forward/backward passes run.",
               stats.passes)
    out.metric("trained_tokens_total", "counter", "Tokens through forward/backward passes.",
               stats.trained_tokens)
    out.metric("training_seconds_total", "counter", "Time spent in forward/backward passes.",
               round(stats.training_seconds, 6))
    out.lines += ["# HELP tuneforge_batch_requests Requests served per shared pass.",
                  "# TYPE tuneforge_batch_requests histogram"]
    for bound in BATCH_SIZE_BUCKETS:
        out.lines.append(f'tuneforge_batch_requests_bucket{{le="{bound}"}} '
                         f"{stats.batch_size_counts[bound]}")
    out.lines += [f'tuneforge_batch_requests_bucket{{le="+Inf"}} {stats.passes}',
                  f"tuneforge_batch_requests_sum {stats.batch_size_sum}",
                  f"tuneforge_batch_requests_count {stats.passes}"]
    out.metric("sample_requests_total", "counter", "Sampling requests admitted.",
               stats.sample_requests)
    out.metric("sampled_tokens_total", "counter", "Tokens generated.", stats.sampled_tokens)
    out.metric("decode_steps_total", "counter", "Decoding steps run.", stats.decode_steps)
    ws = state.scheduler.worker_stats()
    out.metric("decode_rows", "gauge", "Samples being decoded now, per base model.",
               [({"base_model": name}, n) for name, n in ws.decode_rows.items()])
    out.metric("training_models", "gauge", "Training models, by where they are.",
               [({"where": where}, n) for where, n in ws.residency.items()])
    out.metric("samplers_resident", "gauge", "Sampler weights in memory.", ws.samplers_resident)
    out.metric("adapter_memory_bytes", "gauge", "Memory held by resident adapters.",
               ws.memory_bytes)
    out.metric("adapter_memory_limit_bytes", "gauge", "Adapter memory budget.",
               ws.memory_limit_bytes)
    out.metric("base_model_bytes", "gauge",
               "Parameter memory of each loaded base model (every worker's copy).",
               [({"base_model": name}, size) for name, size in ws.base_models.items()])
    _worker_metrics(out, workers.describe(state.scheduler))
    recorder = state.run_metrics
    out.metric("run_metrics_seconds_total", "counter",
               "Time spent recording run metrics on request paths (submission, engine thread).",
               round(recorder.recording_seconds, 6))
    out.metric("run_metrics_flush_seconds_total", "counter",
               "Time the background writer spent writing run metric rows.",
               round(recorder.flush_seconds_total, 6))
    out.metric("run_metrics_rows_total", "counter", "Run metric rows recorded (one per step).",
               recorder.rows_recorded)
    out.metric("run_metrics_streams", "gauge", "Open run metric streams.",
               recorder.subscriber_count())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.metric("process_max_resident_bytes", "gauge", "Peak resident memory of the server.", rss)
    if torch.cuda.is_available():
        out.metric("cuda_memory_allocated_bytes", "gauge", "CUDA memory allocated by torch.",
                   torch.cuda.memory_allocated())
    return "\n".join(out.lines) + "\n"


def _worker_metrics(out: _Text, described: list[dict]) -> None:
    """One sample per engine worker (and data-parallel group), labelled by its name."""
    for name, kind, help_, key in (
            ("worker_up", "gauge", "Whether the engine worker answers (1) or is lost (0).",
             "alive"),
            ("worker_queue_depth", "gauge", "Requests waiting for the engine worker.",
             "queue_depth"),
            ("worker_training_models", "gauge", "Training models placed on the engine worker.",
             "models_placed"),
            ("worker_busy_seconds_total", "counter", "Time the engine worker spent working.",
             "busy_seconds"),
            ("worker_passes_total", "counter", "Forward/backward passes the worker ran.",
             "passes"),
            ("worker_sample_requests_total", "counter", "Sampling requests the worker admitted.",
             "sample_requests"),
            ("worker_adapter_memory_bytes", "gauge", "Memory held by the worker's adapters.",
             "memory_bytes"),
            ("worker_cuda_memory_bytes", "gauge", "CUDA memory allocated by the worker.",
             "cuda_memory_bytes"),
            ("worker_losses_total", "counter", "Times the worker's process was lost.",
             "losses")):
        out.metric(name, kind, help_, [({"worker": w["name"]}, int(w[key]))
                                       if isinstance(w[key], bool) else
                                       ({"worker": w["name"]}, w[key])
                                       for w in described if key in w])
