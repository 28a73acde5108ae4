"""Wire shapes shared by the endpoints: errors, JSON bodies, tensors, datums.

The SDK sends tensors as ``{"data": [...], "dtype": "float32"|"int64", "shape": [...]}``
(optionally sparse CSR with ``sparse_crow_indices``/``sparse_col_indices``) and
datums as ``{"model_input": {"chunks": [{"type": "encoded_text", "tokens": [...]}]},
"loss_fn_inputs": {name: tensor}}``. Decoding validates everything the engine
would otherwise trip over (vocabulary, context length, shapes), so bad input is a
400 with a message rather than an exception deep inside torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar, overload

import orjson
from starlette.requests import Request
from starlette.responses import Response

if TYPE_CHECKING:
    import torch

    from firetitan_track.blobs import Json

_GRPC_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 409: "ALREADY_EXISTS",
                412: "FAILED_PRECONDITION", 413: "INVALID_ARGUMENT", 500: "INTERNAL", 503: "UNAVAILABLE"}


class ApiError(Exception):
    """An error the client caused (4xx) or should see verbatim; rendered as JSON."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # orjson: several times faster than the stdlib on the tensor-heavy bodies.
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=headers)


PROTOBUF = "application/x-protobuf"


def result_response(payload: dict, request: Request) -> Response:
    """A finished call's payload, as the client retrieving it asked for it. A payload that
    can go as protobuf holds two encoders, ``{"_proto": ..., "_json": ...}``, and only the one
    the request's Accept header picks is called; any other payload is JSON as it stands."""
    if "_proto" not in payload:
        return json_response(payload)
    if PROTOBUF in request.headers.get("accept", ""):
        return Response(payload["_proto"](), media_type=PROTOBUF)
    return json_response(payload["_json"]())


def error_response(status: int, message: str) -> Response:
    # Google-style error body: the SDK's parse_api_error reads error.message.
    body = {"error": {"code": status, "message": message, "status": _GRPC_STATUS.get(status, "UNKNOWN")}}
    return json_response(body, status)


# The largest request body any endpoint reads. The SDK splits forward_backward into chunks
# of about 5 MB (estimated; more as JSON), and a completions prompt at a long context is a
# few MB of token ids: 64 MiB leaves room for both, and a 100 MB paste is refused as it
# arrives (by its Content-Length, else while streaming), before anything parses it.
MAX_BODY_BYTES = 64 * 2**20


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = f"request body exceeds the local service's limit of {limit // 2**20} MiB"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"{too_large} (Content-Length {declared})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, *, required: bool = True) -> dict:
    raw = await read_body(request)
    if not raw.strip():
        if required:
            raise ApiError(400, "request body must be a JSON object")
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


T = TypeVar("T")


# the value is the ``kind`` asked for (None only when absent, not required and no default given)
@overload
def field(body: dict, name: str, kind: type[T]) -> T: ...
@overload
def field(body: dict, name: str, kind: type[T], *, required: bool, default: T) -> T: ...
@overload
def field(body: dict, name: str, kind: type[T], *, required: bool) -> T | None: ...


def field(body: dict, name: str, kind: type | tuple[type, ...], *, required: bool = True,
          default: object = None) -> object:
    """``body[name]``, checked to be a ``kind``; ``default`` when it is absent and not ``required``."""
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"missing field {name!r}")
        return default
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ApiError(400, f"field {name!r} has the wrong type (got bool)")
    if not isinstance(value, kind):
        raise ApiError(400, f"field {name!r} has the wrong type (got {type(value).__name__})")
    return value


# -- tensors -------------------------------------------------------------------

def decode_tensor(obj: Json, name: str) -> torch.Tensor:
    """A wire tensor as a torch tensor (dense), validated."""
    import torch

    if not isinstance(obj, dict) or "data" not in obj:
        raise ApiError(400, f"loss_fn_inputs[{name!r}] must be a tensor object with 'data' and 'dtype'")
    dtype_name = obj.get("dtype")
    if dtype_name not in ("float32", "int64"):
        raise ApiError(400, f"loss_fn_inputs[{name!r}]: unsupported dtype {dtype_name!r} (float32 or int64)")
    dtype = torch.float32 if dtype_name == "float32" else torch.int64
    data = obj["data"]
    shape = obj.get("shape")
    if not isinstance(data, list):
        raise ApiError(400, f"loss_fn_inputs[{name!r}].data must be a list")
    try:
        values = torch.tensor(data, dtype=dtype)
        if obj.get("sparse_crow_indices") is not None:
            if shape is None or obj.get("sparse_col_indices") is None:
                raise ApiError(400, f"loss_fn_inputs[{name!r}]: sparse tensors need shape and sparse_col_indices")
            crow = torch.tensor(obj["sparse_crow_indices"], dtype=torch.int64)
            col = torch.tensor(obj["sparse_col_indices"], dtype=torch.int64)
            return torch.sparse_csr_tensor(crow, col, values, shape).to_dense()
        if shape is not None:
            values = values.reshape(shape)
        return values
    except ApiError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ApiError(400, f"loss_fn_inputs[{name!r}] is not a valid tensor: {exc}") from None


def encode_tensor(tensor: torch.Tensor) -> dict:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    dtype = "int64" if not tensor.is_floating_point() else "float32"
    if dtype == "float32" and tensor.dtype != __import__("torch").float32:
        tensor = tensor.float()
    return {"data": tensor.reshape(-1).tolist(), "dtype": dtype, "shape": list(tensor.shape)}


def encode_floats(values: list[float]) -> dict:
    """A 1-D float32 tensor already converted to floats: what ``encode_tensor`` sends for it."""
    return {"data": values, "dtype": "float32", "shape": [len(values)]}


# -- datums --------------------------------------------------------------------

def datum_tokens(datum: Json, index: int) -> list[int]:
    """The flat token list of one datum's model_input (its shape only: the engine's
    check_examples holds the rules about vocabulary and context)."""
    if not isinstance(datum, dict):
        raise ApiError(400, f"data[{index}] must be an object")
    model_input = datum.get("model_input")
    if not isinstance(model_input, dict) or not isinstance(model_input.get("chunks"), list):
        raise ApiError(400, f"data[{index}].model_input.chunks must be a list")
    tokens: list[int] = []
    for chunk in model_input["chunks"]:
        if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text":
            kind = chunk.get("type") if isinstance(chunk, dict) else type(chunk).__name__
            raise ApiError(400, f"data[{index}]: only encoded_text chunks are supported locally (got {kind!r})")
        chunk_tokens = chunk.get("tokens")
        if not isinstance(chunk_tokens, list):
            raise ApiError(400, f"data[{index}]: chunk tokens must be a list of ints")
        tokens.extend(chunk_tokens)
    return tokens


def dense_columns(data: Json) -> tuple[list[list[int]], dict[str, torch.Tensor]] | None:
    """The usual forward(_backward) ``data`` read as whole-batch columns: (each datum's token
    list, {loss input name: [B, L] tensor}), when every datum is one encoded_text chunk of the
    same length L and carries the same dense loss inputs, each L values of one dtype.

    One ``torch.tensor`` per input converts every value as ``decode_tensor`` does datum by
    datum. None for anything else (ragged, sparse, several chunks, a malformed field): that
    request takes ``datum_tokens`` and ``decode_tensor``, whose messages name what is wrong."""
    import torch

    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        return None
    first_inputs = data[0].get("loss_fn_inputs")
    if not isinstance(first_inputs, dict):
        return None
    dtypes: dict[str, str] = {}
    for name, obj in first_inputs.items():
        dtype = obj.get("dtype") if isinstance(obj, dict) else None
        if dtype not in ("float32", "int64"):
            return None
        dtypes[name] = dtype
    tokens: list[list] = []
    rows: dict[str, list[list]] = {name: [] for name in dtypes}
    width = -1
    for datum in data:
        model_input = datum.get("model_input") if isinstance(datum, dict) else None
        chunks = model_input.get("chunks") if isinstance(model_input, dict) else None
        if not isinstance(chunks, list) or len(chunks) != 1 or not isinstance(chunks[0], dict):
            return None
        chunk = chunks[0]
        chunk_tokens = chunk.get("tokens")
        if chunk.get("type", "encoded_text") != "encoded_text" or not isinstance(chunk_tokens, list):
            return None
        if width < 0:
            width = len(chunk_tokens)
        inputs = datum.get("loss_fn_inputs")
        if len(chunk_tokens) != width or not isinstance(inputs, dict) or inputs.keys() != rows.keys():
            return None
        tokens.append(chunk_tokens)
        for name, obj in inputs.items():
            values = obj.get("data") if isinstance(obj, dict) else None
            if (not isinstance(values, list) or len(values) != width or obj.get("dtype") != dtypes[name]
                    or obj.get("sparse_crow_indices") is not None):
                return None
            shape = obj.get("shape")
            if shape is not None and not (type(shape) is list and len(shape) == 1 and type(shape[0]) is int
                                          and shape[0] == width):
                return None
            rows[name].append(values)
    columns = {}
    for name, values in rows.items():
        try:
            column = torch.tensor(values, dtype=torch.float32 if dtypes[name] == "float32" else torch.int64)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            return None
        if column.shape != (len(data), width):  # e.g. nested lists as values
            return None
        columns[name] = column
    return tokens, columns


def check_token_ids(tokens: list, where: str, *, vocab_size: int) -> None:
    for token in tokens:
        if type(token) is not int:
            raise ApiError(400, f"{where}: token ids must be integers (got {token!r})")
        if not 0 <= token < vocab_size:
            raise ApiError(400, f"{where}: token id {token} is outside the vocabulary [0, {vocab_size})")
