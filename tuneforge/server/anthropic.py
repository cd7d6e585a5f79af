"""Anthropic Messages requests and answers over the OpenAI chat machinery (the routes are
`routes/anthropic.py`).

A Messages request is translated into the `ChatRequest` that server/chat.py serves, so the model
is resolved (a base model, `tinker://RUN/sampler_weights/NAME` owner-scoped, or
`BASE;tinker://...`), the chat template rendered, and the request decoded in the same continuous
batch as Tinker `sample` calls, exactly as for the OpenAI endpoint. Only the framing differs.

Served: `model`, `max_tokens` (required), `messages` (roles user and assistant; content a string
or a list of text blocks, joined with newlines; consecutive turns of one role are combined into
one turn, as Anthropic does), `system` (a string or text blocks, rendered as the template's
system message), `temperature` (0 to 1, as Anthropic; 0 is greedy), `top_p`, `top_k`,
`stop_sequences`, `stream`, and `metadata.user_id` (an end-user id for the caller's records; it
changes nothing). Every other parameter (`tools`, `tool_choice`, `thinking`, `cache_control`,
`output_config`, `service_tier`, ...) is refused with a 400 naming it, as are image, document,
tool and thinking content blocks. A conversation that ends with an assistant turn (Anthropic's
"prefill") is refused too: the prompt is rendered with the template's generation prompt, which
would start a new turn rather than continue that one (Anthropic itself answers 400 on models
without prefill).

Answers: `stop_reason` is "end_turn" when the model wrote its end-of-turn or EOS token,
"stop_sequence" (with `stop_sequence` the string matched; the text stops before it) or
"max_tokens"; `usage.output_tokens` counts every sampled token, the end-of-turn token included.
`GET /models` lists the same models as the OpenAI endpoint's, as Anthropic `ModelInfo` pages.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneforge.server import chat, chat_answer
from tuneforge.server.chat_request import (
    MAX_STOP_STRINGS,
    ChatRequest,
    InvalidParam,
    UnsupportedParam,
)
from tuneforge.server.state import ServerState

# Anthropic Messages parameters that are known but not served (anything else is "unknown").
_NOT_SERVED = {
    "tools", "tool_choice", "thinking", "cache_control", "container", "diagnostics",
    "inference_geo", "output_config", "output_format", "service_tier", "speed", "mcp_servers",
    "context_management", "user_profile_id", "workspace_id", "betas",
}
_TEXT_ONLY = ("only text content blocks are served here (image, document, tool_use, "
              "tool_result, thinking and other blocks are not supported)")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    citations: None = None  # sent as null by some clients


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[TextBlock]

    def texts(self) -> list[str]:
        return [self.content] if isinstance(self.content, str) else [b.text for b in self.content]


class Metadata(_Strict):
    user_id: str | None = Field(None, max_length=256)


class MessagesRequest(_Strict):
    model: str = Field(min_length=1, max_length=2048)
    max_tokens: int
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    temperature: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    metadata: Metadata | None = None


class CountTokensRequest(_Strict):
    model: str = Field(min_length=1, max_length=2048)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None


@dataclass
class PreparedMessage:
    request: MessagesRequest
    chat: chat.PreparedChat
    message_id: str


# ---- requests ---------------------------------------------------------------------------------

def parse(body: dict, model: type[_Strict] = MessagesRequest) -> _Strict:
    """Validate a Messages (or count_tokens) body; errors name the parameter."""
    for name, value in body.items():
        if name in model.model_fields or value is None and name in _NOT_SERVED:
            continue
        if name in MessagesRequest.model_fields:
            raise UnsupportedParam(f"{name}: count_tokens takes no {name}", name)
        if name in _NOT_SERVED:
            raise UnsupportedParam(f"{name}: this parameter is not supported by this server",
                                   name)
        raise UnsupportedParam(f"{name}: Extra inputs are not permitted", name)
    messages = body.get("messages")
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        content = m.get("content") if isinstance(m, dict) else None
        _check_blocks(content, f"messages[{i}].content")
    _check_blocks(body.get("system"), "system")
    try:
        req = model.model_validate({k: v for k, v in body.items() if k in model.model_fields})
    except ValidationError as e:
        raise _param_error(e) from None
    last = len(req.messages) - 1
    if req.messages[last].role == "assistant":
        raise InvalidParam(f"messages[{last}].role: the conversation ends with an assistant "
                           "turn (prefill), which this server does not support; end it with "
                           "a user turn", f"messages[{last}].role")
    stops = getattr(req, "stop_sequences", None) or []
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidParam(f"stop_sequences: at most {MAX_STOP_STRINGS} stop sequences, got "
                           f"{len(stops)}", "stop_sequences")
    if any(s == "" for s in stops):
        raise InvalidParam("stop_sequences: stop sequences must not be empty", "stop_sequences")
    return req


def _check_blocks(content: object, where: str) -> None:
    if not isinstance(content, list):
        return
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if isinstance(kind, str) and kind != "text":
            raise UnsupportedParam(f"{where}[{j}].type: {kind!r} blocks are not supported; "
                                   f"{_TEXT_ONLY}", f"{where}[{j}].type")
        if isinstance(block, dict) and block.get("cache_control") is not None:
            raise UnsupportedParam(f"{where}[{j}].cache_control: prompt caching is not "
                                   "supported by this server", f"{where}[{j}].cache_control")


def _param_error(e: ValidationError) -> InvalidParam:
    errors = e.errors()
    # a list given for a string-or-blocks field: report the blocks' problem, not "not a string"
    err = next((x for x in errors if tuple(x.get("loc", ()))[-1:] != ("str",)), errors[0])
    loc = [str(p) for p in err.get("loc", ())]
    # a union adds the member type to the location ("str", "list[TextBlock]"): cut after it
    for union in ("content", "system"):
        if union in loc:
            at = loc.index(union)
            loc = loc[:at + 1] + loc[at + 2:]
            break
    param = "".join(f"[{p}]" if p.isdigit() else (f".{p}" if i else p) for i, p in enumerate(loc))
    if err["type"] == "extra_forbidden":
        return UnsupportedParam(f"{param}: Extra inputs are not permitted", param)
    if loc and loc[-1] in ("content", "system"):
        return InvalidParam(f"{param}: must be a string or a list of "
                            f'{{"type": "text", "text": ...}} blocks; {_TEXT_ONLY}', param)
    return InvalidParam(f"{param}: {err['msg']}", param)


def template_messages(req: MessagesRequest | CountTokensRequest) -> list[dict]:
    """The conversation as `ChatRequest` messages: the system prompt first, consecutive turns
    of one role combined into one."""
    out: list[dict] = []
    system = [req.system] if isinstance(req.system, str) else [b.text for b in req.system or []]
    if any(system):
        out.append({"role": "system", "content": [{"type": "text", "text": t} for t in system]})
    for m in req.messages:
        parts = [{"type": "text", "text": t} for t in m.texts()]
        if out and out[-1]["role"] == m.role:
            out[-1]["content"] += parts
        else:
            out.append({"role": m.role, "content": parts})
    return out


def chat_request(req: MessagesRequest) -> ChatRequest:
    return ChatRequest.model_validate({
        "model": req.model, "messages": template_messages(req), "max_tokens": req.max_tokens,
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
        "stop": list(req.stop_sequences) if req.stop_sequences else None,
        "stream": req.stream,
    })


def prepare(state: ServerState, owner: str, req: MessagesRequest) -> PreparedMessage:
    """Resolve the model, render the prompt and build the engine request (on a request thread)."""
    prepared = chat.prepare(state, owner, chat_request(req))
    return PreparedMessage(req, prepared, f"msg_{uuid.uuid4().hex[:24]}")


def count_tokens(state: ServerState, owner: str, req: CountTokensRequest) -> int:
    """The length of the rendered prompt, generation prompt included."""
    target = chat.resolve_model(state, owner, req.model)
    base = state.registry.card(target.base_model)
    tokenizer = chat.tokenizer_for(str(base.tokenizer_dir))
    flat = ChatRequest.model_validate({"model": req.model, "messages": template_messages(req)})
    return len(chat.render_prompt(tokenizer, base, flat.template_messages()))


# ---- models -----------------------------------------------------------------------------------

MAX_MODELS_PAGE = 1000  # Anthropic's bound on `limit`


def model_info(entry: dict) -> dict:
    """An entry of `chat.list_models` as Anthropic's `ModelInfo`."""
    created = dt.datetime.fromtimestamp(entry["created"], dt.UTC).isoformat().replace("+00:00",
                                                                                        "Z")
    info = {"type": "model", "id": entry["id"], "display_name": entry["id"],
            "created_at": created, "lifecycle": "active"}
    if "max_model_len" in entry:
        info["max_input_tokens"] = entry["max_model_len"]
    return info


def models_page(state: ServerState, owner: str, limit: int = 20, after_id: str | None = None,
                before_id: str | None = None) -> dict:
    """One page of the models this key may use (served bases, then its sampler checkpoints),
    with Anthropic's cursor fields."""
    if not 1 <= limit <= MAX_MODELS_PAGE:
        raise InvalidParam(f"limit: must be between 1 and {MAX_MODELS_PAGE}, got {limit}",
                           "limit")
    if after_id is not None and before_id is not None:
        raise InvalidParam("before_id: send before_id or after_id, not both", "before_id")
    ids = [model_info(e) for e in chat.list_models(state, owner)]
    names = [m["id"] for m in ids]
    for name, cursor in (("after_id", after_id), ("before_id", before_id)):
        if cursor is not None and cursor not in names:
            raise InvalidParam(f"{name}: {cursor!r} is not one of your models", name)
    if before_id is not None:
        end = names.index(before_id)
        page, more = ids[max(0, end - limit):end], end - limit > 0
    else:
        start = names.index(after_id) + 1 if after_id is not None else 0
        page, more = ids[start:start + limit], start + limit < len(ids)
    return {"data": page, "has_more": more, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None}


# ---- answers ----------------------------------------------------------------------------------

@dataclass
class Answer:
    text: str
    stop_reason: str  # "end_turn" | "stop_sequence" | "max_tokens"
    stop_sequence: str | None
    input_tokens: int
    output_tokens: int


def stop_of(finish_reason: str, text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """Anthropic's (stop_reason, stop_sequence) for an OpenAI-style finish reason, given the
    answer's text before any stop-sequence cut."""
    if finish_reason != "stop":
        return "max_tokens", None
    cut = min((at for s in stops if (at := text.find(s)) >= 0), default=None)
    if cut is None:
        return "end_turn", None
    return "stop_sequence", next(s for s in stops if text.find(s) == cut)


def answer(tokenizer, msg: PreparedMessage, seqs: list[dict]) -> Answer:
    prepared = msg.chat
    (choice,) = chat_answer.choices(tokenizer, prepared, seqs)
    reason, matched = "max_tokens", None
    if choice.finish_reason == "stop":
        tokens = list(seqs[0]["tokens"])
        if seqs[0]["stop_reason"] == "stop" and tokens[-1:] and tokens[-1] in prepared.end_ids:
            tokens = tokens[:-1]
        uncut = "".join(chat_answer.detokenize(
            tokenizer, prepared.sample.prompt[-chat_answer.CONTEXT_TOKENS:], tokens))
        reason, matched = stop_of("stop", uncut, prepared.request.stop_strings())
    return Answer(choice.content, reason, matched, len(prepared.sample.prompt), choice.sampled)


def message(msg: PreparedMessage, ans: Answer) -> dict:
    """Anthropic's `message` object."""
    return {"id": msg.message_id, "type": "message", "role": "assistant",
            "model": msg.request.model, "content": [{"type": "text", "text": ans.text}],
            "stop_reason": ans.stop_reason, "stop_sequence": ans.stop_sequence,
            "usage": {"input_tokens": ans.input_tokens, "output_tokens": ans.output_tokens}}


# ---- streaming events -------------------------------------------------------------------------

Event = tuple[str, dict]  # (the SSE `event:` name, its data)
PING: Event = ("ping", {"type": "ping"})


class MessageEvents:
    """A message's stream events, made as the decoder's tokens arrive: the text released by
    `chat_answer.TextStream` (end-of-turn token dropped, stop sequences held back and cut), so
    the text deltas concatenate to the non-streamed message's text."""

    def __init__(self, tokenizer, msg: PreparedMessage) -> None:
        self.msg = msg
        prepared = msg.chat
        self.text = chat_answer.TextStream(
            tokenizer, prepared.sample.prompt[-chat_answer.CONTEXT_TOKENS:], prepared.end_ids,
            prepared.request.stop_strings())

    def opening(self) -> list[Event]:
        """message_start (an empty message with the prompt's usage) and the text block's start."""
        start = {"id": self.msg.message_id, "type": "message", "role": "assistant",
                 "model": self.msg.request.model, "content": [], "stop_reason": None,
                 "stop_sequence": None,
                 "usage": {"input_tokens": len(self.msg.chat.sample.prompt), "output_tokens": 0}}
        return [("message_start", {"type": "message_start", "message": start}),
                ("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}})]

    def feed(self, deltas: list) -> list[Event]:
        """One text_delta for the text these tokens release (none if they release nothing)."""
        released = [r for d in deltas if (r := self.text.feed(d)) is not None]
        text = "".join(r.text for r in released)
        if not text:
            return []
        return [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": text}})]

    def closing(self, tokenizer, seqs: list[dict]) -> list[Event]:
        """The text block's end, the stop reason with the final usage, and message_stop."""
        out: list[Event] = []
        if self.text.finished:
            reason, matched = stop_of(self.text.finish_reason, self.text.text,
                                      self.msg.chat.request.stop_strings())
        else:  # the stream ended early (cancelled): close with the finished answer
            ans = answer(tokenizer, self.msg, seqs)
            rest = ans.text[self.text.sent:]
            if rest:
                out.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "text_delta",
                                                              "text": rest}}))
            reason, matched = ans.stop_reason, ans.stop_sequence
        usage = {"input_tokens": len(self.msg.chat.sample.prompt),
                 "output_tokens": len(seqs[0]["tokens"])}
        return out + [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": reason, "stop_sequence": matched},
                               "usage": usage}),
            ("message_stop", {"type": "message_stop"})]
