"""How loaded the machine and the engine were a moment ago, for `GET /api/system`.

The schedulers only count their engine threads' busy seconds since start, and psutil's CPU
percentage is relative to its previous reading; a share "over the last few seconds" needs
readings taken over time. `run()` (an asyncio task of the server's lifetime) takes one per
second and keeps the last `WINDOW_SECONDS` of them; a reading costs two clock reads and one
`/proc/stat` read.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable

import psutil

WINDOW_SECONDS = 5.0
SAMPLE_SECONDS = 1.0


class EngineLoad:
    def __init__(self, busy_seconds: Callable[[], float], workers: int = 1) -> None:
        """`busy_seconds()`: the engine threads' busy seconds so far, added up over `workers`
        workers (the busy share is their mean)."""
        self.busy_seconds = busy_seconds
        self.workers = workers
        self._samples: deque[tuple[float, float]] = deque()  # (monotonic time, busy seconds)
        self._lock = threading.Lock()
        self.cpu_percent = 0.0
        psutil.cpu_percent(None)  # the first reading only sets the reference point

    def sample(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._samples.append((now, self.busy_seconds()))
            while len(self._samples) > 2 and now - self._samples[1][0] >= WINDOW_SECONDS:
                self._samples.popleft()
        self.cpu_percent = psutil.cpu_percent(None)

    def busy_share(self) -> float | None:
        """The engine workers' mean busy fraction over about the last `WINDOW_SECONDS` (None
        until two readings are at least a tenth of a second apart)."""
        now, busy = time.monotonic(), self.busy_seconds()
        with self._lock:
            oldest = next(((t, b) for t, b in self._samples if now - t <= WINDOW_SECONDS + 1),
                          None)
        if oldest is None or now - oldest[0] < 0.1:
            return None
        return max(0.0, min(1.0, (busy - oldest[1]) / (now - oldest[0]) / self.workers))

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_SECONDS)
