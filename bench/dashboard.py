"""What watching costs: training throughput with dashboards open, and the price of run metrics.

Eight SDK clients (one adapter each) train concurrently on a tiny model, one-sequence
forward_backward + optim_step steps, on one server, in phases that alternate:
  plain    nobody watches
  watched  four open pages: four SSE streams on /api/runs/{id}/metrics/stream (one per run of
           the first four clients) and /api/system polled every 2 s by each page
Prints steps/s of both and watched / plain (goal >= 0.95), medians over the repeats after a
warm-up of each; and what recording the metrics costs the server per step
(`tuneforge_run_metrics_seconds_total` on request paths, and the background writer's
`tuneforge_run_metrics_flush_seconds_total`), against a client's step time (goal <= 1%) and
against the engine's busy time per step.

    python bench/dashboard.py [--model tuneforge/tiny-qwen3] [--clients 8] [--seq 64]
                              [--steps 20] [--rounds 3] [--threads 1] [--record]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path

import httpx
from common import median, random_datums, record, run_all, start_server, timed, train_step

PAGES = 4
SYSTEM_POLL_SECONDS = 2.0


class Page:
    """One open dashboard page: a metrics stream and a /api/system poller."""

    def __init__(self, base_url: str, key: str, run_id: str) -> None:
        self.base_url, self.headers = base_url, {"X-API-Key": key}
        self.events = 0
        self.polls = 0
        self._stop = threading.Event()
        self._client = httpx.Client(timeout=httpx.Timeout(30, read=None))
        self._response = self._client.send(
            self._client.build_request("GET", f"{base_url}/api/runs/{run_id}/metrics/stream",
                                       headers=self.headers), stream=True)
        assert self._response.status_code == 200, self._response.status_code
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._poll, daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self) -> None:
        try:
            for line in self._response.iter_lines():
                if line.startswith("event: metric"):
                    self.events += 1
        except httpx.HTTPError:
            pass

    def _poll(self) -> None:
        while not self._stop.wait(SYSTEM_POLL_SECONDS):
            r = httpx.get(f"{self.base_url}/api/system", headers=self.headers, timeout=30)
            r.raise_for_status()
            self.polls += 1

    def close(self) -> None:
        self._stop.set()
        self._response.close()
        self._client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tuneforge/tiny-qwen3")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="steps per client per phase")
    ap.add_argument("--rounds", type=int, default=3, help="repeats of the two phases")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    import tinker
    from tinker import types

    datum = random_datums(args.model, args.seq)

    adam = types.AdamParams(learning_rate=1e-4)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp), args.model, args.threads)
        try:
            sc = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
            clients = [sc.create_lora_training_client(base_model=args.model, rank=8,
                                                      seed=i).result()
                       for i in range(args.clients)]
            data = [[datum()] for _ in clients]

            def train():
                run_all([lambda tc=tc, d=d: [train_step(tc, d, adam) for _ in range(args.steps)]
                         for tc, d in zip(clients, data, strict=True)])

            times: dict[str, list[float]] = {"plain": [], "watched": []}
            recording, flushing, busy, events, polls = [], [], [], 0, 0
            for r in range(args.rounds + 1):
                for phase in ("plain", "watched"):
                    pages = ([Page(server.base_url, server.api_key, tc.model_id)
                              for tc in clients[:PAGES]] if phase == "watched" else [])
                    before = server.metrics()
                    t = timed(train)
                    after = server.metrics()
                    for page in pages:
                        events += page.events if r else 0
                        polls += page.polls if r else 0
                        page.close()
                    if not r:  # the first round warms up
                        continue
                    times[phase].append(t)
                    rows = (after["tuneforge_run_metrics_rows_total"]
                            - before["tuneforge_run_metrics_rows_total"])
                    assert rows == args.clients * args.steps, rows
                    recording.append((after["tuneforge_run_metrics_seconds_total"]
                                      - before["tuneforge_run_metrics_seconds_total"]) / rows)
                    flushing.append((after["tuneforge_run_metrics_flush_seconds_total"]
                                     - before["tuneforge_run_metrics_flush_seconds_total"])
                                    / rows)
                    busy.append((after["tuneforge_engine_busy_seconds_total"]
                                 - before["tuneforge_engine_busy_seconds_total"]) / rows)
        finally:
            server.stop()
    steps = args.clients * args.steps
    sps = {phase: steps / median(ts) for phase, ts in times.items()}
    ratio = sps["watched"] / sps["plain"]
    client_step = median(times["plain"]) / args.steps  # one client's step, wall clock
    rec, flush, engine_step = median(recording), median(flushing), median(busy)
    print(f"model {args.model}, {args.clients} clients x 1 sequence of {args.seq} tokens per "
          f"step, {args.steps} steps per client per phase, {args.threads} server thread(s), "
          f"{args.rounds} repeats; watched: {PAGES} metric streams + /api/system every "
          f"{SYSTEM_POLL_SECONDS:.0f} s per page")
    for phase in times:
        print(f"  {phase:8s} {median(times[phase]):7.2f} s per phase   {sps[phase]:7.1f} steps/s")
    print(f"  streams received {events} events (each page replays its run's history, then "
          f"{PAGES * args.steps * args.rounds} steps arrived live); {polls} /api/system answers")
    print(f"  recording per step: {1e6 * rec:.1f} us on request paths + {1e6 * flush:.1f} us "
          f"in the background writer; a client's step takes {1e3 * client_step:.1f} ms, the "
          f"engine's busy time per step {1e3 * engine_step:.2f} ms")
    print(f"watched / plain              = {ratio:.3f}   (goal >= 0.95)")
    print(f"recording / client step      = {100 * rec / client_step:.3f}%   (goal <= 1%)")
    print(f"recording+writer / engine    = {100 * (rec + flush) / engine_step:.3f}%")
    if args.record:
        record("dashboard", f"{args.model} | {args.clients} clients x 1x{args.seq} tokens, "
               f"{args.steps} steps, {args.threads} thr | {sps['plain']:.1f} / "
               f"{sps['watched']:.1f} | {ratio:.3f} | {1e6 * rec:.1f} + {1e6 * flush:.1f} us | "
               f"{100 * rec / client_step:.3f}% | {100 * (rec + flush) / engine_step:.3f}%")


if __name__ == "__main__":
    main()
