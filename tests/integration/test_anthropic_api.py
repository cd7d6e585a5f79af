"""The Anthropic-compatible Messages API (/anthropic/api/v1) against a real server, driven by
the official `anthropic` client and checked against the Tinker SDK's `sample` of the same
rendered prompt."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.conftest import REPO

anthropic = pytest.importorskip("anthropic")

MODEL = "tuneforge/tiny-qwen3"
SYSTEM = "You are terse."
USER = [{"role": "user", "content": "Name a colour."}]
SECRET_Q = [{"role": "user", "content": "What is the secret word?"}]
SECRET_A = "The secret word is tangerine."
GREEDY = {"temperature": 0}  # the client has no `temperature` argument any more: sent as body


def client_for(server, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{server.base_url}/anthropic/api", api_key=key,
                               max_retries=0, timeout=120)


def prompt_tokens(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def sdk_greedy(sampler, prompt: list[int], max_tokens: int) -> types.SampledSequence:
    res = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                         types.SamplingParams(max_tokens=max_tokens, temperature=0.0)).result()
    return res.sequences[0]


def new_key(server, name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tuneforge", "keys", "create", "--name", name,
                          "--data-dir", str(server.data_dir)], capture_output=True, text=True,
                         timeout=120, env=os.environ)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[1]


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return client_for(server, server.api_key)


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
    return {"alice": new_key(server, "anthropic-alice"), "bob": new_key(server, "anthropic-bob")}


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
    for _ in range(120):
        loss = tc.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
        tc.optim_step(types.AdamParams(learning_rate=3e-3)).result()
        if loss / weights.sum() < 0.03:
            break
    assert loss / weights.sum() < 0.1, f"the reply was not learnt (loss {loss})"
    path = tc.save_weights_for_sampler("anthropic-secret").result().path
    return {"path": path, "sc": sc}


def expected(tokenizer, seq: types.SampledSequence) -> tuple[str, str]:
    """The text and stop reason the Messages API should give for an SDK sample."""
    tokens = list(seq.tokens)
    if seq.stop_reason == "stop":  # the end-of-turn token ends the answer, not part of it
        tokens = tokens[:-1]
    reason = "end_turn" if seq.stop_reason == "stop" else "max_tokens"
    return tokenizer.decode(tokens, skip_special_tokens=True), reason


# ---- the base model against the SDK ----------------------------------------------------------

def test_greedy_message_equals_the_sdk_sample(client, base_sampler, tokenizer):
    prompt = prompt_tokens(tokenizer, [{"role": "system", "content": SYSTEM}, *USER])
    seq = sdk_greedy(base_sampler, prompt, 12)
    msg = client.messages.create(model=MODEL, max_tokens=12, system=SYSTEM, messages=USER,
                                 extra_body=GREEDY)
    text, reason = expected(tokenizer, seq)
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant"
    assert msg.model == MODEL
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == text
    assert msg.stop_reason == reason and msg.stop_sequence is None
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (len(prompt), len(seq.tokens))


def test_short_max_tokens_stops_with_max_tokens(client, base_sampler, tokenizer):
    seq = sdk_greedy(base_sampler, prompt_tokens(tokenizer, USER), 2)
    msg = client.messages.create(model=MODEL, max_tokens=2, messages=USER, extra_body=GREEDY)
    assert (msg.content[0].text, msg.stop_reason) == expected(tokenizer, seq)
    assert msg.usage.output_tokens == len(seq.tokens) <= 2


def test_stream_gives_the_same_message(server, client):
    whole = client.messages.create(model=MODEL, max_tokens=12, system=SYSTEM, messages=USER,
                                   extra_body=GREEDY)
    with client.messages.stream(model=MODEL, max_tokens=12, system=SYSTEM, messages=USER,
                                extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text
    assert final.content[0].text == text
    assert (final.stop_reason, final.stop_sequence) == (whole.stop_reason, None)
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.id.startswith("msg_") and final.id != whole.id


def test_concurrent_streams_all_finish_with_the_same_text(server, client, base_sampler,
                                                          tokenizer):
    whole = client.messages.create(model=MODEL, max_tokens=24, messages=USER,
                                   extra_body=GREEDY)

    def one(_: int) -> tuple[str, str]:
        with client_for(server, server.api_key).messages.stream(
                model=MODEL, max_tokens=24, messages=USER, extra_body=GREEDY) as stream:
            text = "".join(stream.text_stream)
            return text, stream.get_final_message().stop_reason

    with ThreadPoolExecutor(8) as pool:
        # a Tinker sample of the same prompt goes through the same decoder meanwhile
        sdk = pool.submit(sdk_greedy, base_sampler, prompt_tokens(tokenizer, USER), 24)
        got = list(pool.map(one, range(8)))
    assert got == [(whole.content[0].text, whole.stop_reason)] * 8
    assert expected(tokenizer, sdk.result()) == (whole.content[0].text, whole.stop_reason)


def test_stream_events_are_anthropics_sequence(server):
    body = {"model": MODEL, "max_tokens": 6, "messages": USER, "stream": True, **GREEDY}
    names, data = [], []
    with httpx.stream("POST", f"{server.base_url}/anthropic/api/v1/messages", json=body,
                      headers={"x-api-key": server.api_key}, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                names.append(line[len("event: "):])
            elif line.startswith("data: "):
                data.append(line[len("data: "):])
    assert len(names) == len(data)
    names = [n for n in names if n != "ping"]
    assert names[:2] == ["message_start", "content_block_start"]
    assert set(names[2:-3]) <= {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_system_prompt_is_rendered(client, tokenizer):
    bare = client.messages.count_tokens(model=MODEL, messages=USER).input_tokens
    with_system = client.messages.count_tokens(
        model=MODEL, messages=USER, system=[{"type": "text", "text": SYSTEM}]).input_tokens
    assert bare == len(prompt_tokens(tokenizer, USER))
    assert with_system == len(prompt_tokens(tokenizer,
                                            [{"role": "system", "content": SYSTEM}, *USER]))
    assert with_system > bare
    msg = client.messages.create(model=MODEL, max_tokens=1, system=SYSTEM, messages=USER)
    assert msg.usage.input_tokens == with_system


def test_stop_sequence_stops_the_answer(client):
    whole = client.messages.create(model=MODEL, max_tokens=16, messages=USER,
                                   extra_body=GREEDY).content[0].text
    assert len(whole) >= 6, whole
    stop = whole[3:6]
    cut = whole[:whole.find(stop)]
    msg = client.messages.create(model=MODEL, max_tokens=16, messages=USER,
                                 stop_sequences=["never-in-the-text", stop], extra_body=GREEDY)
    assert msg.content[0].text == cut
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", stop)
    with client.messages.stream(model=MODEL, max_tokens=16, messages=USER,
                                stop_sequences=[stop], extra_body=GREEDY) as stream:
        assert "".join(stream.text_stream) == cut
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)


def test_metadata_user_id_and_consecutive_turns_are_accepted(client):
    one = client.messages.create(model=MODEL, max_tokens=4, extra_body=GREEDY,
                                 messages=[{"role": "user", "content": [
                                     {"type": "text", "text": "Name"},
                                     {"type": "text", "text": "a colour."}]}])
    two = client.messages.create(model=MODEL, max_tokens=4, extra_body=GREEDY,
                                 metadata={"user_id": "user-123"},
                                 messages=[{"role": "user", "content": "Name"},
                                           {"role": "user", "content": "a colour."}])
    assert one.content[0].text == two.content[0].text
    assert one.usage.input_tokens == two.usage.input_tokens


# ---- refusals, errors, authentication -----------------------------------------------------------

@pytest.mark.parametrize("kwargs,param", [
    ({"tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "tools"),
    ({"tool_choice": {"type": "auto"}}, "tool_choice"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"service_tier": "auto"}, "service_tier"),
    ({"extra_body": {"temperature": 1.5}}, "temperature"),
    ({"extra_body": {"frequency_penalty": 0.5}}, "frequency_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop_sequences": [""]}, "stop_sequences"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "AAAA"}}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": "x"}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ye"}]},
     "messages[1].role"),
])
def test_bad_parameters_are_refused_by_name(client, kwargs, param):
    args = {"model": MODEL, "max_tokens": 4, "messages": USER, **kwargs}
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(**args)
    assert err.value.status_code == 400
    assert err.value.body["type"] == "error"
    assert err.value.body["error"]["type"] == "invalid_request_error"
    assert err.value.body["error"]["message"].startswith(param)


def test_unknown_model_is_not_found(client):
    for model in ("no/such-model", "tinker://nope:train:0/sampler_weights/x"):
        with pytest.raises(anthropic.NotFoundError) as err:
            client.messages.create(model=model, max_tokens=2, messages=USER)
        assert err.value.body["error"]["type"] == "not_found_error"
        assert model in err.value.body["error"]["message"]


def test_keys_are_checked(server):
    with pytest.raises(anthropic.AuthenticationError) as err:
        client_for(server, "tml-not-a-key").messages.create(model=MODEL, max_tokens=2,
                                                            messages=USER)
    assert err.value.body["error"]["type"] == "authentication_error"
    url = f"{server.base_url}/anthropic/api/v1/messages"
    body = {"model": MODEL, "max_tokens": 2, "messages": USER}
    assert httpx.post(url, json=body, timeout=60).status_code == 401
    for headers in ({"x-api-key": server.api_key},
                    {"Authorization": f"Bearer {server.api_key}"}):
        r = httpx.post(url, json=body, headers={**headers, "anthropic-version": "2023-06-01"},
                       timeout=120)
        assert r.status_code == 200, r.text


# ---- a trained adapter ---------------------------------------------------------------------

def test_sampler_checkpoint_answers_as_the_sdk(server, keys, memorised, tokenizer):
    alice = client_for(server, keys["alice"])
    for model in (memorised["path"], f"{MODEL};{memorised['path']}"):
        msg = alice.messages.create(model=model, max_tokens=24, messages=SECRET_Q,
                                    extra_body=GREEDY)
        assert msg.content[0].text == SECRET_A and msg.stop_reason == "end_turn"
        assert msg.model == model
    sampler = memorised["sc"].create_sampling_client(model_path=memorised["path"]).result()
    seq = sdk_greedy(sampler, prompt_tokens(tokenizer, SECRET_Q), 24)
    assert expected(tokenizer, seq) == (SECRET_A, "end_turn")
    assert msg.usage.output_tokens == len(seq.tokens)
    with alice.messages.stream(model=memorised["path"], max_tokens=24, messages=SECRET_Q,
                               extra_body=GREEDY) as stream:
        assert "".join(stream.text_stream) == SECRET_A
    base = alice.messages.create(model=MODEL, max_tokens=24, messages=SECRET_Q,
                                 extra_body=GREEDY)
    assert base.content[0].text != SECRET_A
    assert alice.messages.count_tokens(model=memorised["path"], messages=SECRET_Q
                                       ).input_tokens == len(prompt_tokens(tokenizer, SECRET_Q))


def test_models_list_the_keys_checkpoints(server, keys, memorised):
    alice, bob = client_for(server, keys["alice"]), client_for(server, keys["bob"])
    mine = [m.id for m in alice.models.list()]
    theirs = [m.id for m in bob.models.list()]
    assert MODEL in mine and MODEL in theirs
    assert memorised["path"] in mine and memorised["path"] not in theirs
    info = alice.models.retrieve(memorised["path"])
    assert (info.id, info.type) == (memorised["path"], "model")
    first = alice.models.list(limit=1)
    assert [m.id for m in first.data] == mine[:1] and first.has_more == (len(mine) > 1)
    assert [m.id for m in alice.models.list(limit=1000, after_id=mine[0])] == mine[1:]
    with pytest.raises(anthropic.BadRequestError) as err:
        alice.models.list(limit=0)
    assert err.value.body["error"]["message"].startswith("limit")


def test_another_key_sees_no_checkpoint(server, keys, memorised):
    bob = client_for(server, keys["bob"])
    with pytest.raises(anthropic.NotFoundError) as err:
        bob.messages.create(model=memorised["path"], max_tokens=4, messages=SECRET_Q)
    assert err.value.body == {"type": "error", "error": {
        "type": "not_found_error",
        "message": f"The model `{memorised['path']}` does not exist or you do not have access "
                   "to it."}}
    with pytest.raises(anthropic.NotFoundError):
        bob.messages.count_tokens(model=memorised["path"], messages=SECRET_Q)
    with pytest.raises(anthropic.NotFoundError):
        bob.models.retrieve(memorised["path"])
    with pytest.raises(anthropic.NotFoundError):
        with bob.messages.stream(model=memorised["path"], max_tokens=4,
                                 messages=SECRET_Q) as stream:
            "".join(stream.text_stream)


# ---- the README example ----------------------------------------------------------------------

def test_readme_example_runs_without_warnings(server):
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(),
                        flags=re.S | re.M)
    example = next(b for b in blocks if "import anthropic" in b or "from anthropic" in b)
    example = example.replace("http://127.0.0.1:8000", server.base_url)
    example = example.replace('"tml-..."', repr(server.api_key))
    proc = subprocess.run([sys.executable, "-W", "error", "-c", example], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=os.environ)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    assert proc.stdout.strip(), "the example printed nothing"
