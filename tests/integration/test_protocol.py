"""Protocol behaviour a client relies on: seq_id ordering, idempotent retries, long-polling,
sessions, and the answers of the handshake endpoints — exercised over raw HTTP."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tinker
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output

MODEL = "tuneforge/tiny-qwen3"
DATUM = types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7, 8]),
                    loss_fn_inputs={"target_tokens": np.array([6, 7, 8, 9])})


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=f"{server.base_url}/api/v1",
                      headers={"X-API-Key": server.api_key}, timeout=30) as client:
        yield client


def fwdbwd_body(model_id: str, seq_id: int, forward_only: bool = False) -> bytes:
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[DATUM], loss_fn="cross_entropy"),
        model_id=model_id, seq_id=seq_id)
    msg = forward_backward_request_to_proto(req)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def submit_fwdbwd(http, model_id, seq_id, forward_only=False) -> str:
    r = http.post("/forward_backward", content=fwdbwd_body(model_id, seq_id, forward_only),
                  headers={"Content-Type": "application/x-protobuf"})
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def result(http, request_id):
    while True:
        r = http.post("/retrieve_future", json={"request_id": request_id,
                                                "allow_metadata_only": False})
        if r.status_code != 408:
            assert r.status_code == 200, r.text
            return r


def fresh_model(service_client) -> str:
    return service_client.create_lora_training_client(base_model=MODEL, rank=4,
                                                       seed=0).result().model_id


def test_out_of_order_and_repeated_requests(service_client, http):
    model_id = fresh_model(service_client)
    opt = http.post("/optim_step", json={"model_id": model_id, "seq_id": 2,
                                         "adam_params": {"learning_rate": 0.05}}).json()
    first = submit_fwdbwd(http, model_id, 1)
    repeat = submit_fwdbwd(http, model_id, 1)
    assert repeat == first  # a retried submission gets the original future
    probe = submit_fwdbwd(http, model_id, 3, forward_only=True)
    fb = deserialize_forward_backward_output(result(http, first).content)
    assert "metrics" in result(http, opt["request_id"]).json()
    after = deserialize_forward_backward_output(result(http, probe).content)
    # seq 2 (the optimizer step) ran after seq 1's gradient, so the weights moved
    assert after.metrics["loss:sum"] < fb.metrics["loss:sum"] - 1e-3


def test_pending_future_is_held_then_answered_try_again(service_client, http):
    model_id = fresh_model(service_client)
    waiting = submit_fwdbwd(http, model_id, 2)  # seq 1 has not arrived: it must wait
    r = http.post("/retrieve_future", json={"request_id": waiting, "allow_metadata_only": True})
    assert r.status_code == 408
    assert r.json() == {"type": "try_again", "request_id": waiting, "queue_state": "active"}
    assert r.elapsed.total_seconds() >= 2.5  # held, not answered at once
    submit_fwdbwd(http, model_id, 1)
    assert result(http, waiting).headers["content-type"] == "application/x-protobuf"


def test_unknown_and_earlier_process_request_ids(http):
    r = http.post("/retrieve_future", json={"request_id": "nope", "allow_metadata_only": False})
    assert r.status_code == 404 and r.json()["detail"]
    r = http.post("/retrieve_future", json={"request_id": "req-00000000-12",
                                            "allow_metadata_only": False})
    assert r.status_code == 200 and "server restarted" in r.json()["error"]


def test_handshake_answers(http):
    config = http.post("/client/config", json={"sdk_version": "0.38.0"}).json()
    assert config["use_pyqwest_transport"] is False and config["fwdbwd_max_chunk_len"] == 2
    assert http.post("/telemetry", json={"events": []}).json() == {"status": "accepted"}
    assert http.get("/healthz").json()["status"] == "ok"


def test_finished_session_rejects_heartbeats_and_new_work(server, http):
    with tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key) as sc:
        tc = sc.create_lora_training_client(base_model=MODEL, rank=4).result()
        session_id = tc.model_id.split(":train:")[0]
    headers = {"X-API-Key": server.api_key}
    r = httpx.post(f"{server.base_url}/api/v1/session_heartbeat", headers=headers,
                   json={"session_id": session_id})
    assert r.status_code == 410
    r = httpx.post(f"{server.base_url}/api/v1/create_model", headers=headers,
                   json={"session_id": session_id, "model_seq_id": 5, "base_model": MODEL,
                         "lora_config": {"rank": 4}})
    assert r.status_code == 410 and "finished" in r.json()["detail"]
    listed = httpx.get(f"{server.base_url}/api/v1/sessions/{session_id}", headers=headers).json()
    assert listed["training_run_ids"] == [tc.model_id]
    # the finished session's model was released: its requests fail
    failed = result(http, submit_fwdbwd(http, tc.model_id, 1, forward_only=True)).json()
    assert "is not loaded" in failed["error"]
    assert "create_training_client_from_state" in failed["error"]
