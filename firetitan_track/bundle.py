"""Audit bundles: runs carried out of one ledger, checked with no ledger, added to another.

A bundle is a ``.tar.gz`` anyone can open::

    manifest.json          format, format_version, every stream and blob with its sha256
    events/<n>.jsonl       one stream per file: one event per line, exactly as recorded
                           (run_id, version, event_id, type, schema_version, recorded_at,
                           hash, data)
    blobs/<digest>         every blob the events reference (spec, prompt sets, completions)

Verification needs nothing but the file: the gzip stream is decompressed whole (its CRC
and length cover every byte of the tar), the gzip header must be the fixed one written
here, each member must hash to the manifest's sha256, each stream's hash chain is
recomputed with the ledger's own ``check_chain`` and each blob must hash to its name.
So a flipped byte anywhere is caught, and the first bad item is named.

Writing is deterministic (sorted members, zero times), so the same runs give the same
bytes. Events travel with their ids, versions, times and hashes; importing keeps them,
so ``verify``, ``audit``, ``lineage``, ``replay`` and the MLflow export read the same on
the other side. Nothing holding a credential of the current environment is written or
imported (a bundle cannot be redacted after the fact without breaking its chains).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import sqlalchemy as sa

from firetitan_track.blobs import canonical_json, is_digest, redacted_json, sha256_hex
from firetitan_track.errors import UserError
from firetitan_track.events import CATALOGUE
from firetitan_track.ledger import Ledger, NotFound, Problem, check_chain
from firetitan_track.redact import may_need_redaction, redact_bytes, secret_values
from firetitan_track.store import blobs as blob_table

__all__ = ["BundleError", "BundleProblem", "Bundle", "BundleSummary", "ImportReport", "FORMAT",
           "FORMAT_VERSION", "write_bundle", "read_bundle", "importable_bundle", "import_bundle"]

FORMAT = "firetitan-track bundle"
FORMAT_VERSION = 1  # raise on any change an older reader would misread
MANIFEST = "manifest.json"
# The gzip header (RFC 1952): magic, deflate, FCOMMENT, mtime 0, max compression, OS
# unknown, then a comment holding the sha256 of every byte after the header. The gzip CRC
# covers only the decompressed data, and deflate can decode a flipped bit to the same
# output, so this digest is what makes every byte of the file count.
_GZIP_FIXED = b"\x1f\x8b\x08\x10\x00\x00\x00\x00\x02\xff"
_COMMENT = b"firetitan-track bundle sha256="
_HEADER_LEN = len(_GZIP_FIXED) + len(_COMMENT) + 64 + 1
_EVENT_KEYS = ("run_id", "version", "event_id", "type", "schema_version", "recorded_at", "hash", "data")


class BundleError(UserError):
    """A file that cannot be bundled, read or imported as asked; the message says which and why."""


@dataclass(frozen=True)
class BundleProblem:
    """Something in a bundle that does not check out: the item and why."""

    item: str
    reason: str

    def __str__(self) -> str:
        return f"{self.item}: {self.reason}"


@dataclass
class Bundle:
    """A bundle as read: its manifest, its streams (rows as ``Ledger.stored_rows`` gives them),
    its blobs, and what verification found wrong (empty: intact)."""

    path: str
    manifest: dict[str, Any]
    streams: dict[str, list[dict[str, Any]]]
    blobs: dict[str, tuple[str, bytes]]  # digest -> (media type, bytes)
    problems: list[BundleProblem] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems

    @property
    def events(self) -> int:
        return sum(len(rows) for rows in self.streams.values())


@dataclass(frozen=True)
class BundleSummary:
    path: str
    streams: list[str]
    events: int
    blobs: int
    size: int
    sha256: str


@dataclass(frozen=True)
class ImportReport:
    written: dict[str, int]  # stream -> events newly written (0: already held)
    blobs: int

    @property
    def events(self) -> int:
        return sum(self.written.values())


# -- writing ------------------------------------------------------------------------


def write_bundle(ledger: Ledger, out: str | os.PathLike[str], run_ids: Sequence[str] = (),
                 sweep_ids: Sequence[str] = ()) -> BundleSummary:
    """Write the runs (and each sweep's stream with its trials' runs) to ``out``.

    Every stream is read before anything is written; an unknown run or sweep, or an event
    or blob holding a credential of the current environment, leaves no file behind.
    """
    names = _stream_names(ledger, run_ids, sweep_ids)
    if not names:
        raise BundleError("name at least one run or --sweep to bundle")
    streams = {name: ledger.stored_rows(name) for name in names}
    blobs = _referenced_blobs(ledger, streams)
    _refuse_secrets(streams, blobs)

    members: list[tuple[str, bytes]] = []
    manifest_streams = []
    for n, (name, rows) in enumerate(streams.items()):
        lines = []
        for r in rows:
            data = json.loads(r["data"])
            if canonical_json(data) != r["data"]:  # our appends store canonical JSON; anything else would not travel
                raise BundleError(f"run {name} version {r['version']}: its payload is not canonical JSON, "
                                  "so it cannot be carried exactly")
            lines.append(canonical_json({**{k: r[k] for k in _EVENT_KEYS if k != "data"}, "data": data}))
        body = ("\n".join(lines) + "\n").encode()
        file = f"events/{n:04d}.jsonl"
        members.append((file, body))
        manifest_streams.append({"run_id": name, "file": file, "events": len(rows),
                                 "head_hash": rows[-1]["hash"], "sha256": sha256_hex(body)})
    manifest_blobs = []
    for digest in sorted(blobs):
        media_type, data = blobs[digest]
        members.append((f"blobs/{digest}", data))
        manifest_blobs.append({"digest": digest, "media_type": media_type, "size": len(data),
                               "file": f"blobs/{digest}", "sha256": digest})
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "sweeps": list(sweep_ids), "streams": manifest_streams, "blobs": manifest_blobs}
    payload = _pack([(MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()), *members])
    _write_atomically(Path(out), payload)
    return BundleSummary(str(out), list(streams), sum(len(r) for r in streams.values()), len(blobs),
                         len(payload), sha256_hex(payload))


def _stream_names(ledger: Ledger, run_ids: Sequence[str], sweep_ids: Sequence[str]) -> list[str]:
    from firetitan_track.projections.compare import sweep_stream, sweep_trials

    names = list(dict.fromkeys(run_ids))
    for sweep_id in sweep_ids:
        stream = sweep_stream(sweep_id)
        if ledger.stream_version(stream) == 0:
            raise NotFound(f"no sweep {sweep_id!r} in the ledger")
        names.append(stream)
        # a trial never started has no stream yet: nothing of it to carry
        names += [t["run_id"] for t in sweep_trials(ledger.read(stream)) if ledger.stream_version(t["run_id"]) > 0]
    return list(dict.fromkeys(names))


def _referenced_blobs(ledger: Ledger, streams: dict[str, list[dict[str, Any]]]) -> dict[str, tuple[str, bytes]]:
    """Every stored blob whose digest appears anywhere in the events (``*_digest`` fields, the
    prompt-set map of RunStarted, ...); a digest with no blob names inline content."""
    wanted = sorted({d for rows in streams.values() for r in rows for d in _digests(json.loads(r["data"]))})
    found: dict[str, tuple[str, bytes]] = {}
    with ledger.engine.connect() as conn:
        for i in range(0, len(wanted), 500):
            stmt = sa.select(blob_table.c.digest, blob_table.c.media_type, blob_table.c.data).where(
                blob_table.c.digest.in_(wanted[i:i + 500]))
            for digest, media_type, data in conn.execute(stmt):
                found[digest] = (media_type, bytes(data))
    return found


def _digests(node: Any) -> Iterator[str]:
    if is_digest(node):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _digests(value)
    elif isinstance(node, list):
        for value in node:
            yield from _digests(value)


def _refuse_secrets(streams: dict[str, list[dict[str, Any]]], blobs: dict[str, tuple[str, bytes]]) -> None:
    """Refuse anything that redaction would still change now: a credential named in a payload
    or the value of a credential in this environment (set after the event was recorded)."""
    secrets = secret_values()
    for name, rows in streams.items():
        for r in rows:
            text = r["data"]
            if may_need_redaction(text, secrets) and redacted_json(json.loads(text), secrets) != text:
                raise BundleError(f"run {name} version {r['version']} ({r['type']}) holds a credential "
                                  "(a secret-named field or the value of one in this environment); "
                                  "it is not carried in a bundle")
    for digest, (_, data) in blobs.items():
        if redact_bytes(data) != data:
            raise BundleError(f"blob {digest} holds the value of a credential in this environment; "
                              "it is not carried in a bundle")


def _pack(members: list[tuple[str, bytes]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    # the gzip framing by hand (RFC 1952), so the header is the fixed one whatever Python writes
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflate.compress(tar_bytes) + deflate.flush()
    trailer = struct.pack("<II", zlib.crc32(tar_bytes), len(tar_bytes) & 0xFFFFFFFF)
    rest = body + trailer
    return _GZIP_FIXED + _COMMENT + sha256_hex(rest).encode() + b"\0" + rest


def _write_atomically(path: Path, payload: bytes) -> None:
    """The whole file or none: written beside its target, then renamed over it."""
    if not path.parent.is_dir():
        raise BundleError(f"cannot write {path}: folder {path.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise BundleError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise BundleError(f"cannot write {path}: {e.strerror or e}") from None
        raise


# -- reading and verifying ---------------------------------------------------------------


def read_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read and verify a bundle with no ledger.

    A file that is not a bundle, is truncated or damaged beyond reading, or comes from a
    newer bundle format raises BundleError; anything else wrong is listed in
    ``problems`` (the first bad version of a chain, a blob or member that does not hash
    to its digest, a member missing or not in the manifest).
    """
    where = str(path)
    try:
        packed = Path(path).read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read {where}: {e.strerror or e}") from None
    if packed[:2] != _GZIP_FIXED[:2]:
        raise BundleError(f"{where} is not a firetitan-track bundle (not gzip data)")
    problems = _check_header(packed)
    members = _unpack(where, packed)
    manifest = _manifest(where, members.pop(MANIFEST, None))

    bundle = Bundle(where, manifest, {}, {}, problems)
    listed: set[str] = set()
    for entry in manifest["streams"]:
        listed.add(entry["file"])
        body = _member(bundle, members, entry)
        if body is not None:
            rows = _stream_rows(bundle, entry, body)
            if rows is not None:
                bundle.streams[entry["run_id"]] = rows
    for entry in manifest["blobs"]:
        listed.add(entry["file"])
        data = _member(bundle, members, entry)
        if data is None:
            continue
        if sha256_hex(data) != entry["digest"]:
            problems.append(BundleProblem(f"blob {entry['digest']}", "its content does not hash to its digest"))
        else:
            bundle.blobs[entry["digest"]] = (str(entry.get("media_type") or "application/octet-stream"), data)
    for name in sorted(set(members) - listed):
        problems.append(BundleProblem(name, "not listed in the manifest"))
    return bundle


def _check_header(packed: bytes) -> list[BundleProblem]:
    header, rest = packed[:_HEADER_LEN], packed[_HEADER_LEN:]
    digest = header[len(_GZIP_FIXED) + len(_COMMENT):-1]
    if (header[:len(_GZIP_FIXED)] != _GZIP_FIXED or header[len(_GZIP_FIXED):-65] != _COMMENT
            or header[-1:] != b"\0" or not is_digest(digest.decode("latin-1"))):
        return [BundleProblem(f"gzip header (bytes 0-{_HEADER_LEN - 1})",
                              "altered: it is not the header firetitan-track writes")]
    if sha256_hex(rest) != digest.decode():
        return [BundleProblem(f"compressed data (bytes {_HEADER_LEN}-{len(packed) - 1})",
                              "altered: its sha256 differs from the one in the gzip header")]
    return []


def _unpack(where: str, packed: bytes) -> dict[str, bytes]:
    """The tar members by name; the whole gzip stream is decompressed, so its CRC and length
    (and anything appended after it) are checked."""
    try:
        raw = gzip.decompress(packed)
    except EOFError:
        raise BundleError(f"{where} is truncated: its compressed data ends early "
                          f"(after {len(packed)} bytes); copy it again") from None
    except (OSError, zlib.error) as e:
        raise BundleError(f"{where} is damaged: its compressed data does not decode ({e})") from None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    raise BundleError(f"{where}: member {info.name!r} is not a plain file")
                if info.name in members:
                    raise BundleError(f"{where}: member {info.name!r} appears twice")
                f = tar.extractfile(info)
                members[info.name] = f.read() if f is not None else b""
    except tarfile.TarError as e:
        raise BundleError(f"{where} is not a firetitan-track bundle (not a tar archive: {e})") from None
    return members


def _manifest(where: str, body: bytes | None) -> dict[str, Any]:
    if body is None:
        raise BundleError(f"{where} is not a firetitan-track bundle (it has no {MANIFEST})")
    try:
        manifest = json.loads(body)
    except ValueError as e:
        raise BundleError(f"{where}: {MANIFEST} is not JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{where} is not a firetitan-track bundle ({MANIFEST} does not say "
                          f"format {FORMAT!r})")
    version = manifest.get("format_version")
    if type(version) is not int:
        raise BundleError(f"{where}: {MANIFEST} has no format_version")
    if version > FORMAT_VERSION:
        raise BundleError(f"{where} was written by a newer firetitan-track (bundle format {version}; "
                          f"this one reads format {FORMAT_VERSION} and older): upgrade firetitan-track")
    try:
        for entry in manifest["streams"]:
            _require(entry, {"run_id": str, "file": str, "events": int, "head_hash": str, "sha256": str})
        for entry in manifest["blobs"]:
            _require(entry, {"digest": str, "file": str, "sha256": str})
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{where}: {MANIFEST} is malformed ({e})") from None
    return manifest


def _require(entry: Any, fields: dict[str, type]) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"an entry is {type(entry).__name__}, not an object")
    for name, kind in fields.items():
        if type(entry.get(name)) is not kind:
            raise ValueError(f"entry {entry.get('file') or entry}: {name} is missing or not a {kind.__name__}")


def _member(bundle: Bundle, members: dict[str, bytes], entry: dict[str, Any]) -> bytes | None:
    body = members.get(entry["file"])
    if body is None:
        bundle.problems.append(BundleProblem(entry["file"], "listed in the manifest but missing"))
        return None
    if hashlib.sha256(body).hexdigest() != entry["sha256"]:
        bundle.problems.append(BundleProblem(entry["file"], "altered: its sha256 differs from the manifest's"))
    return body


def _stream_rows(bundle: Bundle, entry: dict[str, Any], body: bytes) -> list[dict[str, Any]] | None:
    """The stream's rows, its chain recomputed by the ledger's own check; None when unreadable."""
    name, file = entry["run_id"], entry["file"]
    rows = []
    for n, line in enumerate(body.splitlines(), start=1):
        try:
            ev = json.loads(line)
            row = {k: ev[k] for k in _EVENT_KEYS}
            row["data"] = canonical_json(row["data"])  # the stored text, byte for byte
        except (ValueError, KeyError, TypeError) as e:
            bundle.problems.append(BundleProblem(f"{file} line {n}", f"not an event ({e})"))
            return None
        if row["run_id"] != name:
            bundle.problems.append(BundleProblem(f"{file} line {n}", f"names run {row['run_id']!r}, not {name!r}"))
            return None
        rows.append(row)
    problem = check_chain(name, (_Row(r) for r in rows), {})
    if problem is not None:
        bundle.problems.append(_chain_problem(problem))
    elif len(rows) != entry["events"] or (rows and rows[-1]["hash"] != entry["head_hash"]):
        bundle.problems.append(BundleProblem(
            f"run {name}", f"the manifest lists {entry['events']} events ending in {entry['head_hash'][:12]}, "
                           f"the stream holds {len(rows)}"))
    return rows


class _Row:
    """A row dict read by attribute, as check_chain reads database rows."""

    def __init__(self, row: dict[str, Any]) -> None:
        self.__dict__.update(row)


def _chain_problem(p: Problem) -> BundleProblem:
    return BundleProblem(f"run {p.run_id} version {p.version}", p.reason)


# -- importing ---------------------------------------------------------------------------


def importable_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read the bundle and refuse it (BundleError) unless it verifies, this version can read
    every event in it, and nothing in it holds a credential; touches no ledger."""
    bundle = read_bundle(path)
    if bundle.problems:
        raise BundleError(f"{bundle.path} does not verify ({bundle.problems[0]}); nothing was imported")
    _refuse_newer_events(bundle)
    _refuse_secrets(bundle.streams, bundle.blobs)
    return bundle


def import_bundle(ledger: Ledger, bundle: Bundle | str | os.PathLike[str]) -> ImportReport:
    """Add a bundle's streams and blobs to ``ledger`` in one transaction, after checking it
    (``importable_bundle``).

    Importing again writes nothing; a run the ledger holds with a different history is
    refused. On any error nothing is written.
    """
    if not isinstance(bundle, Bundle):
        bundle = importable_bundle(bundle)
    blobs = [(digest, media_type, data) for digest, (media_type, data) in sorted(bundle.blobs.items())]
    written = ledger.import_rows(bundle.streams, blobs)
    return ImportReport(written, len(blobs))


def _refuse_newer_events(bundle: Bundle) -> None:
    """Events this version cannot read (an unknown type, a schema version ahead of the
    catalogue) would break every view of the run; refuse them before writing."""
    for name, rows in bundle.streams.items():
        for r in rows:
            known = CATALOGUE.get(r["type"])
            if known is None or r["schema_version"] > known.version:
                what = (f"event type {r['type']!r}" if known is None else
                        f"{r['type']} schema version {r['schema_version']} (this one knows {known.version})")
                raise BundleError(f"{bundle.path}: run {name} version {r['version']} has {what}: it was "
                                  "written by a newer firetitan-track; upgrade to import it")
