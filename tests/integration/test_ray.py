"""The engine in Ray actors: placement over two CPU workers, a data-parallel group, the loss of a
worker, and a cluster that listens on loopback only. Driven by the real SDK against a real
server (`--ray auto`), compared with the in-process engine on the same requests."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import pytest
import tinker
from safetensors.torch import load_file
from tinker import types

from tests.integration.server import ServerProcess

pytest.importorskip("ray")

BASE = "tuneforge/tiny-qwen3"
DP_BASE = "tuneforge/tiny-qwen3-l"  # its runs are data-parallel over both workers
CLIENTS = 8
STEPS = 6
ADAM = types.AdamParams(learning_rate=5e-3)


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, models_dir):
    # A data directory too deep for Ray's Unix sockets (107 bytes) wherever pytest puts it: the
    # server must move Ray's session files to a short folder, and remove it when it stops.
    deep = tmp_path_factory.mktemp("ray-server") / ("a-data-directory-" * 4)
    before = set(Path(tempfile.gettempdir()).glob("tuneforge-ray-*"))
    proc = ServerProcess(deep, models_dir, preload=(BASE,),
                         env={"TUNEFORGE_RAY": "auto", "TUNEFORGE_WORKERS": "2",
                              "TUNEFORGE_DATA_PARALLEL": f'{{"{DP_BASE}": 2}}',
                              "TUNEFORGE_BATCH_WAIT_MS": "0"}).start(timeout=600)
    yield proc
    proc.stop()
    deadline = time.monotonic() + 30
    while _ray_processes(proc) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes(proc), "Ray processes outlived the server"
    assert set(Path(tempfile.gettempdir()).glob("tuneforge-ray-*")) <= before


@pytest.fixture(scope="module")
def local_server(tmp_path_factory, models_dir):
    proc = ServerProcess(tmp_path_factory.mktemp("local-server"), models_dir, preload=(BASE,),
                         env={"TUNEFORGE_BATCH_WAIT_MS": "0"}).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def reference(local_server):
    """Every client's losses over all steps on the in-process engine."""
    return _train_all(_service(local_server), range(STEPS))


def _service(proc: ServerProcess) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=proc.base_url, api_key=proc.api_key)


def _batch(client: int, step: int) -> list[types.Datum]:
    out = []
    for row in range(3):
        n = 8 + (client + row + step) % 5
        tokens = [(7 * client + 3 * row + 5 * step + i) % 200 + 1 for i in range(n + 1)]
        out.append(types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                            "weights": np.ones(n, dtype=np.float32)}))
    return out


def _step(tc, client: int, step: int) -> float:
    fb = tc.forward_backward(_batch(client, step), "cross_entropy")
    opt = tc.optim_step(ADAM)
    loss = fb.result().metrics["loss:sum"]
    opt.result()
    return loss


def _train_all(service, steps, base=BASE) -> list[list[float]]:
    clients = [service.create_lora_training_client(base_model=base, rank=4, seed=100 + i).result()
               for i in range(CLIENTS)]

    def run(i: int) -> list[float]:
        return [_step(clients[i], i, s) for s in steps]

    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(run, range(CLIENTS)))


def _system(proc: ServerProcess) -> dict:
    return httpx.get(f"{proc.base_url}/api/system", headers={"X-API-Key": proc.api_key},
                     timeout=30).json()


def _run(proc: ServerProcess, model_id: str) -> dict:
    return httpx.get(f"{proc.base_url}/api/v1/training_runs/{model_id}",
                     headers={"X-API-Key": proc.api_key}, timeout=30).json()


def _ray_processes(proc: ServerProcess) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            env = p.info["environ"] or {}
        except (psutil.Error, KeyError):
            continue
        if env.get("RAY_AUTH_TOKEN_PATH", "").startswith(str(proc.data_dir)):
            found.append(p)
    return found


def test_clients_spread_over_both_workers_and_match_the_in_process_engine(ray_server,
                                                                          reference):
    before = ray_server.metrics()
    losses = _train_all(_service(ray_server), range(STEPS))
    for got, want in zip(losses, reference, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    after = ray_server.metrics()
    workers = _system(ray_server)["workers"]
    placed = {w["name"]: w["models_placed"] for w in workers if w["kind"] == "ray"}
    assert sorted(placed.values()) == [CLIENTS // 2, CLIENTS // 2], placed
    for name in placed:
        key = f'tuneforge_worker_passes_total{{worker="{name}"}}'
        assert after[key] - before.get(key, 0) >= STEPS, (name, after[key])  # shared passes
        busy = f'tuneforge_worker_busy_seconds_total{{worker="{name}"}}'
        assert after[busy] > before.get(busy, 0)


def test_a_data_parallel_group_equals_one_worker(ray_server, local_server):
    """Losses, gradient norms, logprobs and the weights after Adam steps of a run split over two
    workers equal the same run on one in-process engine."""
    results = {}
    for name, proc in (("dp", ray_server), ("one", local_server)):
        tc = _service(proc).create_lora_training_client(base_model=DP_BASE, rank=8,
                                                        seed=5).result()
        steps = []
        for s in range(3):
            data = _batch(1, s) + _batch(2, s) + _batch(3, s)[:1]  # 7 datums: shards of 4 and 3
            fb = tc.forward_backward(data, "cross_entropy").result()
            opt = tc.optim_step(types.AdamParams(learning_rate=1e-2, grad_clip_norm=50.0)
                                ).result()
            steps.append((fb.metrics["loss:sum"], opt.metrics["grad_norm:mean"],
                          np.concatenate([o["logprobs"].to_numpy() for o in fb.loss_fn_outputs])))
        path = tc.save_state("dp-check").result().path
        run, kind, ck = path.removeprefix("tinker://").split("/")
        folder = proc.data_dir / "checkpoints" / run / kind / ck
        results[name] = steps, load_file(folder / "adapter_model.safetensors")
    (dp, dp_weights), (one, one_weights) = results["dp"], results["one"]
    for (loss_a, norm_a, lp_a), (loss_b, norm_b, lp_b) in zip(dp, one, strict=True):
        assert loss_a == pytest.approx(loss_b, rel=1e-5, abs=1e-5)
        assert norm_a == pytest.approx(norm_b, rel=1e-5, abs=1e-5)
        np.testing.assert_allclose(lp_a, lp_b, atol=1e-5)
    assert dp_weights.keys() == one_weights.keys()
    for key in dp_weights:
        np.testing.assert_allclose(dp_weights[key].numpy(), one_weights[key].numpy(), atol=1e-5)
    groups = [w for w in _system(ray_server)["workers"] if w["kind"] == "data-parallel"]
    assert [g["members"] for g in groups] == [["worker-0", "worker-1"]]


def test_sampling_and_streaming_through_a_worker(ray_server, local_server):
    """A snapshot sampler and a base-model chat stream served by Ray workers answer what the
    in-process engine answers, token for token (the stream's tokens are relayed per step)."""
    got = {}
    for name, proc in (("ray", ray_server), ("one", local_server)):
        for base in (BASE, DP_BASE):  # a worker's snapshot, and the data-parallel group's
            tc = _service(proc).create_lora_training_client(base_model=base, rank=4,
                                                            seed=11).result()
            _step(tc, 0, 0)
            sampler = tc.save_weights_and_get_sampling_client().result()
            out = sampler.sample(types.ModelInput.from_ints([5, 6, 7, 8]), 1,
                                 types.SamplingParams(max_tokens=12, temperature=0)).result()
            got[name, base] = out.sequences[0].tokens, out.sequences[0].logprobs
        client = openai.OpenAI(base_url=f"{proc.base_url}/oai/api/v1", api_key=proc.api_key,
                               max_retries=0)
        chat = {"model": BASE, "messages": [{"role": "user", "content": "Name a colour."}],
                "max_tokens": 24, "temperature": 0}
        whole = client.chat.completions.create(**chat).choices[0].message.content
        parts = [c.choices[0].delta.content or "" for c in
                 client.chat.completions.create(**chat, stream=True) if c.choices]
        assert len(parts) > 1 and "".join(parts) == whole
        got[name, "chat"] = whole
    for key in (BASE, DP_BASE):
        assert got["ray", key][0] == got["one", key][0]
        np.testing.assert_allclose(got["ray", key][1], got["one", key][1], atol=1e-5)
    assert got["ray", "chat"] == got["one", "chat"]


def test_cluster_listens_on_loopback_only(ray_server):
    server = psutil.Process(ray_server.proc.pid)
    tree = {server.pid} | {p.pid for p in server.children(recursive=True)}
    tree |= {p.pid for p in _ray_processes(ray_server)}
    assert len(tree) >= 4  # the server, Ray's own processes and the two workers
    listening = [c for c in psutil.net_connections(kind="inet")
                 if c.pid in tree and (c.status == psutil.CONN_LISTEN or not c.raddr)]
    assert listening
    outside = [(c.laddr.ip, c.laddr.port, c.pid) for c in listening
               if c.laddr.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not outside, outside


def test_a_lost_worker_fails_only_its_clients_which_resume_from_checkpoints(ray_server,
                                                                           reference):
    service = _service(ray_server)
    placed_before = {w["name"]: w["models_placed"] for w in _system(ray_server)["workers"]}
    clients = [service.create_lora_training_client(base_model=BASE, rank=4, seed=100 + i).result()
               for i in range(CLIENTS)]
    placed = {w["name"]: w["models_placed"] for w in _system(ray_server)["workers"]}
    assert placed["worker-1"] - placed_before["worker-1"] == CLIENTS // 2, (placed_before, placed)
    half = STEPS // 2
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(lambda i: [_step(clients[i], i, s) for s in range(half)], range(CLIENTS)))
    paths = [tc.save_state("half").result().path for tc in clients]
    victim = next(w for w in _system(ray_server)["workers"] if w["name"] == "worker-1")
    on_victim = [i for i, tc in enumerate(clients)
                 if _run(ray_server, tc.model_id)["engine_worker"] == "worker-1"]
    assert len(on_victim) == CLIENTS // 2

    # every client's next step is on its way, queued or running when the worker is killed
    futures = [tc.forward_backward(_batch(i, half), "cross_entropy")
               for i, tc in enumerate(clients)]
    os.kill(victim["pid"], signal.SIGKILL)
    lost = []
    for i, fut in enumerate(futures):
        try:
            fut.result()
            clients[i].optim_step(ADAM).result()
        except tinker.RequestFailedError as e:
            assert "worker lost" in str(e), str(e)
            assert "create_training_client_from_state_with_optimizer" in str(e), str(e)
            lost.append(i)
    assert lost == on_victim
    assert ray_server.healthy()

    # the other worker's clients go on as if nothing happened
    for i in sorted(set(range(CLIENTS)) - set(lost)):
        rest = [_step(clients[i], i, s) for s in range(half + 1, STEPS)]
        np.testing.assert_allclose(rest, reference[i][half + 1:], rtol=1e-5)
    # a lost client's next request names the loss and the way back
    with pytest.raises(tinker.RequestFailedError, match="worker lost"):
        clients[lost[0]].forward_backward(_batch(lost[0], half), "cross_entropy").result()
    # ... and it resumes from its checkpoint on a live worker, where the reference went on
    for i in lost:
        resumed = service.create_training_client_from_state_with_optimizer(paths[i]).result()
        rest = [_step(resumed, i, s) for s in range(half, STEPS)]
        np.testing.assert_allclose(rest, reference[i][half:], rtol=1e-5)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = {w["name"]: w for w in _system(ray_server)["workers"]}
        if workers["worker-1"]["alive"] and workers["worker-1"]["pid"] != victim["pid"]:
            break
        time.sleep(0.5)
    assert workers["worker-1"]["losses"] == 1 and workers["worker-1"]["alive"]
    assert ray_server.metrics()['tuneforge_worker_losses_total{worker="worker-1"}'] == 1
    # the data-parallel group forms again with the restarted worker
    tc = service.create_lora_training_client(base_model=DP_BASE, rank=4, seed=1).result()
    assert np.isfinite(_step(tc, 0, 0))
