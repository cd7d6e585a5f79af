"""Chat completions and completions over the engine's samplers: everything of the
OpenAI-compatible API that is not HTTP (the routes are `routes/oai.py`).

A chat request becomes the engine's `SampleRequest` and is submitted to the same scheduler
queue, and decoded in the same continuous batch, as a Tinker `sample` call; only the framing
differs:

- `model` names a served base model, a `tinker://RUN/sampler_weights/NAME` checkpoint of the
  caller (looked up owner-scoped: another key's checkpoint is "not found"), or
  `BASE;tinker://...` (the checkpoint, after checking that it was trained on BASE).
- The prompt is the base model's own chat template (transformers' `apply_chat_template` with
  `add_generation_prompt=True`) rendered to text and encoded without adding special tokens, which
  is what a client gets from the model's tokenizer for the same messages.
- A (legacy) completion is the same without the template: `prepare_completion` makes one
  request per prompt, which stops on the EOS ids and the stop strings.
- `submit(..., stream=True)` gives the future a `TokenStream` that the decoder fills with each
  step's new tokens (what live streams are made of).
- Stops: the model's EOS ids, the end-of-turn token its template writes after an assistant
  message, and the request's stop strings. The answer excludes the end-of-turn token and
  everything from a stop string on, as OpenAI's API does; `usage.completion_tokens` counts every
  sampled token.
- Sampler weights are loaded on the engine thread when the request is admitted and kept in the
  engine's sampler table under a stable id: one per base model, one per (owner, checkpoint path,
  checkpoint creation time). They live inside the engine's adapter memory budget (least
  recently used ones are evicted and reloaded from the checkpoint on demand); a checkpoint
  overwritten under the same path gets a new id and the previous version's weights are dropped.

Fast tokenizers must not be shared between threads, so `BaseModel.tokenizer` stays the engine
thread's, and each request thread loads its own copy from the model folder, once.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from dataclasses import dataclass, replace

from sqlalchemy import select

from tuneforge.engine.models import BaseModel
from tuneforge.engine.sampler import SampleRequest, SampleResult, SamplingParams
from tuneforge.engine.worker import EngineWorker
from tuneforge.errors import EngineError, NotFound, TuneforgeError, UserError
from tuneforge.scheduler.futures import Future, TokenStream
from tuneforge.scheduler.queue import Work
from tuneforge.server.chat_request import ChatRequest, CompletionRequest, InvalidParam
from tuneforge.server.state import ServerState, parse_tinker_path
from tuneforge.storage.db import CheckpointRow, TrainingRunRow

STARTED = int(time.time())


class ModelNotFound(NotFound):
    """`model` names nothing this key may sample from."""

    param, code = "model", "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.")


@dataclass(frozen=True)
class ChatModel:
    """What a request's `model` resolved to."""

    name: str  # as the caller wrote it
    base_model: str
    checkpoint: str | None  # tinker:// path, or None for the base model itself
    sampler_id: str
    family: str  # the sampler-id prefix shared by every version of the same checkpoint


@dataclass
class PreparedChat:
    request: ChatRequest | CompletionRequest
    model: ChatModel
    sample: SampleRequest
    end_ids: frozenset[int]  # tokens that end the answer and are not part of it
    tokenizer_dir: str
    completion_id: str
    created: int


# ---- models -----------------------------------------------------------------------------------

def resolve_model(state: ServerState, owner: str, model: str) -> ChatModel:
    base_name, path = model.split(";", 1) if ";" in model else (None, model)
    if not path.startswith("tinker://"):
        if base_name is not None or path not in state.registry.offered():
            raise ModelNotFound(model)
        state.registry.card(path)  # loads it now: a model that cannot load fails here
        return ChatModel(model, path, None, f"chat-base-{_digest(path)}:sample:0", "")
    try:
        ckpt = state.checkpoint(path, owner)
    except (NotFound, UserError):
        raise ModelNotFound(model) from None
    if ckpt.kind != "sampler_weights":
        raise InvalidParam(f"model: {path} holds training state; sample from a checkpoint saved "
                           "with save_weights_for_sampler (tinker://RUN/sampler_weights/NAME)",
                           "model")
    run = state.db.get(TrainingRunRow, ckpt.training_run_id)
    if base_name is not None and base_name != run.base_model:
        raise InvalidParam(f"model: {path} was trained on {run.base_model!r}, not {base_name!r}",
                           "model")
    family = f"chat-{_digest(owner, path)}-"
    version = _digest(ckpt.created_at.isoformat())
    return ChatModel(model, run.base_model, path, f"{family}{version}:sample:0", family)


def list_models(state: ServerState, owner: str) -> list[dict]:
    """The served base models, then the caller's sampler checkpoints, newest first."""
    loaded = set(state.registry.loaded())
    out = []
    for name in state.registry.offered():
        entry = {"id": name, "object": "model", "created": STARTED, "owned_by": "tuneforge",
                 "root": name, "parent": None}
        if name in loaded:
            entry["max_model_len"] = state.registry.card(name).max_context
        out.append(entry)
    stmt = (select(CheckpointRow, TrainingRunRow.base_model)
            .join(TrainingRunRow, TrainingRunRow.id == CheckpointRow.training_run_id)
            .where(CheckpointRow.kind == "sampler_weights")
            .order_by(CheckpointRow.created_at.desc()))
    if not state.keys.is_admin(owner):
        stmt = stmt.where(CheckpointRow.owner == owner)
    with state.db.session() as s:
        rows = [(row.tinker_path, row.owner, row.created_at, base) for row, base in s.execute(stmt)]
    for path, row_owner, created, base in rows:
        out.append({"id": path, "object": "model", "created": int(created.timestamp()),
                    "owned_by": row_owner, "root": path, "parent": base})
    return out


def model_entry(state: ServerState, owner: str, model: str) -> dict:
    """One entry of `list_models`, by any name `resolve_model` takes."""
    target = resolve_model(state, owner, model)
    wanted = target.checkpoint or target.base_model
    for entry in list_models(state, owner):
        if entry["id"] == wanted:
            return {**entry, "id": model}
    raise ModelNotFound(model)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


# ---- prompts and tokenizers -------------------------------------------------------------------

_local = threading.local()
_end_of_turn: dict[str, frozenset[int]] = {}
_END_MARK = "Zq7xEndOfTurnMarker"


def tokenizer_for(folder: str):
    """This thread's own tokenizer from the model folder `folder` (loaded once per thread)."""
    from transformers import AutoTokenizer

    cache = _local.__dict__.setdefault("tokenizers", {})
    if folder not in cache:
        cache[folder] = AutoTokenizer.from_pretrained(folder)
    return cache[folder]


def tokenizer_for_model(chat: PreparedChat):
    return tokenizer_for(chat.tokenizer_dir)


def render_prompt(tokenizer, base: BaseModel, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidParam(f"model: {base.name} has no chat template; sample it through the "
                           "Tinker API with your own prompt tokens", "model")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja's TemplateError, or a template's raise_exception
        raise InvalidParam(f"messages: the chat template of {base.name} refused them: {e}",
                           "messages") from e
    return list(tokenizer.encode(text, add_special_tokens=False))


def end_of_turn_ids(tokenizer, base: BaseModel) -> frozenset[int]:
    """The special token the chat template writes right after an assistant message (none if
    the template writes none)."""
    key = str(base.tokenizer_dir)
    if key not in _end_of_turn:
        found: frozenset[int] = frozenset()
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _END_MARK}],
                tokenize=False)
        except Exception:  # a template that cannot end on an assistant turn
            text = ""
        at = text.rfind(_END_MARK)
        if at >= 0:
            special = set(tokenizer.all_special_ids) | {
                i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
            tail = tokenizer.encode(text[at + len(_END_MARK):], add_special_tokens=False)
            found = frozenset(next(([i] for i in tail if i in special), []))
        _end_of_turn[key] = found
    return _end_of_turn[key]


# ---- requests ---------------------------------------------------------------------------------

def prepare(state: ServerState, owner: str, req: ChatRequest) -> PreparedChat:
    """Resolve the model, render the prompt and build the engine request (on a request thread)."""
    target = resolve_model(state, owner, req.model)
    base = state.registry.card(target.base_model)
    tokenizer = tokenizer_for(str(base.tokenizer_dir))
    prompt = render_prompt(tokenizer, base, req.template_messages())
    _check_prompt_length(state, base, prompt, "messages")
    end_ids = base.eos_token_ids | end_of_turn_ids(tokenizer, base)
    name = "max_tokens" if req.max_tokens is not None else "max_completion_tokens"
    sample = _sample_request(state, base, prompt, req, req.max_new_tokens(), name, end_ids,
                             (req.top_logprobs or 0) if req.logprobs else 0)
    return PreparedChat(req, target, sample, end_ids, str(base.tokenizer_dir),
                        f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))


def prepare_completion(state: ServerState, owner: str,
                       req: CompletionRequest) -> list[PreparedChat]:
    """A legacy completions request: one engine request per prompt, the prompt as given (text
    encoded with the tokenizer's special tokens, as vLLM does; no chat template), stopping on the
    model's EOS tokens and the stop strings."""
    target = resolve_model(state, owner, req.model)
    base = state.registry.card(target.base_model)
    tokenizer = tokenizer_for(str(base.tokenizer_dir))
    vocab = base.vocab_size
    completion_id, created, out = f"cmpl-{uuid.uuid4().hex}", int(time.time()), []
    many = len(req.prompts()) > 1
    for i, text in enumerate(req.prompts()):
        where = f"prompt[{i}]" if many else "prompt"
        if isinstance(text, str):
            prompt = list(tokenizer.encode(text, add_special_tokens=True))
        else:
            prompt = list(text)
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidParam(f"{where}: token id {bad} is outside the vocabulary "
                                   f"(0..{vocab - 1})", "prompt")
        if not prompt:
            raise InvalidParam(f"{where}: encodes to no tokens", "prompt")
        _check_prompt_length(state, base, prompt, "prompt")
        sample = _sample_request(state, base, prompt, req, req.max_new_tokens(), "max_tokens",
                                 base.eos_token_ids, req.logprobs or 0)
        out.append(PreparedChat(req, target, sample, base.eos_token_ids, str(base.tokenizer_dir),
                                completion_id, created))
    return out


def _check_prompt_length(state: ServerState, base: BaseModel, prompt: list[int],
                         param: str) -> None:
    lim = state.settings.limits
    longest = min(lim.max_tokens_per_request, base.max_context - 1)
    if len(prompt) > longest:
        raise InvalidParam(f"{param}: the prompt is {len(prompt)} tokens; the limit is "
                           f"{longest} (model context {base.max_context}, "
                           f"max_tokens_per_request={lim.max_tokens_per_request})", param)


def _sample_request(state: ServerState, base: BaseModel, prompt: list[int],
                    req: ChatRequest | CompletionRequest, max_tokens: int | None, name: str,
                    end_ids: frozenset[int], top_logprobs: int) -> SampleRequest:
    lim = state.settings.limits
    room = base.max_context - len(prompt)
    if max_tokens is None:
        max_tokens = min(lim.max_sample_tokens, room)
    elif not 1 <= max_tokens <= lim.max_sample_tokens:
        raise InvalidParam(f"{name} must be between 1 and max_sample_tokens="
                           f"{lim.max_sample_tokens}, got {max_tokens}", name)
    elif max_tokens > room:
        raise InvalidParam(f"{name}: the prompt ({len(prompt)} tokens) + {name} "
                           f"({max_tokens}) exceeds the model context of {base.max_context}",
                           name)
    if not 1 <= req.num_choices <= lim.max_samples_per_request:
        raise InvalidParam(f"n must be between 1 and max_samples_per_request="
                           f"{lim.max_samples_per_request}, got {req.num_choices}", "n")
    if top_logprobs > lim.max_topk_logprobs:
        param = "top_logprobs" if isinstance(req, ChatRequest) else "logprobs"
        raise InvalidParam(f"{param} must be at most max_topk_logprobs="
                           f"{lim.max_topk_logprobs}, got {top_logprobs}", param)
    params = SamplingParams(max_tokens=max_tokens, temperature=req.sampling_temperature,
                            top_k=req.top_k if req.top_k is not None else -1,
                            top_p=req.top_p if req.top_p is not None else 1.0, seed=req.seed,
                            stop_token_ids=end_ids, stop_strings=req.stop_strings())
    return SampleRequest(prompt=prompt, num_samples=req.num_choices, params=params,
                         topk_sample_logprobs=top_logprobs)


def submit(state: ServerState, owner: str, chat: PreparedChat, stream: bool = False,
           request_type: str = "ChatCompletion") -> Future:
    """Queue the request with the Tinker samples; its future's result is the raw sequences.

    With `stream`, the future carries a `TokenStream` (`fut.stream`) that receives the tokens
    as they are decoded and ends when the future finishes."""
    folder = (state.paths.checkpoint(*parse_tinker_path(chat.model.checkpoint))
              if chat.model.checkpoint else None)
    fut = state.futures.create(request_type, owner)
    if stream:
        fut.stream = TokenStream()
    sample = replace(chat.sample, stream=fut.stream) if stream else chat.sample

    def admit(engine: EngineWorker) -> tuple[str, SampleRequest]:  # engine thread, admission
        load_sampler(engine, chat.model, folder)
        return chat.model.sampler_id, sample

    # every version of a checkpoint's chat sampler is placed on one worker, where loading a
    # newer version drops the older ones (load_sampler)
    work = Work(lane=chat.model.base_model, sampler_id=chat.model.family or chat.model.sampler_id,
                sample=admit, encode_sample=_sequences_json)
    return state.scheduler.submit(fut, work)


def load_sampler(engine: EngineWorker, model: ChatModel, folder) -> None:
    """Make `model`'s weights available to the decoder (engine thread only)."""
    if engine.has_sampler(model.sampler_id):
        return
    if model.checkpoint is None:
        engine.add_sampler_for_base(model.sampler_id, model.base_model)
        return
    if not folder.exists():
        raise ModelNotFound(model.name)
    # an earlier version of a checkpoint overwritten since: its sampler id shares the family
    engine.drop(model.family)
    engine.add_sampler_from_checkpoint(model.sampler_id, folder)


def _sequences_json(result: SampleResult) -> dict:
    return {"sequences": [
        {"tokens": s.tokens, "logprobs": s.logprobs, "stop_reason": s.stop_reason,
         "topk_ids": s.topk_ids, "topk_logprobs": s.topk_logprobs} for s in result.sequences]}


def sequences(fut: Future) -> list[dict]:
    """A finished future's sequences, or its failure raised again."""
    if fut.state == "failed":
        raise (UserError if fut.category == "user" else EngineError)(fut.error or "failed")
    if fut.state != "done" or not isinstance(fut.result, dict):
        raise TuneforgeError(f"request {fut.request_id} has no result yet")
    return fut.result["sequences"]
