"""Forging bundles the way an attacker would: edit what the bundle holds, then recompute
every digest a reader checks (event hashes, member sha256s, the manifest, the gzip header),
so that only what cannot be recomputed without a key (signed heads) or what the format's
rules forbid is left to catch the forgery."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

from firetitan_track.blobs import canonical_json
from firetitan_track.bundle import _COMMENT, _GZIP_FIXED, MANIFEST, _frame, _pack
from firetitan_track.ledger import GENESIS_HASH, event_hash
from firetitan_track.signing import SigningKey


def members_of(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def rechained(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    prev = GENESIS_HASH
    for r in rows:
        r["hash"] = prev = event_hash(prev, r["run_id"], r["version"], r["event_id"], r["type"],
                                      r["schema_version"], canonical_json(r["data"]), r["recorded_at"])
    return rows


class Forgery:
    """A bundle's members opened for editing; ``write`` packs them with every digest recomputed."""

    def __init__(self, path: Path) -> None:
        self.members = members_of(path)
        self.manifest = json.loads(self.members[MANIFEST])

    def entry(self, run_id: str) -> dict[str, Any]:
        return next(s for s in self.manifest["streams"] if s["run_id"] == run_id)

    def rows(self, run_id: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.members[self.entry(run_id)["file"]].decode().splitlines()]

    def set_rows(self, run_id: str, rows: list[dict[str, Any]], *, rechain: bool = True) -> None:
        """Store ``rows`` as the run's stream (renumbered from 0 and re-hashed unless ``rechain`` is
        False), with the manifest's count, head and sha256 to match."""
        entry = self.entry(run_id)
        if rechain:
            for v, r in enumerate(rows):
                r["version"] = v
            rows = rechained(rows)
        body = "".join(canonical_json(r) + "\n" for r in rows).encode()
        self.members[entry["file"]] = body
        entry.update(sha256=hashlib.sha256(body).hexdigest(), events=len(rows),
                     head_hash=rows[-1]["hash"] if rows else "")

    def drop_heads(self, run_id: str | None = None) -> None:
        self.manifest["signed_heads"] = [h for h in self.manifest.get("signed_heads", [])
                                         if run_id is not None and h["run_id"] != run_id]

    def sign_heads(self, run_id: str, key: SigningKey) -> None:
        """Sign the run's (forged) head with ``key``: what a forger holding a key of their own does."""
        rows = self.rows(run_id)
        self.manifest["signed_heads"].append(key.sign(run_id, rows[-1]["version"], rows[-1]["hash"]).to_dict())

    def packed(self) -> bytes:
        self.members[MANIFEST] = json.dumps(self.manifest, indent=1, sort_keys=True).encode()
        return _pack([(MANIFEST, self.members[MANIFEST])] + [(k, v) for k, v in self.members.items() if k != MANIFEST])

    def write(self, path: Path) -> Path:
        path.write_bytes(self.packed())
        return path


def framed_tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """A tar of hand-made headers (any name, type or claimed size), framed as a bundle is."""
    raw = io.BytesIO()
    for info, data in entries:
        raw.write(info.tobuf(tarfile.PAX_FORMAT))
        raw.write(data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
    raw.write(b"\0" * tarfile.BLOCKSIZE * 2)
    return _frame(raw.getvalue())


def zero_bomb(path: Path, member: str | tarfile.TarInfo, size: int, manifest: bytes | None = None) -> Path:
    """A bundle whose member ``member`` (a name, or a hand-made header) holds ``size`` zero bytes
    (whole MiBs), after ``manifest`` if given, framed and digested as the writer does: a
    compression bomb whose every digest is right. The zeros are compressed a MiB at a time,
    never held in memory."""
    head = b""
    if manifest is not None:
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(manifest)
        head = info.tobuf(tarfile.PAX_FORMAT) + manifest + b"\0" * (-len(manifest) % tarfile.BLOCKSIZE)
    info = member if isinstance(member, tarfile.TarInfo) else tarfile.TarInfo(member)
    info.size = size
    head += info.tobuf(tarfile.USTAR_FORMAT if info.type == tarfile.XHDTYPE else tarfile.PAX_FORMAT)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    crc, body = zlib.crc32(head), [deflate.compress(head)]
    zeros = bytes(1 << 20)
    for _ in range(size >> 20):
        crc = zlib.crc32(zeros, crc)
        body.append(deflate.compress(zeros))
    tail = bytes(2 * tarfile.BLOCKSIZE)  # the archive's end
    crc = zlib.crc32(tail, crc)
    body += [deflate.compress(tail), deflate.flush()]
    rest = b"".join(body) + struct.pack("<II", crc, (len(head) + (size >> 20 << 20) + len(tail)) & 0xFFFFFFFF)
    path.write_bytes(_GZIP_FIXED + _COMMENT + hashlib.sha256(rest).hexdigest().encode() + b"\0" + rest)
    return path
