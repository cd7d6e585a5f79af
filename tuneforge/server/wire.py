"""Wire formats ⇄ engine types: the SDK's protobuf messages and its pydantic request models.

The schema is the SDK's own (`tinker.proto.tinker_public_pb2`, `tinker.types`), so request and
response shapes cannot drift from the client's. JSON requests are validated with the SDK's
request models after dropping top-level fields this SDK version does not know (newer clients add
fields; the protocol says to ignore them).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pydantic
from tinker.proto import tinker_public_pb2 as pb

from tuneforge.engine.sampler import SampleResult
from tuneforge.engine.types import Datum, ForwardBackwardInput, ForwardBackwardResult
from tuneforge.errors import LimitExceeded, Unsupported, UserError

M = TypeVar("M", bound=pydantic.BaseModel)

_NP_DTYPES = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
MAX_BODY_BYTES = 512 * 1024 * 1024


def parse(model: type[M], body: object, what: str) -> M:
    """Validate a JSON body with an SDK request model; errors name the offending field."""
    if not isinstance(body, dict):
        raise UserError(f"{what}: the request body must be a JSON object")
    known = {k: v for k, v in body.items() if k in _accepted_keys(model)}
    try:
        return model.model_validate(known)
    except pydantic.ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in e.errors()[:5]
        )
        raise UserError(f"{what}: {problems}") from None


def _accepted_keys(model: type[pydantic.BaseModel]) -> set[str]:
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        keys.add(name)
        if isinstance(info.alias, str):
            keys.add(info.alias)
        alias = info.validation_alias
        if isinstance(alias, str):
            keys.add(alias)
        elif isinstance(alias, pydantic.AliasChoices):
            keys.update(c for c in alias.choices if isinstance(c, str))
    return keys


MAX_METADATA_BYTES = 65536


def check_metadata(value: object, field: str) -> dict:
    """User metadata as stored: a JSON object of at most 64 KiB."""
    if value is None:
        return {}
    size = len(json.dumps(value, default=str))
    if not isinstance(value, dict) or size > MAX_METADATA_BYTES:
        raise UserError(f"{field} must be a JSON object of at most {MAX_METADATA_BYTES} bytes "
                        f"(got {size})")
    return dict(value)


def ordered_envelope(body: object, what: str) -> tuple[str, int]:
    """`model_id` and `seq_id` of an ordered JSON request, checked before anything else."""
    if not isinstance(body, dict):
        raise UserError(f"{what}: the request body must be a JSON object")
    model_id, seq_id = body.get("model_id"), body.get("seq_id")
    if not isinstance(model_id, str) or not model_id:
        raise UserError(f"{what}: model_id (string) is required")
    if not isinstance(seq_id, int) or isinstance(seq_id, bool) or seq_id < 0:
        raise UserError(f"{what}: seq_id (non-negative integer) is required")
    return model_id, seq_id


# ---- forward_backward request ---------------------------------------------------------------


def parse_forward_backward(body: bytes, content_encoding: str | None) -> pb.ForwardBackwardRequest:
    """The protobuf envelope of POST /api/v1/forward_backward (model, seq_id, raw data)."""
    if content_encoding and content_encoding.lower() == "zstd":
        import zstandard

        try:
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_BODY_BYTES)
        except zstandard.ZstdError as e:
            raise UserError(f"forward_backward: body is not valid zstd ({e})") from None
    elif content_encoding and content_encoding.lower() not in ("identity",):
        raise Unsupported(
            f"forward_backward: Content-Encoding {content_encoding!r} is not supported")
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as e:  # protobuf's DecodeError hierarchy differs between runtimes
        raise UserError(
            f"forward_backward: body is not a ForwardBackwardRequest protobuf ({e})") from None
    if not msg.model_id:
        raise UserError("forward_backward: model_id is required")
    return msg


def forward_backward_input(msg: pb.ForwardBackwardRequest) -> ForwardBackwardInput:
    """The engine's view of a forward_backward request; bad content raises `UserError`."""
    config: dict[str, float | str] = {k: v for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        config[key] = value.text if value.WhichOneof("value") == "text" else value.number
    data = [_decode_datum(d, i) for i, d in enumerate(msg.data)]
    return ForwardBackwardInput(data=data, loss_fn=msg.loss_fn, loss_fn_config=config,
                                forward_only=msg.forward_only)


def _decode_datum(d: pb.Datum, index: int) -> Datum:
    parts = []
    for chunk in d.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise Unsupported(f"data[{index}].model_input: {kind} chunks are not supported "
                              "(this server trains text models only)")
        if len(chunk.encoded_text.tokens) % 4:
            raise UserError(f"data[{index}].model_input: token bytes are not int32-aligned")
        parts.append(np.frombuffer(chunk.encoded_text.tokens, dtype="<i4"))
    tokens = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    inputs = {name: decode_tensor(t, f"data[{index}].loss_fn_inputs['{name}']")
              for name, t in d.loss_fn_inputs.items()}
    return Datum(tokens=tokens, inputs=inputs)


def decode_tensor(t: pb.Tensor, field: str) -> np.ndarray:
    """A protobuf `Tensor` as a dense numpy array (int32 widened to int64)."""
    np_dtype = _NP_DTYPES.get(t.dtype)
    if np_dtype is None:
        raise UserError(f"{field}: dtype {t.dtype} is not float32 or int64")
    shape = [int(s) for s in t.shape]
    if any(s < 0 for s in shape):
        raise UserError(f"{field}: negative dimension in shape {shape}")
    kind = t.WhichOneof("encoding")
    item = np.dtype(np_dtype).itemsize
    if kind == "sparse_csr":
        if len(shape) != 2:
            raise UserError(f"{field}: a sparse CSR tensor must be 2-D, got shape {shape}")
        csr = t.sparse_csr
        if len(csr.values) % item or len(csr.crow_indices) % 8 or len(csr.col_indices) % 8:
            raise UserError(f"{field}: sparse CSR buffers are not aligned to their dtypes")
        values = np.frombuffer(csr.values, dtype=np_dtype)
        crow = np.frombuffer(csr.crow_indices, dtype="<i8")
        col = np.frombuffer(csr.col_indices, dtype="<i8")
        rows, cols = shape
        if (len(crow) != rows + 1 or len(col) != len(values) or (len(crow) and crow[0] != 0)
                or np.any(np.diff(crow) < 0) or (len(crow) and crow[-1] != len(values))
                or (len(col) and (col.min() < 0 or col.max() >= cols))):
            raise UserError(f"{field}: inconsistent sparse CSR indices for shape {shape}")
        dense = np.zeros((rows, cols), dtype=np_dtype)
        row_of = np.repeat(np.arange(rows), np.diff(crow))
        dense[row_of, col] = values
        out = dense
    else:
        raw = t.dense
        if len(raw) % item:
            raise UserError(
                f"{field}: {len(raw)} bytes is not a whole number of {np.dtype(np_dtype).name}")
        flat = np.frombuffer(raw, dtype=np_dtype)
        if shape:
            if math.prod(shape) != flat.size:
                raise UserError(f"{field}: shape {shape} does not match its {flat.size} values")
            out = flat.reshape(shape)
        else:
            out = flat
    return out.astype(np.int64) if np_dtype == np.int32 else out.astype(np_dtype, copy=True)


# ---- results --------------------------------------------------------------------------------


def encode_forward_backward(result: ForwardBackwardResult) -> bytes:
    """Per-datum outputs as consecutive ArrayRecords, one per run of equal trailing shape."""
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for key, value in result.metrics.items():
        out.metrics[key] = float(value)
    groups: list[list[dict[str, np.ndarray]]] = []
    for datum in result.outputs:
        trailing = datum["logprobs"].shape[1:]
        if groups and groups[-1][0]["logprobs"].shape[1:] == trailing:
            groups[-1].append(datum)
        else:
            groups.append([datum])
    for group in groups:
        record = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(group))
        for name in group[0]:
            arrays = [np.ascontiguousarray(d[name], dtype=np.float32) for d in group]
            offsets = np.cumsum([0] + [a.nbytes for a in arrays]).astype("<i8")
            bt = record.fields[name]
            bt.data = b"".join(a.tobytes() for a in arrays)
            bt.offsets = offsets.tobytes()
            bt.dtype = pb.DTYPE_FLOAT32
            bt.trailing_shape.extend(int(s) for s in arrays[0].shape[1:])
    return out.SerializeToString()


def _topk(ids: np.ndarray, logprobs: np.ndarray) -> pb.TopkLogprobs:
    return pb.TopkLogprobs(
        token_ids=np.ascontiguousarray(ids, dtype="<i4").tobytes(),
        logprobs=np.ascontiguousarray(logprobs, dtype="<f4").tobytes(),
        k=int(ids.shape[1]) if ids.ndim == 2 else 0,
        length=int(ids.shape[0]),
    )


@dataclass(frozen=True)
class SparseLayout:
    """Where the listed cells of a sparse CSR request tensor are (to answer in the same layout)."""

    crow: np.ndarray
    col: np.ndarray


def decode_target_ids(value, rows: int, vocab: int, max_cells: int,
                      field: str = "target_prompt_logprobs",
                      ) -> tuple[np.ndarray, SparseLayout | None]:
    """A JSON int64 tensor of token ids `[rows, K]` as a dense array (-1 = nothing requested),
    plus its sparse layout when it came as CSR (unlisted cells request nothing)."""
    if value.dtype != "int64":
        raise UserError(f"{field} must be an int64 tensor of token ids, got {value.dtype}")
    shape = list(value.shape or [])
    if len(shape) != 2 or shape[0] != rows or shape[1] < 1:
        raise UserError(f"{field} must have shape [len(prompt) - 1, K] = [{rows}, K], "
                        f"got {shape}")
    if shape[0] * shape[1] > max_cells:
        raise LimitExceeded(f"{field}: {shape[0] * shape[1]} cells exceeds the limit "
                            f"max_tokens_per_request={max_cells}")
    data = np.asarray(value.data, dtype=np.int64)
    layout = None
    if value.sparse_crow_indices is not None:
        crow = np.asarray(value.sparse_crow_indices, dtype=np.int64)
        col = np.asarray(value.sparse_col_indices or [], dtype=np.int64)
        if (len(crow) != rows + 1 or crow[0] != 0 or crow[-1] != len(data) or len(col) != len(data)
                or np.any(np.diff(crow) < 0) or (len(col) and (col.min() < 0
                                                               or col.max() >= shape[1]))):
            raise UserError(f"{field}: inconsistent sparse CSR indices for shape {shape}")
        dense = np.full(shape, -1, dtype=np.int64)
        dense[np.repeat(np.arange(rows), np.diff(crow)), col] = data
        layout = SparseLayout(crow, col)
    else:
        if data.size != shape[0] * shape[1]:
            raise UserError(f"{field}: shape {shape} does not match its {data.size} values")
        dense = data.reshape(shape)
    if dense.size and (dense.min() < -1 or dense.max() >= vocab):
        bad = int(dense.min()) if dense.min() < -1 else int(dense.max())
        raise UserError(f"{field}: token id {bad} is outside the vocabulary [0, {vocab}) "
                        "(-1 requests nothing)")
    return dense, layout


def _tensor(values: np.ndarray, layout: SparseLayout | None = None) -> pb.Tensor:
    dtype = pb.DTYPE_INT64 if values.dtype == np.int64 else pb.DTYPE_FLOAT32
    t = pb.Tensor(dtype=dtype, shape=list(values.shape))
    np_dtype = "<i8" if dtype == pb.DTYPE_INT64 else "<f4"
    if layout is None:
        t.dense = np.ascontiguousarray(values, dtype=np_dtype).tobytes()
    else:
        rows = np.repeat(np.arange(values.shape[0]), np.diff(layout.crow))
        t.sparse_csr.values = values[rows, layout.col].astype(np_dtype).tobytes()
        t.sparse_csr.crow_indices = layout.crow.astype("<i8").tobytes()
        t.sparse_csr.col_indices = layout.col.astype("<i8").tobytes()
    return t


def encode_sample(result: SampleResult, target_layout: SparseLayout | None = None) -> bytes:
    out = pb.SampleResponse()
    for seq in result.sequences:
        s = out.sequences.add(
            stop_reason=pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH,
            tokens=np.asarray(seq.tokens, dtype="<i4").tobytes(),
            logprobs=np.asarray(seq.logprobs, dtype="<f4").tobytes(),
        )
        if seq.topk_ids:
            s.topk_sampled_logprobs.CopyFrom(
                _topk(np.asarray(seq.topk_ids), np.asarray(seq.topk_logprobs)))
    if result.prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray(result.prompt_logprobs, dtype="<f4").tobytes()
    if result.topk_prompt_ids is not None:
        out.topk_prompt_logprobs.CopyFrom(
            _topk(result.topk_prompt_ids, result.topk_prompt_logprobs))
    if result.target_prompt_logprobs is not None:
        out.target_prompt_logprobs.CopyFrom(_tensor(result.target_prompt_logprobs, target_layout))
    if result.alt_tokens is not None:
        out.prompt_alt_tokens.tokens.CopyFrom(_tensor(result.alt_tokens))
        out.prompt_alt_tokens.logprobs.CopyFrom(_tensor(result.alt_logprobs))
    return out.SerializeToString()
