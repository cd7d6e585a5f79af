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

from dataclasses import dataclass, field

from tuneforge.engine.sampler import TokenDelta
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
    before = tokenizer.decode(ids[prefix:read], skip_special_tokens=True)
    pieces = []
    for i in range(len(context), len(ids)):
        after = tokenizer.decode(ids[prefix:i + 1], skip_special_tokens=True)
        last = i + 1 == len(ids)
        if len(after) > len(before) and (last or not after.endswith("\ufffd")):
            pieces.append(after[len(before):])
            prefix, read = read, i + 1
            before = tokenizer.decode(ids[prefix:read], skip_special_tokens=True)
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


# ---- live streaming ---------------------------------------------------------------------------

@dataclass
class Released:
    """What one choice's stream releases at once: text, and the tokens it came from."""

    text: str
    tokens: list[tuple[int, float, list[tuple[int, float]]]]  # (id, logprob, top (id, logprob))
    finish_reason: str | None = None  # on the choice's last release: "stop" | "length"
    offsets: list[int] = field(default_factory=list)  # each token's text offset in the answer


@dataclass
class TextStream:
    """One choice's answer text, released as its tokens arrive from the decoder.

    Detokenized incrementally as `detokenize` does (a token that ends inside a multi-byte
    character adds nothing until the character is complete); the end-of-turn token is left out;
    text that could be the beginning of a stop string is held back until it is known not to be,
    and the text from a stop string on is never released. So the releases concatenate to the
    non-streamed answer's content, and their tokens to its logprob entries.
    """

    tokenizer: object
    context: list[int]  # prompt tokens decoded before the answer
    end_ids: frozenset[int]
    stops: tuple[str, ...]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` released
    finish_reason: str | None = None
    _prefix: int = 0
    _read: int = 0
    _before: str | None = None  # the decoded ids[_prefix:_read]
    _held: list[tuple[int, float, list[tuple[int, float]], int, int]] = field(
        default_factory=list)  # tokens not released yet, with their piece's (start, end)
    sampled: int = 0

    def __post_init__(self) -> None:
        self.ids = list(self.context)
        self._prefix = 0
        self._read = len(self.ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, delta: TokenDelta) -> Released | None:
        """Take the choice's next token; what may be released now (None if nothing)."""
        if self.finished:
            return None
        self.sampled += 1
        last = delta.stop_reason is not None
        if not (last and delta.stop_reason == "stop" and delta.token in self.end_ids):
            top = list(zip(delta.topk_ids or [], delta.topk_logprobs or [], strict=True))
            start = len(self.text)
            self.text += self._piece(delta.token, last)
            self._held.append((delta.token, delta.logprob, top, start, len(self.text)))
        elif last:
            self.text += self._flush()
            if self._held:  # the flushed text belongs to the last real token
                t, lp, top, start, _ = self._held[-1]
                self._held[-1] = (t, lp, top, start, len(self.text))
        cut = min((at for s in self.stops if (at := self.text.find(s)) >= 0), default=None)
        if cut is not None:
            self.finish_reason = "stop"
            return self._release(cut, final=True)
        if last:
            self.finish_reason = delta.stop_reason
            return self._release(len(self.text), final=True)
        return self._release(len(self.text) - self._hold_back(), final=False)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _piece(self, token: int, last: bool) -> str:
        self.ids.append(token)
        if self._before is None:
            self._before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        before = self._before
        if len(after) > len(before) and (last or not after.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self.ids)
            self._before = None
            return after[len(before):]
        return ""

    def _flush(self) -> str:
        """Text of tokens still waiting for the rest of a character (the answer has ended)."""
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        self._before = None
        return after[len(before):] if len(after) > len(before) else ""

    def _hold_back(self) -> int:
        """How many trailing characters could begin a stop string."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _release(self, upto: int, final: bool) -> Released | None:
        upto = max(upto, self.sent)
        out, offsets = [], []
        while self._held:
            t, lp, top, start, end = self._held[0]
            # as `choices` keeps the tokens that begin before a stop string's cut
            if final and start < upto or not final and (end <= upto and (end > start
                                                                         or start < upto)):
                out.append((t, lp, top))
                offsets.append(min(start, upto))
                self._held.pop(0)
            else:
                break
        if final:
            self._held = []
        text, self.sent = self.text[self.sent:upto], upto
        if not text and not out and not final:
            return None
        return Released(text, out, self.finish_reason if final else None, offsets)


class StreamChunks:
    """A chat completion's stream chunks, made as the decoder's tokens arrive."""

    def __init__(self, tokenizer, chat: PreparedChat) -> None:
        self.tokenizer, self.chat = tokenizer, chat
        context = chat.sample.prompt[-CONTEXT_TOKENS:]
        self.texts = [TextStream(tokenizer, context, chat.end_ids, chat.request.stop_strings())
                      for _ in range(chat.request.num_choices)]

    def opening(self) -> list[dict]:
        return opening_chunks(self.chat)

    def feed(self, deltas: list[TokenDelta]) -> list[dict]:
        """One chunk per choice that released text or tokens, then the closing chunk of each
        choice that ended."""
        released: dict[int, list[Released]] = {}
        for d in deltas:
            if (r := self.texts[d.index].feed(d)) is not None:
                released.setdefault(d.index, []).append(r)
        want_lp = bool(self.chat.request.logprobs)
        out = []
        for index, rs in released.items():
            text = "".join(r.text for r in rs)
            tokens = [t for r in rs for t in r.tokens]
            if text or (want_lp and tokens):
                entries = [{**_entry(self.tokenizer, t, lp),
                            "top_logprobs": [_entry(self.tokenizer, i, v) for i, v in top]}
                           for t, lp, top in tokens] if want_lp else None
                out.append(_chunk(self.chat, [{"index": index, "delta": {"content": text},
                                               "logprobs": {"content": entries} if want_lp
                                               else None, "finish_reason": None}]))
            if rs[-1].finish_reason is not None:
                out.append(_chunk(self.chat, [{"index": index, "delta": {}, "logprobs": None,
                                               "finish_reason": rs[-1].finish_reason}]))
        return out

    def closing(self, seqs: list[dict]) -> list[dict]:
        """After the last token: the usage chunk when `stream_options.include_usage`."""
        if not self.chat.request.include_usage:
            return []
        prompt = len(self.chat.sample.prompt)
        completion = sum(len(s["tokens"]) for s in seqs)
        return [_chunk(self.chat, [], {"prompt_tokens": prompt, "completion_tokens": completion,
                                       "total_tokens": prompt + completion})]


# ---- legacy completions -----------------------------------------------------------------------

def legacy_logprobs(tokenizer, tokens: list[tuple[int, float, list[tuple[int, float]]]],
                    offsets: list[int]) -> dict:
    """The legacy `logprobs` object: token strings, their logprobs, the top alternatives (with
    the sampled token, as OpenAI's), and each token's character offset in the text."""
    def name(t: int) -> str:
        return tokenizer.decode([t], skip_special_tokens=False)

    tops = []
    for t, lp, top in tokens:
        entry = {name(i): v for i, v in top}
        entry.setdefault(name(t), lp)
        tops.append(entry)
    return {"tokens": [name(t) for t, _, _ in tokens],
            "token_logprobs": [lp for _, lp, _ in tokens], "top_logprobs": tops,
            "text_offset": list(offsets)}


def _choice_tokens(c: Choice) -> tuple[list, list[int]]:
    offsets, at = [], 0
    for piece in c.pieces:
        offsets.append(at)
        at += len(piece)
    return list(zip(c.tokens, c.logprobs, c.top, strict=True)), offsets


def text_completion(tokenizer, prepared: list[PreparedChat],
                    answers: list[list[Choice]]) -> dict:
    """OpenAI's `text_completion` object; choice `i * n + j` is prompt i's j-th sample."""
    first = prepared[0]
    want_lp = first.request.logprobs is not None
    n = first.request.num_choices
    choices_ = []
    for i, answer in enumerate(answers):
        for c in answer:
            choices_.append({"index": i * n + c.index, "text": c.content,
                             "logprobs": legacy_logprobs(tokenizer, *_choice_tokens(c))
                             if want_lp else None, "finish_reason": c.finish_reason})
    prompt = sum(len(p.sample.prompt) for p in prepared)
    completion_ = sum(c.sampled for a in answers for c in a)
    return {"id": first.completion_id, "object": "text_completion", "created": first.created,
            "model": first.model.name, "choices": choices_,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion_,
                      "total_tokens": prompt + completion_}}


class CompletionChunks:
    """A legacy completion's stream chunks for one of its prompts (number `which`)."""

    def __init__(self, tokenizer, chat: PreparedChat, which: int) -> None:
        self.tokenizer, self.chat = tokenizer, chat
        self.first_index = which * chat.request.num_choices
        context = chat.sample.prompt[-CONTEXT_TOKENS:]
        self.texts = [TextStream(tokenizer, context, chat.end_ids, chat.request.stop_strings())
                      for _ in range(chat.request.num_choices)]
        self.include_usage = chat.request.include_usage

    def _chunk(self, choices_: list[dict], with_usage: dict | None = None) -> dict:
        out = {"id": self.chat.completion_id, "object": "text_completion",
               "created": self.chat.created, "model": self.chat.model.name, "choices": choices_}
        if self.include_usage:
            out["usage"] = with_usage
        return out

    def feed(self, deltas: list[TokenDelta]) -> list[dict]:
        released: dict[int, list[Released]] = {}
        for d in deltas:
            if (r := self.texts[d.index].feed(d)) is not None:
                released.setdefault(d.index, []).append(r)
        want_lp = self.chat.request.logprobs is not None
        out = []
        for index, rs in released.items():
            text = "".join(r.text for r in rs)
            tokens = [t for r in rs for t in r.tokens]
            offsets = [o for r in rs for o in r.offsets]
            if text or (want_lp and tokens):
                out.append(self._chunk([{
                    "index": self.first_index + index, "text": text,
                    "logprobs": legacy_logprobs(self.tokenizer, tokens, offsets)
                    if want_lp else None, "finish_reason": None}]))
            if rs[-1].finish_reason is not None:
                out.append(self._chunk([{"index": self.first_index + index, "text": "",
                                         "logprobs": None,
                                         "finish_reason": rs[-1].finish_reason}]))
        return out

    def usage_chunk(self, prepared: list[PreparedChat], seqs: list[list[dict]]) -> list[dict]:
        if not self.include_usage:
            return []
        prompt = sum(len(p.sample.prompt) for p in prepared)
        completion_ = sum(len(s["tokens"]) for ss in seqs for s in ss)
        return [self._chunk([], {"prompt_tokens": prompt, "completion_tokens": completion_,
                                 "total_tokens": prompt + completion_})]
