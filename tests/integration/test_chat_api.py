"""The OpenAI-compatible chat API (/oai/api/v1) against a real server, checked against the
Tinker SDK's `sample` of the same prompt tokens, with httpx and the `openai` client."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

MODEL = "tuneforge/tiny-qwen3"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."}]
SECRET_Q = [{"role": "user", "content": "What is the secret word?"}]
SECRET_A = "The secret word is tangerine."


def url(server, path: str) -> str:
    return f"{server.base_url}/oai/api/v1{path}"


def chat(server, body: dict, key: str | None = None, **headers: str) -> httpx.Response:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(url(server, "/chat/completions"), json=body, headers=headers, timeout=120)


def answer(server, key: str, **body) -> dict:
    r = chat(server, {"model": MODEL, "messages": MESSAGES, **body}, key)
    assert r.status_code == 200, r.text
    return r.json()


def prompt_tokens(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def sdk_sample(sampler, prompt: list[int], **params) -> types.SampledSequence:
    res = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                         types.SamplingParams(**params)).result()
    return res.sequences[0]


def new_key(server, name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tuneforge", "keys", "create", "--name", name,
                          "--data-dir", str(server.data_dir)], capture_output=True, text=True,
                         timeout=120, env=os.environ)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[1]


@pytest.fixture(scope="module")
def base_sampler(service_client):
    return service_client.create_sampling_client(base_model=MODEL).result()


@pytest.fixture(scope="module")
def tokenizer(service_client):
    """The SDK's tokenizer (a training client's loads from the server's model folder)."""
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=2).result()
    return tc.get_tokenizer()


@pytest.fixture(scope="module")
def keys(server) -> dict[str, str]:
    return {"alice": new_key(server, "chat-alice"), "bob": new_key(server, "chat-bob")}


@pytest.fixture(scope="module")
def memorised(server, keys, tokenizer):
    """Alice's adapter, trained through the SDK to answer SECRET_Q with SECRET_A."""
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=keys["alice"])
    tc = sc.create_lora_training_client(base_model=MODEL, rank=16, seed=0).result()
    prompt = prompt_tokens(tokenizer, SECRET_Q)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = prompt + tokenizer.encode(SECRET_A, add_special_tokens=False) + [end_of_turn]
    weights = np.zeros(len(ids) - 1, dtype=np.float32)
    weights[len(prompt) - 1:] = 1.0
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": np.array(ids[1:], dtype=np.int64),
                                        "weights": weights})
    for _ in range(120):  # about 60 steps
        loss = tc.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
        tc.optim_step(types.AdamParams(learning_rate=3e-3)).result()
        if loss / weights.sum() < 0.03:
            break
    assert loss / weights.sum() < 0.1, f"the reply was not learnt (loss {loss})"
    path = tc.save_weights_for_sampler("chat-secret").result().path
    return {"path": path, "sc": sc}


# ---- the base model against the SDK ----------------------------------------------------------

def test_greedy_answer_and_logprobs_equal_the_sdk_sample(server, base_sampler, tokenizer):
    out = answer(server, server.api_key, max_tokens=12, temperature=0, logprobs=True,
                 top_logprobs=3)
    prompt = prompt_tokens(tokenizer, MESSAGES)
    seq = sdk_sample(base_sampler, prompt, max_tokens=12, temperature=0.0)
    tokens, logprobs = list(seq.tokens), list(seq.logprobs)
    if seq.stop_reason == "stop":  # the end-of-turn token ends the answer, not part of it
        tokens, logprobs = tokens[:-1], logprobs[:-1]
    choice = out["choices"][0]
    assert out["object"] == "chat.completion" and out["model"] == MODEL
    assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(seq.tokens),
                            "total_tokens": len(prompt) + len(seq.tokens)}
    assert choice["message"] == {"role": "assistant",
                                 "content": tokenizer.decode(tokens, skip_special_tokens=True)}
    assert choice["finish_reason"] == ("stop" if seq.stop_reason == "stop" else "length")
    entries = choice["logprobs"]["content"]
    assert [e["token"] for e in entries] == [tokenizer.decode([t]) for t in tokens]
    np.testing.assert_allclose([e["logprob"] for e in entries], logprobs, atol=1e-4, rtol=0)
    for e in entries:
        assert e["bytes"] == list(e["token"].encode())
        top = [t["logprob"] for t in e["top_logprobs"]]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        # greedy: the chosen token is the most likely one
        assert e["top_logprobs"][0]["token"] == e["token"]
        assert abs(top[0] - e["logprob"]) < 1e-6


def test_seed_reproduces_the_answer_and_the_sdk_draw(server, base_sampler, tokenizer):
    def draw(seed: int) -> list[str]:
        out = answer(server, server.api_key, max_tokens=10, temperature=1.0, seed=seed, n=2)
        assert [c["index"] for c in out["choices"]] == [0, 1]
        return [c["message"]["content"] for c in out["choices"]]

    a, b, c = draw(1234), draw(1234), draw(99)
    assert a == b
    assert a != c
    assert a[0] != a[1]  # the choices of one request are independent draws
    seq = sdk_sample(base_sampler, prompt_tokens(tokenizer, MESSAGES), max_tokens=10,
                     temperature=1.0, seed=1234)
    tokens = seq.tokens[:-1] if seq.stop_reason == "stop" else seq.tokens
    assert a[0] == tokenizer.decode(tokens, skip_special_tokens=True)


def test_stream_chunks_concatenate_to_the_answer(server):
    whole = answer(server, server.api_key, max_tokens=10, temperature=0, logprobs=True)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10, "temperature": 0,
            "logprobs": True, "stream": True, "stream_options": {"include_usage": True}}
    events = []
    with httpx.stream("POST", url(server, "/chat/completions"), json=body, timeout=120,
                      headers={"Authorization": f"Bearer {server.api_key}"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    text = "".join(d["delta"].get("content") or "" for d in deltas)
    lps = [e for d in deltas if d["logprobs"] for e in d["logprobs"]["content"]]
    want = whole["choices"][0]
    assert text == want["message"]["content"]
    assert lps == want["logprobs"]["content"]
    assert [d["finish_reason"] for d in deltas if d["finish_reason"]] == [want["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_stop_string_cuts_the_answer(server):
    whole = answer(server, server.api_key, max_tokens=12, temperature=0, logprobs=True)
    entries = whole["choices"][0]["logprobs"]["content"]
    content = whole["choices"][0]["message"]["content"]
    stop = entries[3]["token"]
    cut = answer(server, server.api_key, max_tokens=12, temperature=0, stop=[stop],
                 logprobs=True)["choices"][0]
    assert cut["message"]["content"] == content[:content.find(stop)]
    assert cut["finish_reason"] == "stop"
    kept = cut["logprobs"]["content"]
    assert kept == entries[:len(kept)] and len(kept) <= 3


def test_openai_client_talks_to_the_server(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url(server, ""), api_key=server.api_key, max_retries=0)
    want = answer(server, server.api_key, max_tokens=8, temperature=0)["choices"][0]
    got = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8,
                                         temperature=0)
    assert got.choices[0].message.content == want["message"]["content"]
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream
                   if c.choices) == want["message"]["content"]
    assert MODEL in [m.id for m in client.models.list()]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                       response_format={"type": "json_object"})
    assert "response_format" in str(err.value)


# ---- refusals, authentication ------------------------------------------------------------

@pytest.mark.parametrize("name,value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("response_format", {"type": "json_object"}),
    ("functions", [{"name": "f"}]),
    ("presence_penalty", 0.5),
    ("frequency_penalty", -1.0),
    ("logit_bias", {"5": 10}),
    ("echo", True),
])
def test_unserved_parameters_are_refused_by_name(server, name, value):
    r = chat(server, {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, name: value},
             server.api_key)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == name and name in err["message"]
    assert err["type"] == "invalid_request_error"


def test_parameters_at_their_off_value_are_accepted(server):
    r = chat(server, {"model": MODEL, "messages": MESSAGES, "max_tokens": 2,
                      "presence_penalty": 0, "frequency_penalty": 0.0, "tools": None,
                      "response_format": {"type": "text"}}, server.api_key)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body,param", [
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"n": 0}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
])
def test_bad_values_name_their_parameter(server, body, param):
    r = chat(server, {"model": MODEL, "messages": MESSAGES, **body}, server.api_key)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_model_is_404_model_not_found(server):
    for model in ("no/such-model", "tinker://nope:train:0/sampler_weights/x"):
        r = chat(server, {"model": model, "messages": MESSAGES}, server.api_key)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"


def test_keys_are_checked(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer tml-not-a-key"}, {"X-API-Key": "tml-nope"}):
        r = httpx.post(url(server, "/chat/completions"), json=body, headers=headers, timeout=60)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url(server, "/models"), timeout=60).status_code == 401
    r = httpx.post(url(server, "/chat/completions"), json=body, timeout=60,
                   headers={"X-API-Key": server.api_key})
    assert r.status_code == 200


# ---- a trained adapter -------------------------------------------------------------------

def test_memorised_adapter_answers_its_reply(server, keys, memorised):
    body = {"messages": SECRET_Q, "max_tokens": 24, "temperature": 0}
    base = chat(server, {"model": MODEL, **body}, keys["alice"]).json()
    mine = chat(server, {"model": memorised["path"], **body}, keys["alice"]).json()
    assert mine["choices"][0]["message"]["content"] == SECRET_A
    assert mine["choices"][0]["finish_reason"] == "stop"
    assert base["choices"][0]["message"]["content"] != SECRET_A
    both = chat(server, {"model": f"{MODEL};{memorised['path']}", **body}, keys["alice"]).json()
    assert both["choices"][0]["message"]["content"] == SECRET_A
    wrong = chat(server, {"model": f"tuneforge/tiny-qwen3-l;{memorised['path']}", **body},
                 keys["alice"])
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "model"


def test_adapter_logprobs_equal_the_sdk_sample(server, keys, memorised, tokenizer):
    out = chat(server, {"model": memorised["path"], "messages": SECRET_Q, "max_tokens": 24,
                        "temperature": 0, "logprobs": True}, keys["alice"]).json()
    sampler = memorised["sc"].create_sampling_client(model_path=memorised["path"]).result()
    seq = sdk_sample(sampler, prompt_tokens(tokenizer, SECRET_Q), max_tokens=24,
                     temperature=0.0)
    assert seq.stop_reason == "stop"
    got = [e["logprob"] for e in out["choices"][0]["logprobs"]["content"]]
    np.testing.assert_allclose(got, seq.logprobs[:-1], atol=1e-4, rtol=0)
    assert out["usage"]["completion_tokens"] == len(seq.tokens)


def test_another_key_sees_no_checkpoint(server, keys, memorised):
    r = chat(server, {"model": memorised["path"], "messages": SECRET_Q}, keys["bob"])
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": f"The model `{memorised['path']}` does not exist or you do not have access "
                   "to it.", "type": "invalid_request_error", "param": "model",
        "code": "model_not_found"}

    def ids(key: str) -> dict[str, dict]:
        r = httpx.get(url(server, "/models"), headers={"Authorization": f"Bearer {key}"},
                      timeout=60)
        assert r.status_code == 200 and r.json()["object"] == "list"
        return {m["id"]: m for m in r.json()["data"]}

    alice, bob = ids(keys["alice"]), ids(keys["bob"])
    assert MODEL in alice and MODEL in bob
    assert alice[memorised["path"]]["parent"] == MODEL
    assert memorised["path"] not in bob
    one = url(server, f"/models/{memorised['path']}")
    mine = httpx.get(one, headers={"X-API-Key": keys["alice"]}, timeout=60)
    assert mine.status_code == 200 and mine.json() == alice[memorised["path"]]
    theirs = httpx.get(one, headers={"X-API-Key": keys["bob"]}, timeout=60)
    assert theirs.status_code == 404
    assert theirs.json()["error"]["code"] == "model_not_found"


# ---- legacy completions, live streaming, the openai client -------------------------------

PROMPT = "The capital of France is"


def oai(server, key: str | None = None):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url(server, ""), api_key=key or server.api_key, max_retries=0)


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=60).text
    line = next(ln for ln in text.splitlines() if ln.startswith(f"tuneforge_{name} "))
    return float(line.split()[1])


def sdk_tokens(seq) -> list[int]:
    """The answer's tokens as the endpoints return them: without the token that ended it."""
    return list(seq.tokens[:-1] if seq.stop_reason == "stop" else seq.tokens)


def test_completion_greedy_equals_the_sdk_sample(server, base_sampler, tokenizer):
    client = oai(server)
    prompt = tokenizer.encode(PROMPT)
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                                    logprobs=2)
    seq = sdk_sample(base_sampler, prompt, max_tokens=16, temperature=0.0)
    tokens = sdk_tokens(seq)
    c = got.choices[0]
    assert got.object == "text_completion" and c.index == 0
    assert c.text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert c.finish_reason == ("stop" if seq.stop_reason == "stop" else "length")
    assert c.logprobs.tokens == [tokenizer.decode([t]) for t in tokens]
    np.testing.assert_allclose(c.logprobs.token_logprobs, seq.logprobs[:len(tokens)],
                               atol=1e-4, rtol=0)
    assert c.logprobs.text_offset[0] == 0 and c.logprobs.text_offset == sorted(
        c.logprobs.text_offset)
    assert all(len(top) >= 2 for top in c.logprobs.top_logprobs)
    assert got.usage.prompt_tokens == len(prompt)
    assert got.usage.completion_tokens == len(seq.tokens)
    # the same prompt as token ids, and a list of prompts (choice i*n + j)
    ids = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    assert ids.choices[0].text == c.text
    two = client.completions.create(model=MODEL, prompt=[PROMPT, "Once upon a time"],
                                    max_tokens=8, temperature=0, n=2)
    assert [x.index for x in two.choices] == [0, 1, 2, 3]
    short = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    other = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                      temperature=0)
    assert [x.text for x in two.choices] == [short.choices[0].text] * 2 + [
        other.choices[0].text] * 2
    assert two.usage.prompt_tokens == short.usage.prompt_tokens + other.usage.prompt_tokens


def test_logprobs_equal_compute_logprobs(server, base_sampler, tokenizer):
    prompt = prompt_tokens(tokenizer, MESSAGES)
    out = answer(server, server.api_key, max_tokens=12, temperature=0, logprobs=True)
    tokens = sdk_tokens(sdk_sample(base_sampler, prompt, max_tokens=12, temperature=0.0))
    scored = base_sampler.compute_logprobs(types.ModelInput.from_ints(prompt + tokens)).result()
    got = [e["logprob"] for e in out["choices"][0]["logprobs"]["content"]]
    assert len(got) == len(tokens)
    np.testing.assert_allclose(got, scored[len(prompt):], atol=1e-4, rtol=0)
    # legacy completions, at temperature 1 (logprobs of the distribution sampled from)
    ids = tokenizer.encode(PROMPT)
    comp = oai(server).completions.create(model=MODEL, prompt=ids, max_tokens=10, seed=7,
                                          logprobs=0)
    c = comp.choices[0]
    drawn = sdk_tokens(sdk_sample(base_sampler, ids, max_tokens=10, temperature=1.0, seed=7))
    assert c.logprobs.tokens == [tokenizer.decode([t]) for t in drawn]
    scored = base_sampler.compute_logprobs(types.ModelInput.from_ints(ids + drawn)).result()
    np.testing.assert_allclose(c.logprobs.token_logprobs, scored[len(ids):], atol=1e-4, rtol=0)


def _stream_text(stream) -> tuple[str, list[str], str | None, object]:
    text, deltas, finish, usage = "", [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for ch in chunk.choices:
            piece = ch.delta.content if hasattr(ch, "delta") else ch.text
            if piece:
                deltas.append(piece)
                text += piece
            finish = ch.finish_reason or finish
    return text, deltas, finish, usage


def test_streams_yield_the_non_streamed_text(server):
    client = oai(server)
    want = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64,
                                          temperature=0)
    text, deltas, finish, usage = _stream_text(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=64, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert text == want.choices[0].message.content
    assert finish == want.choices[0].finish_reason
    assert usage.completion_tokens == want.usage.completion_tokens
    assert len(deltas) > 1  # (liveness itself: test_stream_is_live_and_a_disconnect_frees...)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=64, temperature=0)
    text, deltas, finish, _ = _stream_text(client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=64, temperature=0, stream=True))
    assert text == plain.choices[0].text and finish == plain.choices[0].finish_reason
    assert len(deltas) > 1


def test_streamed_stop_strings_do_not_leak(server):
    client = oai(server)
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40,
                                      temperature=0).choices[0].text
    assert len(whole) > 12
    for stop in (whole[5:9], whole[9:], whole[6:7] + "\u00e9never"):
        want = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40,
                                         temperature=0, stop=[stop]).choices[0]
        text, _, finish, _ = _stream_text(client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop],
            stream=True))
        assert text == want.text and finish == want.finish_reason
        if stop in whole:
            assert text == whole[:whole.find(stop)] and finish == "stop"


def test_stream_is_live_and_a_disconnect_frees_the_rows(server):
    """The first chunk arrives while the answer is still being decoded: closing the stream
    then stops the decoding well before max_tokens (a replayed answer would have sampled all
    of them before its first chunk)."""
    client = oai(server)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2000, "temperature": 1.0,
            "seed": 3, "stop": None}
    full = client.completions.create(**body)
    assert full.choices[0].finish_reason == "length"  # this draw runs to max_tokens
    before = metric(server, "sampled_tokens_total")
    requests = metric(server, "sample_requests_total")
    stream = client.completions.create(**body, stream=True)
    first = next(c for c in stream if c.choices and c.choices[0].text)
    assert first.choices[0].text
    stream.close()
    deadline = 60
    start = time.monotonic()
    while metric(server, "sampled_tokens_total") == before:
        assert time.monotonic() - start < deadline, "the cancelled stream never finished"
        time.sleep(0.05)
    assert metric(server, "sample_requests_total") == requests + 1
    assert metric(server, "sampled_tokens_total") - before < 1000


def test_streams_share_decoding_steps_with_tinker_samples(server, base_sampler, tokenizer):
    """A Tinker `sample` sent while a live stream is decoding joins its batch: the steps run
    are about the stream's length, not the sum of both requests' lengths."""
    ids, long, short = tokenizer.encode(PROMPT), 400, 200
    body = {"model": MODEL, "prompt": ids, "max_tokens": long, "temperature": 1.0, "seed": 3}
    steps = metric(server, "decode_steps_total")
    stream = oai(server).completions.create(**body, stream=True)
    chunks = iter(stream)
    next(c for c in chunks if c.choices and c.choices[0].text)  # it is decoding now
    seq = sdk_sample(base_sampler, ids, max_tokens=short, temperature=1.0, stop=[], seed=5)
    assert len(seq.tokens) == short
    rest = _stream_text(chunks)
    assert rest[2] == "length"
    assert metric(server, "decode_steps_total") - steps < long + short / 2


def test_eight_concurrent_streams_all_finish(server):
    from concurrent.futures import ThreadPoolExecutor

    client = oai(server)
    asks = [{"model": MODEL, "max_tokens": 24, "temperature": 0.8, "seed": i,
             "messages": [{"role": "user", "content": f"Count to {i + 2}."}]} for i in range(8)]
    want = [client.chat.completions.create(**a).choices[0].message.content for a in asks]

    def one(a):
        return _stream_text(oai(server).chat.completions.create(**a, stream=True))[0]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, asks))
    assert got == want


@pytest.mark.parametrize("name,value", [
    ("echo", True), ("suffix", "x"), ("best_of", 3), ("logit_bias", {"5": 1}),
    ("presence_penalty", 0.5), ("frequency_penalty", 1.0), ("logprobs", 21),
    ("temperature", 3.0), ("prompt", []), ("n", 0),
])
def test_completion_bad_parameters_name_it(server, name, value):
    openai = pytest.importorskip("openai")
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, name: value}
    with pytest.raises(openai.BadRequestError) as err:
        oai(server).completions.create(**body)
    assert err.value.body["param"] == name and err.value.body["type"] == "invalid_request_error"


def test_openai_client_refuses_chat_parameters_by_name(server):
    openai = pytest.importorskip("openai")
    client = oai(server)
    for extra in ({"tools": [{"type": "function", "function": {"name": "f"}}]},
                  {"tool_choice": "auto"}, {"logit_bias": {"1": 2}},
                  {"presence_penalty": 1.0}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, **extra)
        assert err.value.body["param"] == next(iter(extra))


def test_checkpoint_answers_through_both_endpoints(server, keys, memorised, tokenizer):
    openai = pytest.importorskip("openai")
    alice, bob = oai(server, keys["alice"]), oai(server, keys["bob"])
    sampler = memorised["sc"].create_sampling_client(model_path=memorised["path"]).result()
    prompt = prompt_tokens(tokenizer, SECRET_Q)
    seq = sdk_sample(sampler, prompt, max_tokens=24, temperature=0.0)
    chat_ = alice.chat.completions.create(model=memorised["path"], messages=SECRET_Q,
                                          max_tokens=24, temperature=0, logprobs=True)
    assert chat_.choices[0].message.content == SECRET_A
    assert [e.token for e in chat_.choices[0].logprobs.content] == [
        tokenizer.decode([t]) for t in sdk_tokens(seq)]
    comp = alice.completions.create(model=memorised["path"], prompt=prompt, max_tokens=24,
                                    temperature=0, logprobs=1)
    sdk = sdk_sample(sampler, prompt, max_tokens=24, temperature=0.0, stop=None)
    assert comp.choices[0].logprobs.tokens == [tokenizer.decode([t]) for t in sdk_tokens(sdk)]
    assert comp.choices[0].text.startswith(SECRET_A)
    scored = sampler.compute_logprobs(
        types.ModelInput.from_ints(prompt + sdk_tokens(sdk))).result()
    np.testing.assert_allclose(comp.choices[0].logprobs.token_logprobs, scored[len(prompt):],
                               atol=1e-4, rtol=0)
    streamed = _stream_text(alice.chat.completions.create(
        model=memorised["path"], messages=SECRET_Q, max_tokens=24, temperature=0, stream=True))
    assert streamed[0] == SECRET_A
    for call in (lambda: bob.chat.completions.create(model=memorised["path"],
                                                     messages=SECRET_Q, max_tokens=4),
                 lambda: bob.completions.create(model=memorised["path"], prompt="x",
                                                max_tokens=4)):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert err.value.body["code"] == "model_not_found"


def test_tutoring_evaluation_through_the_endpoint_scores_as_the_job(server, keys, memorised,
                                                                    tokenizer):
    """Exact match over a few rows: the job evaluator (greedy `sample` with the renderer)
    and the same rows answered through /chat/completions give the same score."""
    from tuneforge.jobs import evaluate
    from tuneforge.jobs.model import pick_renderer

    sampler = memorised["sc"].create_sampling_client(model_path=memorised["path"]).result()
    _, renderer = pick_renderer(None, MODEL, copy.deepcopy(tokenizer))
    rows = [{"messages": SECRET_Q + [{"role": "assistant", "content": SECRET_A}]},
            {"messages": [{"role": "user", "content": "What is the secret word, please?"},
                          {"role": "assistant", "content": SECRET_A}]},
            {"messages": [{"role": "user", "content": "What is 2 + 2?"},
                          {"role": "assistant", "content": "4"}]}]
    prompts = [r["messages"][:-1] for r in rows]
    refs = [r["messages"][-1]["content"] for r in rows]
    job = evaluate.text_scores(evaluate.generate(sampler, renderer, prompts, 24), refs)
    client = oai(server, keys["alice"])
    preds = [client.chat.completions.create(model=memorised["path"], messages=p, max_tokens=24,
                                            temperature=0).choices[0].message.content
             for p in prompts]
    ours = evaluate.text_scores(preds, refs)
    assert ours["exact_match"] == job["exact_match"] >= 1 / 3
