"""The bodies of OpenAI chat-completions and (legacy) completions requests: what is served, and
refusals for the rest.

Served: `model`, `messages` (roles system, developer — rendered as system —, user and
assistant; content a string or a list of text parts, joined with newlines), `max_tokens` /
`max_completion_tokens`, `temperature` (0 = greedy; 0 to 2, as OpenAI), `top_p`, `seed`, `n`,
`stop` (a string or a list), `logprobs`, `top_logprobs`, `stream`, `stream_options.include_usage`,
and `user` (an end-user id for the caller's records; it changes nothing). `top_k` is accepted as
an extension under vLLM's name.

Completions: `model`, `prompt` (a string, token ids, or a list of up to 16 of either),
`max_tokens` (default 16, as OpenAI), `temperature`, `top_p`, `top_k`, `seed`, `n`, `best_of`
(only equal to `n`), `stop`, `logprobs` (an int, the legacy format), `stream`, `stream_options`,
`user`; `echo` and `suffix` are refused unless off.

Every other parameter is refused with a 400 naming it, except OpenAI parameters sent with the
value that turns them off (`null`, `presence_penalty: 0`, `tools: []`, ...), since some clients
send those by default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneforge.errors import Unsupported, UserError

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20  # OpenAI's bound


class InvalidParam(UserError):
    """A request parameter is wrong; `param` names it (OpenAI's error field)."""

    code: str | None = None

    def __init__(self, message: str, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code


class UnsupportedParam(InvalidParam, Unsupported):
    code = "unsupported_parameter"


# OpenAI chat parameters that are not served, with the values that mean "not used".
_OFF_VALUES: dict[str, tuple] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "tools": ([],),
    "functions": ([],), "tool_choice": ("none",), "response_format": ({"type": "text"},),
    "store": (False,), "metadata": ({},), "modalities": (["text"],),
}
_NOT_SERVED = set(_OFF_VALUES) | {
    "function_call", "parallel_tool_calls", "audio", "prediction", "reasoning_effort",
    "service_tier", "web_search_options", "verbosity", "prompt_cache_key", "safety_identifier",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Sampling(_Strict):
    """Values both request kinds derive from their fields `n`, `temperature` and
    `stream_options` alike."""

    @property
    def num_choices(self) -> int:
        return self.n if self.n is not None else 1

    @property
    def sampling_temperature(self) -> float:
        return self.temperature if self.temperature is not None else 1.0

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    model: str = Field(min_length=1, max_length=2048)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None

    # ---- derived values (and those of _Sampling) ----


    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_tokens is None else self.max_tokens

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def template_messages(self) -> list[dict[str, str]]:
        """The messages as chat templates take them."""
        out = []
        for m in self.messages:
            text = m.content if isinstance(m.content, str) else "\n".join(p.text
                                                                          for p in m.content)
            out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        return out


def parse(body: dict) -> ChatRequest:
    """Validate a request body; errors name the parameter."""
    for name, value in body.items():
        if name in ChatRequest.model_fields or value is None and name in _NOT_SERVED:
            continue
        if name in _OFF_VALUES and value in _OFF_VALUES[name]:
            continue
        if name in _NOT_SERVED:
            raise UnsupportedParam(f"{name}: this parameter is not supported by this server",
                                   name)
        raise UnsupportedParam(f"Unrecognized request argument supplied: {name}", name)
    known = {k: v for k, v in body.items() if k in ChatRequest.model_fields}
    try:
        req = ChatRequest.model_validate(known)
    except ValidationError as e:
        raise _param_error(e) from None
    _check(req)
    return req


def _check(req: ChatRequest | CompletionRequest) -> None:
    both = getattr(req, "max_completion_tokens", None), req.max_tokens
    if None not in both and both[0] != both[1]:
        raise InvalidParam("max_tokens and max_completion_tokens differ; send one of them",
                           "max_completion_tokens")
    if getattr(req, "top_logprobs", None) is not None and not req.logprobs:
        raise InvalidParam("top_logprobs needs logprobs set to true", "top_logprobs")
    if req.stream_options is not None and not req.stream:
        raise InvalidParam("stream_options is only allowed when stream is true", "stream_options")
    if req.top_k is not None and (req.top_k == 0 or req.top_k < -1):
        raise InvalidParam(f"top_k must be -1 (off) or >= 1, got {req.top_k}", "top_k")
    stops = req.stop_strings()
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidParam(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}",
                           "stop")
    if any(s == "" for s in stops):
        raise InvalidParam("stop: stop strings must not be empty", "stop")


# ---- legacy completions -----------------------------------------------------------------------

MAX_LEGACY_LOGPROBS = 20  # OpenAI's bound is 5; vLLM's (and ours) 20
MAX_PROMPTS = 16

_COMPLETION_OFF_VALUES: dict[str, tuple] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "echo": (False,),
    "suffix": ("",),
}


class CompletionRequest(_Sampling):
    model: str = Field(min_length=1, max_length=2048)
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1)
    best_of: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LEGACY_LOGPROBS)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None


    def max_new_tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's default

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str) or p and isinstance(p[0], int):
            return [p]
        return list(p)



def parse_completion(body: dict) -> CompletionRequest:
    """Validate a legacy completions body; errors name the parameter."""
    for name, value in body.items():
        if name in CompletionRequest.model_fields:
            continue
        if value is None or value in _COMPLETION_OFF_VALUES.get(name, ()):
            continue
        if name == "echo":
            raise UnsupportedParam("echo: echoing the prompt is not supported by this server",
                                   name)
        if name in _COMPLETION_OFF_VALUES:
            raise UnsupportedParam(f"{name}: this parameter is not supported by this server",
                                   name)
        raise UnsupportedParam(f"Unrecognized request argument supplied: {name}", name)
    known = {k: v for k, v in body.items() if k in CompletionRequest.model_fields}
    try:
        req = CompletionRequest.model_validate(known)
    except ValidationError as e:
        raise _param_error(e) from None
    _check(req)
    prompts = req.prompts()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InvalidParam("prompt: must not be empty", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidParam(f"prompt: at most {MAX_PROMPTS} prompts in one request, got "
                           f"{len(prompts)}", "prompt")
    if req.best_of is not None and req.best_of != req.num_choices:
        raise UnsupportedParam(f"best_of: only best_of equal to n ({req.num_choices}) is "
                               f"supported, got {req.best_of}", "best_of")
    return req


def _param_error(e: ValidationError) -> InvalidParam:
    err = e.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    # a union adds the member type to the location ("str", "list[TextPart]"): cut after the
    # union fields
    for union in ("content", "stop", "prompt"):
        if union in loc:
            loc = loc[:loc.index(union) + 1]
    param = "".join(f"[{p}]" if p.isdigit() else (f".{p}" if i else p) for i, p in enumerate(loc))
    if err["type"] == "extra_forbidden":
        return UnsupportedParam(f"{param}: this field is not supported by this server", param)
    if loc[-1:] == ["content"]:
        return InvalidParam(f"{param}: must be a string or a list of "
                            '{"type": "text", "text": ...} parts (image, audio and file parts '
                            "are not supported)", param)
    return InvalidParam(f"{param}: {err['msg']}", param)
