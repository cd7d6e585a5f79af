"""Hundreds of malformed or hostile requests: each gets a 4xx or a failed future, never a 5xx;
the server stays healthy and writes nothing outside its data directory."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

from tests.integration.server import ServerProcess

MODEL = "tuneforge/tiny-qwen3"
HOSTILE = [None, True, False, 0, -1, 2**31, 2**70, -(2**70), 1.5, "", "x" * 5000, [], {},
           [1, "a", None], {"a": {"b": {"c": [1, 2, {"d": None}]}}}, "../../../outside/pwn",
           "tinker://../../outside/weights/x", "tinker://a/b/c/d", "tinker:///weights/",
           "/etc/passwd", "s-nope:train:0", "..", "a/../../b", "%2e%2e%2f", "\u0000", "😀" * 50]
JSON_ENDPOINTS = {
    "client/config": ["sdk_version"],
    "client/dynamic_config": ["sdk_version"],
    "telemetry": ["events", "session_id"],
    "create_session": ["tags", "user_metadata", "sdk_version", "display_name"],
    "session_heartbeat": ["session_id"],
    "create_model": ["session_id", "model_seq_id", "base_model", "lora_config",
                     "optimizer_config", "user_metadata"],
    "get_info": ["model_id"],
    "optim_step": ["model_id", "seq_id", "adam_params", "optimizer_params"],
    "save_weights": ["model_id", "seq_id", "path", "ttl_seconds", "overwrite", "user_metadata"],
    "save_weights_for_sampler": ["model_id", "seq_id", "path", "sampling_session_seq_id", "kind"],
    "save_weights_external": ["model_id", "seq_id", "path", "ttl_seconds",
                              "age_encryption_recipients"],
    "load_weights": ["model_id", "seq_id", "session_id", "model_seq_id", "path", "optimizer"],
    "create_sampling_session": ["session_id", "sampling_session_seq_id", "model_path",
                                "base_model"],
    "asample": ["sampling_session_id", "seq_id", "num_samples", "prompt", "sampling_params",
                "prompt_logprobs", "topk_prompt_logprobs"],
    "retrieve_future": ["request_id", "allow_metadata_only"],
    "weights_info": ["tinker_path"],
}


@pytest.fixture(params=["sqlite", "postgres"])
def sandbox(request, tmp_path_factory, models_dir) -> Iterator[tuple[ServerProcess, Path]]:
    """A server whose data directory sits beside an `outside` folder that must stay untouched;
    metadata in its SQLite file, or in PostgreSQL (same code, stricter column types)."""
    root = tmp_path_factory.mktemp("sandbox")
    (root / "outside").mkdir()
    (root / "outside" / "keep.txt").write_text("untouched")
    env = {"TUNEFORGE_LONG_POLL_SECONDS": "0.2", "TUNEFORGE_LIMIT_MAX_TOKENS_PER_REQUEST": "4096"}
    if request.param == "postgres":
        env["TUNEFORGE_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    proc = ServerProcess(root / "data", models_dir, env=env).start()
    yield proc, root
    proc.stop()


def tree(path: Path, skip: Path | None = None) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")
            if skip is None or not p.is_relative_to(skip)}


def real_ids(server) -> dict:
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
    tc = sc.create_lora_training_client(base_model=MODEL, rank=2, seed=0).result()
    path = tc.save_state("fuzz-base").result().path
    sampler = tc.save_weights_and_get_sampling_client().result()
    return {"model_id": tc.model_id, "session_id": tc.model_id.split(":train:")[0],
            "path": path, "sampler": sampler._sampling_session_id}


def json_cases(rng: random.Random, ids: dict) -> Iterator[tuple[str, str, object]]:
    plausible = {"model_id": ids["model_id"], "session_id": ids["session_id"], "path": ids["path"],
                 "sampling_session_id": ids["sampler"], "model_path": ids["path"],
                 "tinker_path": ids["path"], "seq_id": 10_000, "model_seq_id": 50,
                 "sampling_session_seq_id": 50, "base_model": MODEL}
    for endpoint, fields in JSON_ENDPOINTS.items():
        for body in (None, [], "text", 7, [{"a": 1}]):
            yield "POST", endpoint, body
        yield "RAW", endpoint, b"{not json"
        yield "RAW", endpoint, b'{"seq_id": NaN, "model_id": Infinity}'
        for _ in range(12):
            body = {f: plausible.get(f) for f in fields if rng.random() < 0.6}
            for f in rng.sample(fields, k=min(len(fields), rng.randint(1, 3))):
                body[f] = rng.choice(HOSTILE)
            yield "POST", endpoint, body


def rest_cases(ids: dict) -> Iterator[tuple[str, str, object]]:
    run = ids["model_id"]
    for bad in ["..", "..%2F..%2Foutside", "%2e%2e", "x" * 300, "s-nope:train:0", "a%00b", run]:
        yield "GET", f"training_runs/{bad}", None
        yield "GET", f"training_runs/{bad}/checkpoints", None
        yield "GET", f"samplers/{bad}", None
        yield "GET", f"sessions/{bad}", None
        yield "POST", f"sessions/{bad}/finish", {"reason": bad}
        for kind in ("weights", "sampler_weights", "external_weights", "..", "bogus"):
            yield "DELETE", f"training_runs/{bad}/checkpoints/{kind}/{bad}", None
            yield "PUT", f"training_runs/{bad}/checkpoints/{kind}/{bad}/ttl", {"ttl_seconds": -5}
        external = f"training_runs/{run}/checkpoints/external_weights/{bad}"
        yield "GET", f"{external}/external_weights_urls", None
        signed = "expires=99999999999&signature=00"
        yield "FILE", f"files/{bad}/{bad}/adapter_config.json?{signed}", None
    for query in ("limit=-1", "limit=99999999", "offset=-5", "limit=abc", "limit=2**70"):
        yield "GET", f"training_runs?{query}", None
        yield "GET", f"checkpoints?{query}", None
        yield "GET", f"sessions?{query}", None
    yield "PUT", f"training_runs/{run}/checkpoints/weights/fuzz-base/ttl", {"ttl_seconds": "soon"}
    yield "PUT", f"training_runs/{run}/checkpoints/weights/fuzz-base/ttl", {"ttl_seconds": 2**70}
    yield "POST", f"training_runs/{run}/checkpoints/weights/fuzz-base/publish", None


JOB = {"type": "sft", "base_model": MODEL, "data": [{"prompt": "p", "response": "r"}],
       "epochs": 1, "eval_samples": 0}
JOB_FIELDS = ["type", "base_model", "data", "lora_rank", "learning_rate", "batch_size", "epochs",
              "eval_split", "eval_data", "patience", "name", "seed", "max_length", "renderer",
              "load_checkpoint_path", "train_on", "tasks", "grader", "teacher"]


def job_cases(rng: random.Random) -> Iterator[tuple[str, str, object]]:
    """The job API (/api/jobs): hostile configs, ids, paths and evaluate bodies."""
    for body in (None, [], "text", 7, {}, {"type": "sft"}):
        yield "JOB", "", body
    for _ in range(40):
        body = dict(JOB)
        for f in rng.sample(JOB_FIELDS, k=rng.randint(1, 3)):
            body[f] = rng.choice(HOSTILE)
        yield "JOB", "", body
    for bad in ["..", "%2e%2e", "x" * 300, "job-nope", "a%00b"]:
        yield "JOBGET", f"/{bad}", None
        yield "JOBGET", f"/{bad}/logs?offset=-1", None
        yield "JOBGET", f"/{bad}/metrics", None
        yield "JOB", f"/{bad}/cancel", None
        yield "JOB", f"/{bad}/evaluate", {"baseline": bad, "data": "/etc/passwd"}
    for query in ("limit=-1", "limit=99999999", "offset=-5", "limit=abc"):
        yield "JOBGET", f"?{query}", None


def protobuf_cases(rng: random.Random, ids: dict) -> Iterator[bytes]:
    for n in (0, 1, 7, 100, 5000):
        yield bytes(rng.getrandbits(8) for _ in range(n))
    for _ in range(50):
        msg = pb.ForwardBackwardRequest(model_id=rng.choice([ids["model_id"], "nope", "x" * 300]),
                                        seq_id=rng.choice([-5, 0, 1, 10_000 + rng.randint(0, 99)]),
                                        loss_fn=rng.choice(["cross_entropy", "ppo", "", "💥"]),
                                        forward_only=rng.random() < 0.5)
        for _ in range(rng.randint(0, 3)):
            d = msg.data.add()
            tokens = rng.choice([b"", b"\x01", np.arange(5, dtype="<i4").tobytes(),
                                 np.array([-1, 2**31 - 1], dtype="<i4").tobytes()])
            d.model_input.add().encoded_text.tokens = tokens
            if rng.random() < 0.2:
                d.model_input.add().image.data = b"\x89PNG"
            t = d.loss_fn_inputs["target_tokens"]
            t.dtype = rng.choice([pb.DTYPE_INT64, pb.DTYPE_FLOAT32, 99])
            t.shape.extend(rng.choice([[], [5], [-3], [2**40], [5, 2], [1, 1, 1]]))
            if rng.random() < 0.5:
                t.dense = np.arange(5, dtype="<i8").tobytes()[: rng.randint(0, 40)]
            else:
                t.sparse_csr.values = np.ones(3, dtype="<i8").tobytes()
                t.sparse_csr.crow_indices = np.array(rng.choice([[0, 3], [0, 9], [5, 1, 0]]),
                                                     dtype="<i8").tobytes()
                t.sparse_csr.col_indices = np.array([0, 1, 2**40], dtype="<i8").tobytes()
        body = msg.SerializeToString()
        if rng.random() < 0.3 and body:  # flip a byte: a message that may no longer parse
            i = rng.randrange(len(body))
            body = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1:]
        yield body


def test_hostile_requests_never_break_the_server(sandbox, models_dir):
    server, root = sandbox
    ids = real_ids(server)
    before_outside, before_models = tree(root, skip=root / "data"), tree(models_dir)
    rng = random.Random(1234)
    statuses: list[int] = []
    futures: list[str] = []
    headers = {"X-API-Key": server.api_key}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        def check(r: httpx.Response, what: str) -> None:
            statuses.append(r.status_code)
            assert r.status_code < 500, f"{what} -> {r.status_code}: {r.text[:300]}"
            if r.status_code >= 400:
                assert r.json()["detail"], what  # errors always carry a JSON message
            elif r.headers.get("content-type", "").startswith("application/json"):
                body = r.json()
                if isinstance(body, dict) and "request_id" in body and "error" not in body:
                    futures.append(body["request_id"])

        for method, endpoint, body in [*json_cases(rng, ids), *rest_cases(ids)]:
            url = f"/api/v1/{endpoint}" if method != "FILE" else f"/{endpoint}"
            if method == "RAW":
                r = http.post(url, content=body, headers={**headers,
                                                          "Content-Type": "application/json"})
            elif method in ("GET", "FILE", "DELETE"):
                r = http.request("GET" if method == "FILE" else method, url, headers=headers)
            else:
                r = http.request(method, url, headers=headers, json=body)
            check(r, f"{method} {endpoint} {json.dumps(body, default=str)[:200]}")
        for method, path, body in job_cases(rng):
            url = f"/api/jobs{path}"
            r = (http.get(url, headers=headers) if method == "JOBGET"
                 else http.post(url, headers=headers, json=body))
            check(r, f"{method} {url} {json.dumps(body, default=str)[:200]}")
        for body in protobuf_cases(rng, ids):
            r = http.post("/api/v1/forward_backward", content=body,
                          headers={**headers, "Content-Type": "application/x-protobuf"})
            check(r, f"forward_backward {body[:40]!r}")
        for request_id in futures:
            r = http.post("/api/v1/retrieve_future", headers=headers,
                          json={"request_id": request_id, "allow_metadata_only": False})
            assert r.status_code in (200, 408), r.text
            statuses.append(r.status_code)
    print(f"{len(statuses)} hostile requests; statuses: "
          f"{ {s: statuses.count(s) for s in sorted(set(statuses))} }")
    assert len(statuses) >= 300
    assert server.healthy()
    assert tree(root, skip=root / "data") == before_outside
    assert tree(models_dir) == before_models
    assert (root / "outside" / "keep.txt").read_text() == "untouched"
    # the real model still trains after all that
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
    tc = sc.create_training_client_from_state(ids["path"]).result()
    out = tc.forward_backward([types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                                           loss_fn_inputs={"target_tokens": np.array([2, 3, 4])})],
                              "cross_entropy").result()
    assert np.isfinite(out.metrics["loss:sum"])
    assert not os.path.exists(root / "outside" / "pwn")
