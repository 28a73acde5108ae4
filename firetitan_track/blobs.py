"""Content-addressed blobs: prompt sets, completions, specs.

A blob is stored once under the hex sha256 of its (redacted) bytes; events hold
that digest. JSON blobs use the canonical encoding below, so equal objects share
one digest.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import TypeAlias, TypeGuard

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from firetitan_track.redact import may_need_redaction, redact, redact_bytes, secret_values
from firetitan_track.store import LedgerError, Store, blobs

__all__ = ["Json", "canonical_json", "sha256_hex", "is_digest", "put_blob", "put_json", "json_digest", "get_blob",
           "get_json"]

# A JSON value as ``json.loads`` gives it: what a blob, an event's payload or a spec holds.
# Values only encoded take ``object`` (the encoder refuses what JSON cannot hold).
Json: TypeAlias = "dict[str, Json] | list[Json] | str | int | float | bool | None"

JSON_MEDIA_TYPE = "application/json"
_DIGEST = re.compile(r"[0-9a-f]{64}")


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(obj: object) -> str:
    """One text per value: sorted keys, no spaces, UTF-8 kept as is."""
    return _CANONICAL.encode(obj)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_digest(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def put_blob(store: Store, data: bytes, media_type: str = "application/octet-stream") -> str:
    """Store ``data`` (secrets masked) once; return its digest."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"put_blob takes bytes, not {type(data).__name__}")
    data = redact_bytes(bytes(data))
    digest = sha256_hex(data)
    with store.engine.connect() as conn:  # a stored blob needs no write transaction (and no fsync)
        if conn.execute(sa.select(blobs.c.size).where(blobs.c.digest == digest)).first() is not None:
            return digest
    stmt = store.insert_ignoring_duplicates(blobs).values(
        digest=digest, media_type=media_type, size=len(data), data=data)
    with store.engine.begin() as conn:
        conn.execute(stmt)
    return digest


def redacted_json(obj: object, secrets: list[str]) -> str:
    """``obj`` as canonical JSON with secrets masked (the redaction walk only when needed)."""
    text = canonical_json(obj)
    return canonical_json(redact(obj, secrets)) if may_need_redaction(text, secrets) else text


def _json_bytes(obj: object) -> bytes:
    try:
        return redacted_json(obj, secret_values()).encode()
    except (TypeError, ValueError) as e:
        raise LedgerError(f"cannot store a JSON blob: {e}") from None


def put_json(store: Store, obj: object) -> str:
    """Store ``obj`` (secrets masked) as canonical JSON; return its digest."""
    return put_blob(store, _json_bytes(obj), JSON_MEDIA_TYPE)


def json_digest(obj: object) -> str:
    """The digest ``put_json`` gives ``obj``, without storing it: every JSON digest the
    ledger records (spec, prompt sets, completions) is the digest of a blob."""
    return sha256_hex(redact_bytes(_json_bytes(obj)))


def get_blob(store: Store, digest: str) -> bytes:
    with store.engine.connect() as conn:
        data = read_blob(conn, digest)
    if data is None:
        raise LedgerError(f"no blob with digest {digest}")
    return data


def get_json(store: Store, digest: str) -> Json:
    return json.loads(get_blob(store, digest))


def read_blob(conn: Connection, digest: str) -> bytes | None:
    data = conn.execute(sa.select(blobs.c.data).where(blobs.c.digest == digest)).scalar()
    return None if data is None else bytes(data)
