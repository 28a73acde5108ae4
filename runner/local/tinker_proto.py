"""The Tinker wire's protobuf messages, as the local service reads and writes them.

The ``tinker`` client (0.38) sends ``forward_backward`` as a ``tinker_public.ForwardBackwardRequest``
(``Content-Type: application/x-protobuf``, zstd-compressed when the server's client config
asks for it) and reads ``ForwardBackwardOutput`` and ``SampleResponse`` results as protobuf
(it refuses JSON for those two). The schema is declared here, in a descriptor pool of its
own, rather than imported from the ``tinker`` package: the service must not depend on
whichever ``tinker`` a user's environment holds (the cookbook's pins 0.23, whose schema
lacks fields 0.38 sends). Only the fields the service reads or writes are declared; a
parser skips the others (provenance spans, image details), as protobuf does with any
unknown field. Field numbers and types are the 0.38 client's (tests/tinker/test_proto.py
checks them against the installed package).

Decoding checks what the messages cannot: sizes against limits, dtypes, shapes against
buffer lengths, so a malformed body is a ``WireError`` naming the datum and field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

__all__ = [
    "DTYPE_FLOAT32", "DTYPE_INT64", "DTYPE_INT32", "WireError", "DecodedDatum", "DecodedForwardBackward",
    "decode_forward_backward", "encode_forward_backward_output", "encode_sample_response", "messages",
    "MAX_BODY_BYTES", "MAX_DATUMS",
]

# The client splits forward_backward into chunks of at most 1,024 datums and about
# 5,000,000 (estimated) bytes; the service takes up to 4x the bytes (the estimate is not
# exact) and refuses what no client chunk can be.
MAX_DATUMS = 1024
MAX_BODY_BYTES = 20_000_000

DTYPE_UNSPECIFIED, DTYPE_FLOAT32, DTYPE_INT64, DTYPE_INT32, DTYPE_BFLOAT16 = 0, 1, 2, 3, 4
STOP_REASON_STOP, STOP_REASON_LENGTH = 0, 1
_NUMPY = {DTYPE_FLOAT32: np.dtype("<f4"), DTYPE_INT64: np.dtype("<i8"), DTYPE_INT32: np.dtype("<i4")}
_DTYPE_NAMES = {DTYPE_FLOAT32: "float32", DTYPE_INT64: "int64", DTYPE_INT32: "int32"}

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES, "bool": _F.TYPE_BOOL, "double": _F.TYPE_DOUBLE,
            "int32": _F.TYPE_INT32, "int64": _F.TYPE_INT64, "uint32": _F.TYPE_UINT32}

# name -> [(field name, number, type, repeated, oneof)]; a type that is not a scalar names a
# message ("Tensor"), an enum ("enum DType") or a map ("map string Tensor").
_SCHEMA: dict[str, list[tuple]] = {
    "ForwardBackwardRequest": [
        ("model_id", 1, "string"), ("seq_id", 2, "int32"), ("data", 3, "Datum", True), ("loss_fn", 4, "string"),
        ("loss_fn_config", 5, "map double"), ("forward_only", 6, "bool"),
        ("loss_fn_config_v2", 7, "map LossConfigValue")],
    "LossConfigValue": [("number", 1, "double", False, "value"), ("text", 2, "string", False, "value")],
    "Datum": [("model_input", 1, "Chunk", True), ("loss_fn_inputs", 2, "map Tensor")],
    "Chunk": [("encoded_text", 1, "EncodedTextChunk", False, "chunk"), ("image", 2, "ImageChunk", False, "chunk"),
              ("dmel", 3, "DmelChunk", False, "chunk")],
    "EncodedTextChunk": [("tokens", 1, "bytes")],
    "ImageChunk": [("data", 1, "bytes"), ("format", 2, "string")],
    "DmelChunk": [("dmel", 1, "bytes")],
    "SparseCsr": [("values", 1, "bytes"), ("crow_indices", 2, "bytes"), ("col_indices", 3, "bytes")],
    "Tensor": [("dense", 1, "bytes", False, "encoding"), ("sparse_csr", 2, "SparseCsr", False, "encoding"),
               ("dtype", 3, "enum DType"), ("shape", 4, "int64", True)],
    "BatchedTensor": [("data", 1, "bytes"), ("offsets", 2, "bytes"), ("dtype", 3, "enum DType"),
                      ("trailing_shape", 4, "int64", True)],
    "ArrayRecord": [("type_tag", 1, "string"), ("fields", 2, "map BatchedTensor"), ("num_datums", 3, "int64")],
    "ForwardBackwardOutput": [("loss_fn_output_type", 1, "string"), ("loss_fn_outputs", 2, "ArrayRecord", True),
                              ("metrics", 3, "map double")],
    "TopkLogprobs": [("token_ids", 1, "bytes"), ("logprobs", 2, "bytes"), ("k", 3, "uint32"),
                     ("length", 4, "uint32")],
    "SampledSequence": [("stop_reason", 1, "enum StopReason"), ("tokens", 2, "bytes"), ("logprobs", 3, "bytes"),
                        ("topk_sampled_logprobs", 4, "TopkLogprobs")],
    "SampleResponse": [("sequences", 1, "SampledSequence", True), ("prompt_logprobs", 2, "bytes"),
                       ("topk_prompt_logprobs", 3, "TopkLogprobs"), ("prompt_cache_hit_tokens", 4, "int32")],
}
_ENUMS = {"DType": ["DTYPE_UNSPECIFIED", "DTYPE_FLOAT32", "DTYPE_INT64", "DTYPE_INT32", "DTYPE_BFLOAT16"],
          "StopReason": ["STOP_REASON_STOP", "STOP_REASON_LENGTH"]}
PACKAGE = "tinker_public"


def _file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(name="firetitan_local/tinker_public.proto", package=PACKAGE,
                                              syntax="proto3")
    for name, values in _ENUMS.items():
        enum = file.enum_type.add(name=name)
        for number, value in enumerate(values):
            enum.value.add(name=value, number=number)
    for name, fields in _SCHEMA.items():
        msg = file.message_type.add(name=name)
        oneofs: dict[str, int] = {}
        for spec in fields:
            fname, number, kind = spec[:3]
            repeated = len(spec) > 3 and spec[3]
            oneof = spec[4] if len(spec) > 4 else None
            field = msg.field.add(name=fname, number=number, label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
            if kind.startswith("map "):
                entry_name = "".join(part.title() for part in fname.split("_")) + "Entry"
                entry = msg.nested_type.add(name=entry_name)
                entry.options.map_entry = True
                entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING)
                value_kind = kind.split(" ", 1)[1]
                value = entry.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL)
                _set_type(value, value_kind)
                field.label = _F.LABEL_REPEATED
                field.type = _F.TYPE_MESSAGE
                field.type_name = f".{PACKAGE}.{name}.{entry_name}"
            else:
                _set_type(field, kind)
            if oneof is not None:
                if oneof not in oneofs:
                    oneofs[oneof] = len(msg.oneof_decl)
                    msg.oneof_decl.add(name=oneof)
                field.oneof_index = oneofs[oneof]
    return file


def _set_type(field: descriptor_pb2.FieldDescriptorProto, kind: str) -> None:
    if kind in _SCALARS:
        field.type = _SCALARS[kind]
    elif kind.startswith("enum "):
        field.type = _F.TYPE_ENUM
        field.type_name = f".{PACKAGE}.{kind.split(' ', 1)[1]}"
    else:
        field.type = _F.TYPE_MESSAGE
        field.type_name = f".{PACKAGE}.{kind}"


def _build() -> dict[str, type]:
    pool = descriptor_pool.DescriptorPool()  # our own: never clashes with an installed tinker's
    file = pool.Add(_file())
    return {name: message_factory.GetMessageClass(file.message_types_by_name[name]) for name in _SCHEMA}


messages = _build()


class WireError(ValueError):
    """A protobuf body the service cannot take; the message names where (a 400)."""


@dataclass
class DecodedDatum:
    tokens: list[int]
    inputs: dict[str, np.ndarray]      # 1-D arrays (float32 or int64), one per loss_fn_inputs entry


@dataclass
class DecodedForwardBackward:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float | str]
    forward_only: bool
    data: list[DecodedDatum]


def decompress(body: bytes, encoding: str | None, *, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body as sent, or zstd-decompressed when ``Content-Encoding: zstd``; never more
    than ``limit`` bytes after decompression (a small bomb cannot become a large body)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "zstd":
        raise WireError(f"Content-Encoding {encoding!r} is not supported (zstd or none)")
    import zstandard

    try:
        reader = zstandard.ZstdDecompressor().stream_reader(body)
        out = reader.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise WireError(f"body is not valid zstd: {exc}") from None
    if len(out) > limit:
        raise WireError(f"decompressed body exceeds the local service's limit of {limit} bytes")
    return out


def _array(raw: bytes, dtype: int, where: str) -> np.ndarray:
    np_dtype = _NUMPY.get(dtype)
    if np_dtype is None:
        raise WireError(f"{where}: dtype {dtype} is not supported (float32 or int64)")
    if len(raw) % np_dtype.itemsize:
        raise WireError(f"{where}: {len(raw)} bytes is not a whole number of {_DTYPE_NAMES[dtype]} values")
    return np.frombuffer(raw, dtype=np_dtype)


def _tensor(msg, where: str) -> np.ndarray:
    """A Tensor message as a flat 1-D array in its declared dtype (CSR densified)."""
    shape = [int(s) for s in msg.shape]
    if any(s < 0 for s in shape):
        raise WireError(f"{where}: negative dimension in shape {shape}")
    which = msg.WhichOneof("encoding")
    if which == "sparse_csr":
        if len(shape) != 2:
            raise WireError(f"{where}: a sparse CSR tensor needs a 2-D shape, got {shape}")
        values = _array(msg.sparse_csr.values, msg.dtype, where)
        crow = _array(msg.sparse_csr.crow_indices, DTYPE_INT64, f"{where}.crow_indices")
        col = _array(msg.sparse_csr.col_indices, DTYPE_INT64, f"{where}.col_indices")
        rows, cols = shape
        if (len(crow) != rows + 1 or len(col) != len(values) or (len(crow) and (crow[0] != 0 or crow[-1] != len(values)))
                or np.any(np.diff(crow) < 0) or np.any((col < 0) | (col >= max(cols, 1)))):
            raise WireError(f"{where}: inconsistent sparse CSR indices for shape {shape}")
        dense = np.zeros(rows * cols, dtype=values.dtype)
        row_of = np.repeat(np.arange(rows), np.diff(crow))
        dense[row_of * cols + col] = values
        return dense.reshape(shape)
    values = _array(msg.dense, msg.dtype, where)
    if shape:
        if int(np.prod(shape)) != len(values):
            raise WireError(f"{where}: {len(values)} values do not fill shape {shape}")
        return values.reshape(shape)
    return values


def decode_forward_backward(body: bytes) -> DecodedForwardBackward:
    """A ForwardBackwardRequest body (already decompressed), checked for shape and size."""
    if len(body) > MAX_BODY_BYTES:
        raise WireError(f"body of {len(body)} bytes exceeds the local service's limit of {MAX_BODY_BYTES}")
    request = messages["ForwardBackwardRequest"]()
    try:
        request.ParseFromString(body)
    except DecodeError as exc:
        raise WireError(f"body is not a tinker_public.ForwardBackwardRequest: {exc}") from None
    if len(request.data) > MAX_DATUMS:
        raise WireError(f"{len(request.data)} datums in one request; the limit is {MAX_DATUMS} (the client "
                        "splits larger batches into chunks)")
    config: dict[str, float | str] = {key: float(value) for key, value in request.loss_fn_config.items()}
    for key, value in request.loss_fn_config_v2.items():  # v2 wins where both are set
        which = value.WhichOneof("value")
        if which == "number":
            config[key] = float(value.number)
        elif which == "text":
            config[key] = value.text
    data = []
    for index, datum in enumerate(request.data):
        where = f"data[{index}]"
        tokens: list[int] = []
        for position, chunk in enumerate(datum.model_input):
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise WireError(f"{where}.model_input[{position}]: only encoded_text chunks are supported locally "
                                f"(got {kind or 'an empty chunk'})")
            tokens.extend(_array(chunk.encoded_text.tokens, DTYPE_INT32, f"{where}.model_input[{position}]").tolist())
        inputs = {}
        for name, tensor in datum.loss_fn_inputs.items():
            value = _tensor(tensor, f"{where}.loss_fn_inputs[{name!r}]")
            if value.ndim != 1:
                raise WireError(f"{where}.loss_fn_inputs[{name!r}] has shape {list(value.shape)}; the local trainer "
                                "takes 1-D inputs, one value per input token")
            inputs[name] = value
        data.append(DecodedDatum(tokens, inputs))
    return DecodedForwardBackward(request.model_id, int(request.seq_id), request.loss_fn, config,
                                  bool(request.forward_only), data)


def encode_forward_backward_output(logprobs: list[np.ndarray], metrics: dict[str, float],
                                   output_type: str = "ArrayRecord") -> bytes:
    """One ArrayRecord holding each datum's ``logprobs`` (float32), batched with byte offsets."""
    out = messages["ForwardBackwardOutput"](loss_fn_output_type=output_type)
    for key, value in metrics.items():
        out.metrics[key] = float(value)
    record = out.loss_fn_outputs.add(type_tag=output_type, num_datums=len(logprobs))
    arrays = [np.ascontiguousarray(a, dtype="<f4").reshape(-1) for a in logprobs]
    offsets = np.zeros(len(arrays) + 1, dtype="<i8")
    offsets[1:] = np.cumsum([a.nbytes for a in arrays])
    field = record.fields["logprobs"]
    field.data = b"".join(a.tobytes() for a in arrays)
    field.offsets = offsets.tobytes()
    field.dtype = DTYPE_FLOAT32
    return out.SerializeToString()


def _topk(rows: list[list[tuple[int, float]]], k: int, msg) -> None:
    """Dense N x k matrices; cells a row lacks get token 0 and logprob -99999 (the client's convention)."""
    ids = np.zeros((len(rows), k), dtype="<i4")
    values = np.full((len(rows), k), -99999.0, dtype="<f4")
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate(row[:k]):
            ids[i, j], values[i, j] = token, logprob
    msg.token_ids, msg.logprobs, msg.k, msg.length = ids.tobytes(), values.tobytes(), k, len(rows)


@dataclass
class EncodedSequence:
    tokens: list[int]
    logprobs: list[float]
    stop: bool                                       # True: "stop", False: "length"
    topk: list[list[tuple[int, float]]] | None = None


def encode_sample_response(sequences: list[EncodedSequence], *, prompt_logprobs: list[float] | None = None,
                           prompt_topk: list[list[tuple[int, float]]] | None = None, prompt_k: int = 0,
                           sample_k: int = 0) -> bytes:
    out = messages["SampleResponse"]()
    for seq in sequences:
        msg = out.sequences.add(stop_reason=STOP_REASON_STOP if seq.stop else STOP_REASON_LENGTH,
                                tokens=np.asarray(seq.tokens, dtype="<i4").tobytes(),
                                logprobs=np.asarray(seq.logprobs, dtype="<f4").tobytes())
        if seq.topk is not None and sample_k:
            _topk(seq.topk, sample_k, msg.topk_sampled_logprobs)
    if prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray(prompt_logprobs, dtype="<f4").tobytes()  # NaN where none
    if prompt_topk is not None and prompt_k:
        _topk(prompt_topk, prompt_k, out.topk_prompt_logprobs)
    return out.SerializeToString()
