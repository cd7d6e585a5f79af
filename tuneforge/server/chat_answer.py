"""Sampled tokens → OpenAI chat answers: the text, per-token logprobs, the completion object and
its stream chunks.

The text is detokenized incrementally (as vLLM does): each token gets the text it adds to the
answer decoded with a few tokens before it, a token that ends inside a multi-byte character adds
nothing until a later token completes the character. So the pieces concatenate to the content,
the streamed deltas to the non-streamed answer, and each logprob entry lines up with its delta.
Special tokens are left out of the text (as `skip_special_tokens=True`) but keep their names in
the logprob entries.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.server.chat import PreparedChat

CONTEXT_TOKENS = 5  # prompt tokens decoded before the answer, so its first word keeps its space


@dataclass
class Choice:
    index: int
    tokens: list[int]  # the answer's tokens (without the end-of-turn token or a stop string)
    pieces: list[str]  # each token's share of `content`
    logprobs: list[float]
    top: list[list[tuple[int, float]]]  # per token: (id, logprob) of the top_logprobs tokens
    content: str
    finish_reason: str  # "stop" | "length"
    sampled: int  # tokens sampled, all counted in usage


def choices(tokenizer, chat: PreparedChat, seqs: list[dict]) -> list[Choice]:
    context = chat.sample.prompt[-CONTEXT_TOKENS:]
    stops = chat.request.stop_strings()
    out = []
    for index, seq in enumerate(seqs):
        tokens, lps = list(seq["tokens"]), list(seq["logprobs"])
        top = [list(zip(ids, vals, strict=True))
               for ids, vals in zip(seq["topk_ids"], seq["topk_logprobs"], strict=True)]
        sampled = len(tokens)
        if seq["stop_reason"] == "stop" and tokens and tokens[-1] in chat.end_ids:
            tokens, lps, top = tokens[:-1], lps[:-1], top[:-1]
        pieces = detokenize(tokenizer, context, tokens)
        text = "".join(pieces)
        cut = min((at for s in stops if (at := text.find(s)) >= 0), default=None)
        if cut is not None:
            keep, start = 0, 0
            while keep < len(pieces) and start < cut:
                start += len(pieces[keep])
                keep += 1
            tokens, lps, top, pieces = tokens[:keep], lps[:keep], top[:keep], pieces[:keep]
            if pieces:
                pieces[-1] = pieces[-1][:len(pieces[-1]) - (start - cut)]
            text = text[:cut]
        finish = "stop" if seq["stop_reason"] == "stop" or cut is not None else "length"
        out.append(Choice(index, tokens, pieces, lps, top if top else [[] for _ in tokens], text,
                          finish, sampled))
    return out


def detokenize(tokenizer, context: list[int], tokens: list[int]) -> list[str]:
    """Each token's share of the decoded text of `tokens` (decoded after `context`)."""
    ids = list(context) + list(tokens)
    prefix, read = 0, len(context)
    pieces = []
    for i in range(len(context), len(ids)):
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=True)
        after = tokenizer.decode(ids[prefix:i + 1], skip_special_tokens=True)
        last = i + 1 == len(ids)
        if len(after) > len(before) and (last or not after.endswith("\ufffd")):
            pieces.append(after[len(before):])
            prefix, read = read, i + 1
        else:
            pieces.append("")
    return pieces


def _entry(tokenizer, token: int, logprob: float) -> dict:
    text = tokenizer.decode([token], skip_special_tokens=False)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def logprob_entries(tokenizer, choice: Choice) -> list[dict]:
    return [{**_entry(tokenizer, t, lp),
             "top_logprobs": [_entry(tokenizer, i, v) for i, v in top]}
            for t, lp, top in zip(choice.tokens, choice.logprobs, choice.top, strict=True)]


def usage(chat: PreparedChat, answer: list[Choice]) -> dict:
    prompt, completion = len(chat.sample.prompt), sum(c.sampled for c in answer)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def completion(tokenizer, chat: PreparedChat, answer: list[Choice]) -> dict:
    """OpenAI's `chat.completion` object."""
    want_lp = bool(chat.request.logprobs)
    return {
        "id": chat.completion_id, "object": "chat.completion", "created": chat.created,
        "model": chat.model.name,
        "choices": [{
            "index": c.index,
            "message": {"role": "assistant", "content": c.content},
            "finish_reason": c.finish_reason,
            "logprobs": {"content": logprob_entries(tokenizer, c)} if want_lp else None,
        } for c in answer],
        "usage": usage(chat, answer),
    }


def _chunk(chat: PreparedChat, choices_: list[dict], with_usage: dict | None = None) -> dict:
    out = {"id": chat.completion_id, "object": "chat.completion.chunk",
           "created": chat.created, "model": chat.model.name, "choices": choices_}
    if chat.request.include_usage:
        out["usage"] = with_usage
    return out


def opening_chunks(chat: PreparedChat) -> list[dict]:
    """The first chunk of every choice: the role, before any content."""
    return [_chunk(chat, [{"index": i, "delta": {"role": "assistant", "content": ""},
                           "logprobs": None, "finish_reason": None}])
            for i in range(chat.request.num_choices)]


def content_chunks(tokenizer, chat: PreparedChat, answer: list[Choice]) -> list[dict]:
    """One chunk per answer token (its text delta and logprob entry), each choice's closing
    chunk with its finish reason, and the usage chunk when `stream_options.include_usage`."""
    want_lp = bool(chat.request.logprobs)
    out = []
    for c in answer:
        entries = logprob_entries(tokenizer, c) if want_lp else [None] * len(c.tokens)
        for piece, entry in zip(c.pieces, entries, strict=True):
            if not piece and entry is None:
                continue
            out.append(_chunk(chat, [{"index": c.index, "delta": {"content": piece},
                                      "logprobs": {"content": [entry]} if entry else None,
                                      "finish_reason": None}]))
        out.append(_chunk(chat, [{"index": c.index, "delta": {}, "logprobs": None,
                                  "finish_reason": c.finish_reason}]))
    if chat.request.include_usage:
        out.append(_chunk(chat, [], usage(chat, answer)))
    return out
