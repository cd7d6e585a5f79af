"""`GET /api/system`: the machine and the engine right now, as JSON for a dashboard.

CPU and memory from psutil; GPUs from NVML (`pynvml`, package nvidia-ml-py), asked only when
torch sees CUDA; the engine's busy share over the last few seconds (server/load.py); queue
depths, adapters by residency, samplers and base models from the engine workers' last stats
(each scheduler reads them on its own thread; nothing here touches an engine), and one entry
per worker (its process, queue, placed models, busy time). `/metrics` has
the same numbers as Prometheus counters for scrapers; this view needs an API key because it
names base models and queues.
"""

from __future__ import annotations

import logging
import threading

import psutil
import torch
from fastapi import APIRouter

from tuneforge.server import workers
from tuneforge.server.deps import Owner, State
from tuneforge.storage.db import utcnow

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api")

_process = psutil.Process()
_nvml_lock = threading.Lock()
_nvml_ready: bool | None = None  # None: not tried yet


def _nvml():
    """The pynvml module, initialised once; None when NVML is not usable here."""
    global _nvml_ready
    with _nvml_lock:
        if _nvml_ready is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml_ready = True
            except Exception as e:  # no driver, no library: report no GPUs
                logger.warning("GPU statistics unavailable: NVML did not initialise (%s)", e)
                _nvml_ready = False
        if not _nvml_ready:
            return None
        import pynvml

        return pynvml


def gpus() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    nvml = _nvml()
    if nvml is None:
        return []
    out = []
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            out.append({
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "utilization": float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                "memory_used": int(memory.used),
                "memory_total": int(memory.total),
            })
    except Exception as e:
        logger.warning("reading GPU statistics failed: %s", e)
    return out


@router.get("/system")
def system(state: State, owner: Owner) -> dict:
    stats, ws = state.scheduler.stats, state.scheduler.worker_stats()
    memory = psutil.virtual_memory()
    residency = ws.residency
    busy_share = state.load.busy_share()
    return {
        "cpu_percent": state.load.cpu_percent,
        "cpu_count": psutil.cpu_count() or 0,
        "memory_total": int(memory.total),
        "memory_used": int(memory.total - memory.available),
        "process_rss": int(_process.memory_info().rss),
        "gpus": gpus(),
        "engine_busy_seconds": round(stats.busy_seconds, 6),
        "engine_busy_share": None if busy_share is None else round(busy_share, 4),
        "queues": {lane or "(control)": n for lane, n in state.scheduler.depths().items()},
        "adapters": {
            "resident": residency["device"],
            "offloaded": residency["cpu"] + residency["disk"],
            **residency,
            "samplers_resident": ws.samplers_resident,
            "memory_bytes": int(ws.memory_bytes),
            "memory_limit_bytes": int(ws.memory_limit_bytes),
        },
        "base_models": [{"name": name, "bytes": int(size),
                         "quantization": state.registry.spec(name).quantized}
                        for name, size in ws.base_models.items()],
        "workers": workers.describe(state.scheduler),
        "dtype": state.registry.dtype,
        "time": utcnow().isoformat(),
    }
