"""Run metrics the server records itself, their live stream, /api/system, checkpoint archives.

A plain SDK training loop runs against a real server; every number the server recorded is
compared with what the client received or sent. The SDK is told to send at most 2 datums per
forward_backward request, so a 3-datum step arrives as two requests whose `loss:sum` values the
client sums: the recorded `loss_sum` must equal that sum bit for bit.
"""

from __future__ import annotations

import io
import json
import queue
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.integration.server import ServerProcess

MODEL = "tuneforge/tiny-qwen3"
STEPS = 4
LRS = [1e-3 * (i + 1) for i in range(STEPS + 1)]
WEIGHTS = (0.5, 1.0, 0.25)  # exact in float32, so the expected sums are exact too


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("run-metrics"), models_dir,
                         env={"TUNEFORGE_FWDBWD_MAX_CHUNK_LEN": "2"}).start()
    yield proc
    proc.stop()


def _batch(step: int) -> tuple[list[types.Datum], int, float]:
    rng = np.random.default_rng(step)
    data, tokens, weight_sum = [], 0, 0.0
    for i, w in enumerate(WEIGHTS):
        ids = rng.integers(10, 500, 6 + 2 * i)
        weights = np.full(len(ids) - 1, w, dtype=np.float32)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1].tolist()),
                                loss_fn_inputs={"target_tokens": ids[1:], "weights": weights}))
        tokens += len(ids) - 1
        weight_sum += float(weights.sum(dtype=np.float64))
    return data, tokens, weight_sum


class Trainer:
    """A plain SDK loop; remembers what the client received and sent."""

    def __init__(self, server: ServerProcess) -> None:
        sc = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
        self.tc = sc.create_lora_training_client(base_model=MODEL, rank=4, seed=0,
                                                 user_metadata={"job_id": "job-test"}
                                                 ).result()
        self.run_id = self.tc.model_id
        self.sent: list[dict] = []

    def step(self) -> None:
        i = len(self.sent)
        data, tokens, weight_sum = _batch(i)
        fb = self.tc.forward_backward(data, "cross_entropy").result()
        self.tc.forward(data[:1], "cross_entropy").result()  # forward only: not counted
        self.tc.optim_step(types.AdamParams(learning_rate=LRS[i], weight_decay=0.01)).result()
        self.sent.append({"loss_sum": fb.metrics["loss:sum"], "tokens": tokens,
                          "weight_sum": weight_sum, "lr": LRS[i]})


@pytest.fixture(scope="module")
def trained(server) -> Trainer:
    trainer = Trainer(server)
    for _ in range(STEPS):
        trainer.step()
    return trainer


def _get(server: ServerProcess, path: str, key: str | None = None, **params) -> httpx.Response:
    return httpx.get(f"{server.base_url}{path}", params=params, timeout=60,
                     headers={"X-API-Key": key or server.api_key})


def _rows(server: ServerProcess, run_id: str, **params) -> list[dict]:
    r = _get(server, f"/api/runs/{run_id}/metrics", **params)
    assert r.status_code == 200, r.text
    return r.json()["metrics"]


def _poll(fn, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


class SSEReader:
    """Reads a text/event-stream in a thread; events (and comments) land in a queue."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.events: queue.Queue = queue.Queue()
        self.prelude: list[str] = []
        self._client = httpx.Client(timeout=httpx.Timeout(60, read=None))
        self._response = self._client.send(self._client.build_request("GET", url,
                                                                      headers=headers),
                                           stream=True)
        self.status = self._response.status_code
        self.content_type = self._response.headers.get("content-type", "")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        fields: dict[str, str] = {}
        try:
            for line in self._response.iter_lines():
                if line == "":
                    if fields:
                        self.events.put(dict(fields))
                    fields = {}
                elif line.startswith(":") or line.startswith("retry:"):
                    self.prelude.append(line)
                else:
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
        except httpx.HTTPError:
            pass

    def take(self, n: int, timeout: float = 30.0) -> list[dict]:
        out, deadline = [], time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            assert left > 0, f"only {len(out)} of {n} events arrived: {out}"
            try:
                out.append(self.events.get(timeout=left))
            except queue.Empty:
                continue
        return out

    def close(self) -> None:
        self._response.close()
        self._client.close()


def _stream(server: ServerProcess, run_id: str, key: str | None = None,
            last_event_id: int | None = None) -> SSEReader:
    headers = {"X-API-Key": key or server.api_key}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    return SSEReader(f"{server.base_url}/api/runs/{run_id}/metrics/stream", headers)


def _open_streams(server: ServerProcess) -> float:
    return server.metrics()["tuneforge_run_metrics_streams"]


def test_one_row_per_step_with_what_the_client_saw(server, trained):
    rows = _rows(server, trained.run_id)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == STEPS
    for row, sent in zip(rows, trained.sent, strict=True):
        assert row["run_id"] == trained.run_id
        assert row["loss_sum"] == sent["loss_sum"]  # exactly what the client received
        assert row["lr"] == sent["lr"] and row["weight_decay"] == 0.01
        assert (row["beta1"], row["beta2"], row["eps"]) == (0.9, 0.95, 1e-12)
        assert row["tokens"] == sent["tokens"]
        assert row["weight_sum"] == sent["weight_sum"]
        assert row["loss"] == pytest.approx(sent["loss_sum"] / sent["weight_sum"], rel=1e-12)
        assert row["grad_norm"] > 0
        assert row["step_seconds"] > 0
        assert row["tokens_per_second"] == pytest.approx(row["tokens"] / row["step_seconds"])
        assert row["time"].endswith("+00:00")
    assert rows[0]["loss_sum"] != rows[1]["loss_sum"]
    later = _rows(server, trained.run_id, after=ids[1])
    assert [r["step"] for r in later] == list(range(3, STEPS + 1))


def test_run_listing(server, trained):
    r = _get(server, f"/api/runs/{trained.run_id}")
    assert r.status_code == 200, r.text
    run = r.json()
    assert run["id"] == trained.run_id and run["base_model"] == MODEL and run["lora_rank"] == 4
    assert run["loaded"] is True and run["job_id"] == "job-test"
    assert run["user_metadata"] == {"job_id": "job-test"}
    steps = len(trained.sent)
    assert run["steps"] == steps and run["last_lr"] == trained.sent[-1]["lr"]
    assert run["last_loss"] == pytest.approx(
        trained.sent[-1]["loss_sum"] / trained.sent[-1]["weight_sum"], rel=1e-12)
    listing = _get(server, "/api/runs", limit=5).json()
    assert listing["runs"][0] == run  # newest first
    assert listing["cursor"]["total_count"] >= 1
    assert _get(server, "/api/runs", limit=0).status_code == 400


def test_stream_replays_then_goes_live_and_resumes(server, trained):
    reader = _stream(server, trained.run_id)
    try:
        assert reader.status == 200 and reader.content_type.startswith("text/event-stream")
        replay = reader.take(len(trained.sent))
        assert "retry: 2000" in reader.prelude
        assert all(e["event"] == "metric" for e in replay)
        rows = [json.loads(e["data"]) for e in replay]
        assert [int(e["id"]) for e in replay] == [r["id"] for r in rows]
        assert rows == _rows(server, trained.run_id)
        trained.step()  # one more step arrives live, before it is written to the table
        live = json.loads(reader.take(1)[0]["data"])
        assert live["step"] == len(trained.sent)
        assert live["loss_sum"] == trained.sent[-1]["loss_sum"]
    finally:
        reader.close()
    assert _poll(lambda: _open_streams(server) == 0), "the stream outlived its client"

    rows = _rows(server, trained.run_id)
    k = 2
    resumed = _stream(server, trained.run_id, last_event_id=rows[k - 1]["id"])
    try:
        events = resumed.take(len(rows) - k)
        assert [json.loads(e["data"])["step"] for e in events] == list(range(k + 1,
                                                                           len(rows) + 1))
        time.sleep(0.5)  # nothing further may follow (a negative check needs a pause)
        assert resumed.events.empty()
    finally:
        resumed.close()
    by_query = _get(server, f"/api/runs/{trained.run_id}/metrics/stream",
                    last_event_id="nope")
    assert by_query.status_code == 400


def _cli(server: ServerProcess, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tuneforge", *args, "--data-dir",
                          str(server.data_dir)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_other_keys_see_nothing_and_admin_sees_all(server, trained):
    _, other = _cli(server, "keys", "create", "--name", "other").split()
    for path in (f"/api/runs/{trained.run_id}", f"/api/runs/{trained.run_id}/metrics",
                 f"/api/runs/{trained.run_id}/checkpoints",
                 f"/api/runs/{trained.run_id}/metrics/stream"):
        assert _get(server, path, key=other).status_code == 404, path
    assert _get(server, "/api/runs", key=other).json()["runs"] == []
    ids = [r["id"] for r in _get(server, "/api/runs").json()["runs"]]
    assert trained.run_id in ids  # the generated key is an admin key
    assert httpx.get(f"{server.base_url}/api/runs", timeout=30).status_code == 401


def test_system(server, trained):
    assert httpx.get(f"{server.base_url}/api/system", timeout=30).status_code == 401
    s = _get(server, "/api/system").json()
    assert s["cpu_count"] >= 1 and 0 <= s["cpu_percent"] <= 100
    assert 0 < s["memory_used"] < s["memory_total"]
    assert 50 << 20 < s["process_rss"] < s["memory_total"]
    assert s["engine_busy_seconds"] > 0
    assert s["engine_busy_share"] is not None and 0 <= s["engine_busy_share"] <= 1
    assert s["adapters"]["resident"] >= 1 and s["adapters"]["offloaded"] == 0
    names = {m["name"]: m["bytes"] for m in s["base_models"]}
    assert names[MODEL] > 1 << 20
    assert all(isinstance(v, int) and v >= 0 for v in s["queues"].values())
    assert isinstance(s["gpus"], list) and s["time"].endswith("+00:00")


def test_docs_off_openapi_on(server):
    assert httpx.get(f"{server.base_url}/docs", timeout=30).status_code == 404
    assert httpx.get(f"{server.base_url}/redoc", timeout=30).status_code == 404
    paths = httpx.get(f"{server.base_url}/openapi.json", timeout=30).json()["paths"]
    for p in ("/api/runs", "/api/runs/{run_id}/metrics/stream", "/api/system",
              "/api/runs/{run_id}/checkpoints/{kind}/{name}/archive"):
        assert p in paths


def _members(content: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_checkpoint_archive_and_delete(server, trained, tmp_path, models_dir):
    path = trained.tc.save_state("arch").result().path
    name = path.rsplit("/", 1)[1]
    listed = _get(server, f"/api/runs/{trained.run_id}/checkpoints").json()["checkpoints"]
    assert path in [c["tinker_path"] for c in listed]
    url = f"/api/runs/{trained.run_id}/checkpoints/weights/{name}/archive"
    r = _get(server, url)
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    files = _members(r.content)
    folder = server.data_dir / "checkpoints" / trained.run_id / "weights" / name
    stem = f"{trained.run_id}-weights-{name}".replace(":", "_")
    assert sorted(files) == [f"{stem}/adapter_config.json", f"{stem}/adapter_model.safetensors"]
    for f, data in files.items():
        assert data == (folder / f.rsplit("/", 1)[1]).read_bytes()

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tuneforge.engine.models import safe_dirname

    out = tmp_path / "adapter"
    out.mkdir()
    for f, data in files.items():
        (out / f.rsplit("/", 1)[1]).write_bytes(data)
    base = AutoModelForCausalLM.from_pretrained(str(models_dir / safe_dirname(MODEL)))
    peft_model = PeftModel.from_pretrained(base, str(out))
    saved = load_file(str(out / "adapter_model.safetensors"))
    key = next(k for k in saved if k.endswith("lora_A.weight"))
    loaded = dict(peft_model.named_parameters())[key.replace(".weight", ".default.weight")]
    assert np.array_equal(loaded.detach().numpy(), saved[key].numpy())

    merged = _members(_get(server, url, merged="true").content)
    merged_names = {f.rsplit("/", 1)[1] for f in merged}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= merged_names
    assert not list((server.data_dir / "exports").glob("merge-*"))

    r = httpx.delete(f"{server.base_url}/api/runs/{trained.run_id}/checkpoints/weights/{name}",
                     headers={"X-API-Key": server.api_key}, timeout=30)
    assert r.status_code == 204
    assert not folder.exists()
    listed = _get(server, f"/api/runs/{trained.run_id}/checkpoints").json()["checkpoints"]
    assert path not in [c["tinker_path"] for c in listed]
    assert _get(server, url).status_code == 404


def test_history_survives_a_restart(server, trained):
    before = _rows(server, trained.run_id)
    assert len(before) == len(trained.sent)
    server.stop()
    server.start()
    assert _rows(server, trained.run_id) == before
    run = _get(server, f"/api/runs/{trained.run_id}").json()
    assert run["loaded"] is False and run["steps"] == len(before)
    # ids keep increasing across the restart
    again = Trainer(server)
    again.step()
    (row,) = _rows(server, again.run_id)
    assert row["step"] == 1 and row["id"] > before[-1]["id"]
