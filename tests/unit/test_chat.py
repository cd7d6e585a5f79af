"""Chat API pieces that need no server: request parsing, end-of-turn detection, detokenizing
into per-token pieces, stop strings and end tokens cut from the answer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tuneforge.engine.sampler import SampleRequest, SamplingParams, TokenDelta
from tuneforge.server import chat, chat_answer, chat_request

MODEL = "tuneforge/tiny-qwen3"
TEXT = "Grüße, 世界! 🦊 done"


@pytest.fixture(scope="module")
def tokenizer(registry):
    return AutoTokenizer.from_pretrained(str(registry.resolve(MODEL)))


def test_pieces_concatenate_and_wait_for_whole_characters(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = chat_answer.detokenize(tokenizer, tokenizer.encode("user\n"), ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == TEXT == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    # the fox emoji is several byte-level tokens; only the one that completes it carries it
    fox = [i for i, p in enumerate(pieces) if "🦊" in p]
    assert len(fox) == 1
    assert len(tokenizer.encode(" 🦊", add_special_tokens=False)) > 1
    assert pieces[fox[0] - 1] == ""


def test_end_of_turn_is_read_from_the_template(tokenizer, registry):
    base = registry.get(MODEL)
    assert chat.end_of_turn_ids(tokenizer, base) == {tokenizer.convert_tokens_to_ids("<|im_end|>")}


def prepared(tokenizer, **body) -> chat.PreparedChat:
    req = chat_request.parse({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              **body})
    params = SamplingParams(max_tokens=32, stop_strings=req.stop_strings())
    return chat.PreparedChat(
        request=req, model=chat.ChatModel(MODEL, MODEL, None, "s", ""),
        sample=SampleRequest(prompt=tokenizer.encode("user\n"), num_samples=1, params=params),
        end_ids=frozenset({2}), tokenizer_dir="", completion_id="c", created=0)


def seq(tokens: list[int], stop_reason: str) -> dict:
    return {"tokens": tokens, "logprobs": [-float(i) for i in range(len(tokens))],
            "stop_reason": stop_reason, "topk_ids": [], "topk_logprobs": []}


def test_end_token_and_stop_string_are_cut(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    ended = chat_answer.choices(tokenizer, prepared(tokenizer), [seq(ids + [2], "stop")])[0]
    assert (ended.content, ended.finish_reason, ended.sampled) == (TEXT, "stop", len(ids) + 1)
    assert ended.tokens == ids and len(ended.logprobs) == len(ids)

    cut = chat_answer.choices(tokenizer, prepared(tokenizer, stop=["世界"]),
                              [seq(ids, "stop")])[0]
    assert cut.content == "Grüße, " and cut.finish_reason == "stop"
    assert "".join(cut.pieces) == cut.content
    assert tokenizer.decode(cut.tokens).startswith(cut.content)
    assert len(cut.logprobs) == len(cut.tokens) < len(ids)

    long = chat_answer.choices(tokenizer, prepared(tokenizer), [seq(ids, "length")])[0]
    assert (long.content, long.finish_reason) == (TEXT, "length")


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"presence_penalty": 1}, "presence_penalty"),
    ({"no_such_option": 1}, "no_such_option"),
    ({"messages": [{"role": "user", "content": "x", "name": "n"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
     "messages[0].content"),
    ({"stop": ["a", ""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"seed": True}, "seed"),
    ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"top_k": 0}, "top_k"),
])
def test_refusals_name_the_parameter(body, param):
    with pytest.raises(chat_request.InvalidParam) as err:
        chat_request.parse({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                            **body})
    assert err.value.param == param


def test_off_values_and_text_parts_are_accepted():
    req = chat_request.parse({
        "model": MODEL, "presence_penalty": 0, "tools": [], "tool_choice": None,
        "response_format": {"type": "text"}, "max_completion_tokens": 7,
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "a"},
                                                  {"type": "text", "text": "b"}]}]})
    assert req.max_new_tokens() == 7
    assert req.template_messages() == [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": "a\nb"}]


# ---- live streaming ---------------------------------------------------------------------------

def _deltas(ids: list[int], reason: str) -> list[TokenDelta]:
    return [TokenDelta(0, t, -0.5, None, None, reason if i == len(ids) - 1 else None)
            for i, t in enumerate(ids)]


@pytest.mark.parametrize("stops", [(), ("世界",), ("🦊",), ("done",), ("Grüße, 世界!x",),
                                   ("e, ", "!"), (" done",)])
def test_text_stream_releases_what_the_answer_holds(tokenizer, stops):
    """Fed token by token, the releases concatenate to the non-streamed content, never show
    the beginning of a stop string before it is known not to be one, and carry its tokens."""
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    p = prepared(tokenizer, stop=list(stops))
    for tail, why in ((ids, "length"), (ids + [2], "stop")):  # 2: the end token of `prepared`
        want = chat_answer.choices(tokenizer, p, [seq(tail, why)])[0]
        ts = chat_answer.TextStream(tokenizer, p.sample.prompt[-5:], p.end_ids, tuple(stops))
        text, tokens = "", []
        for d in _deltas(tail, why):
            r = ts.feed(d)
            if r is None:
                continue
            text += r.text
            tokens += [t for t, _, _ in r.tokens]
            assert not any(s in text for s in stops)
            if not ts.finished:  # nothing released could begin a stop string
                assert not any(text.endswith(s[:k]) for s in stops for k in range(1, len(s)))
        assert text == want.content
        assert tokens == want.tokens
        assert ts.finish_reason == want.finish_reason


def test_decoder_streams_tokens_and_drops_a_cancelled_request(registry):
    """The decoder pushes each step's tokens to a streaming request's listener (the same
    tokens as its result), and a cancelled stream's rows leave the batch at the next step."""
    from tuneforge.engine import decoder
    from tuneforge.scheduler.futures import TokenStream

    base = registry.get(MODEL)
    params = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=frozenset())
    live, cancel = TokenStream(), TokenStream()
    dec = decoder.Decoder(base, max_rows=8)
    dec.admit("a", None, SampleRequest(prompt=[1, 2, 3], num_samples=2, params=params,
                                       topk_sample_logprobs=2, stream=live))
    dec.admit("b", None, SampleRequest(prompt=[4, 5], num_samples=1, params=params,
                                       stream=cancel))
    dec.admit("c", None, SampleRequest(prompt=[6], num_samples=1, params=params))
    done = {}
    for step in range(20):
        if step == 2:
            cancel.cancel()
        done.update(dec.step())
        if not dec.pending:
            break
    got = live.get(0)
    for i in (0, 1):
        mine = [d for d in got if d.index == i]
        assert [d.token for d in mine] == done["a"].sequences[i].tokens
        assert [d.logprob for d in mine] == done["a"].sequences[i].logprobs
        assert all(len(d.topk_ids) == 2 for d in mine)
        assert [d.stop_reason for d in mine] == [None] * 11 + ["length"]
    assert len(done["b"].sequences[0].tokens) == 3  # steps 0-2, then it left
    assert len(done["c"].sequences[0].tokens) == 12
    assert live.steps == 12 and cancel.steps == 3
    live.close()
    assert live.get(0) is None
