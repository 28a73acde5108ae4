"""Audit bundles: runs carried out of one ledger, checked with no ledger, added to another.

A bundle is a ``.tar.gz`` anyone can open::

    manifest.json          format, format_version, every stream and blob with its sha256,
                           and the signed heads that vouch for the streams (signing.py)
    events/<n>.jsonl       one stream per file: one event per line, exactly as recorded
                           (run_id, version, event_id, type, schema_version, recorded_at,
                           hash, data)
    blobs/<digest>         every blob the events reference (spec, prompt sets, completions)

Verification needs nothing but the file: the gzip stream is decompressed to its end (its
CRC and length cover every byte of the tar), the gzip header must be the fixed one
written here, each member must hash to the manifest's sha256, each stream is checked
with the ledger's own ``check_stream`` (its hash chain, each payload against its event
type), each blob must hash to its name, and each signed head must verify and be reached.
So a flipped byte anywhere is caught, and the first bad item is named; a forger who
recomputes every digest is caught by the signed heads, and ``verify --trust KEY`` says
whether a key the reader trusts vouches for each stream.

A bundle is untrusted input. It is read as a stream, never whole: limits on what it may
expand to in all, per member, and in parsed manifest and events (``Limits``) refuse a
compression bomb early, naming the limit; member names must be the canonical ones this
module writes (no ``../x``, no ``/tmp/x``: extracting a bundle with ``tar`` writes only
under its folder); run ids follow the run-id rule (ids.py).

Writing is deterministic (sorted members, zero times), so the same runs give the same
bytes. Events travel with their ids, versions, times and hashes; importing keeps them,
so ``verify``, ``audit``, ``lineage``, ``replay`` and the MLflow export read the same on
the other side. Nothing holding a credential of the current environment is written or
imported (a bundle cannot be redacted after the fact without breaking its chains).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import struct
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Iterable, Iterator, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from firetitan_track.blobs import canonical_json, is_digest, redacted_json, sha256_hex
from firetitan_track.errors import UserError
from firetitan_track.events import CATALOGUE, blob_references, sweep_trials
from firetitan_track.ids import RUN_ID_RULE, is_stream_id, run_id_problem, sweep_stream
from firetitan_track.ledger import Ledger, LedgerError, NotFound, Problem, check_chain, check_stream, unknown_run
from firetitan_track.redact import may_need_redaction, redact_bytes, secret_values
from firetitan_track.signing import HeadCheck, SignedHead, check_heads
from firetitan_track.store import Store
from firetitan_track.store import blobs as blob_table
from firetitan_track.store import events as event_table
from firetitan_track.store import signed_heads as head_table

__all__ = ["BundleError", "BundleProblem", "Bundle", "BlobEntry", "BundleSummary", "ImportReport", "Limits",
           "FORMAT", "FORMAT_VERSION", "write_bundle", "read_bundle", "bundle_blobs", "importable_bundle",
           "import_bundle", "import_streams", "StreamStore", "RowView", "ROW_KEYS"]

FORMAT = "firetitan-track bundle"
FORMAT_VERSION = 2  # raise on any change an older reader would misread (2: signed heads)
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


@dataclass(frozen=True)
class BlobEntry:
    media_type: str
    size: int


@dataclass
class Bundle:
    """A bundle as read: its manifest, its streams (rows as ``StreamStore.rows`` gives them),
    its blobs (checked, not kept: ``bundle_blobs`` reads them again one at a time), its
    signed heads and what they vouch for, and what verification found wrong (empty: intact)."""

    path: str
    manifest: dict[str, Any]
    streams: dict[str, list[dict[str, Any]]]
    blobs: dict[str, BlobEntry]  # digest -> what it is
    problems: list[BundleProblem] = field(default_factory=list)
    heads: list[SignedHead] = field(default_factory=list)
    head_checks: dict[str, HeadCheck] = field(default_factory=dict)  # per stream: who vouches how far

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

    Every stream is read and checked before anything is written: an unknown run or sweep, a
    stream that does not verify here (its chain, its payloads, its signed heads), a blob an
    event names that the ledger lacks, or an event or blob holding a credential of the
    current environment leaves no file behind.
    """
    names = _stream_names(ledger, run_ids, sweep_ids)
    if not names:
        raise BundleError("name at least one run or --sweep to bundle")
    store = StreamStore(ledger)
    streams = {name: store.rows(name) for name in names}
    heads = {name: store.heads(name) for name in names}
    for name, rows in streams.items():
        problem = check_stream(name, [RowView(r) for r in rows])
        problems = [f"version {v}: {why}" for v, why in check_heads(name, [r["hash"] for r in rows],
                                                                    heads[name]).problems]
        if problem is not None or problems:
            raise BundleError(f"run {name} does not verify in this ledger ({problem or problems[0]}); run "
                              "`firetitan-track verify` to find every damaged event; no bundle was written")
    blobs = _referenced_blobs(store, streams)
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
                "sweeps": list(sweep_ids), "streams": manifest_streams, "blobs": manifest_blobs,
                "signed_heads": [h.to_dict() for name in streams for h in heads[name]]}
    payload = _pack([(MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()), *members])
    _write_atomically(Path(out), payload)
    return BundleSummary(str(out), list(streams), sum(len(r) for r in streams.values()), len(blobs),
                         len(payload), sha256_hex(payload))


def _stream_names(ledger: Ledger, run_ids: Sequence[str], sweep_ids: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(run_ids))
    for sweep_id in sweep_ids:
        stream = sweep_stream(sweep_id)
        if ledger.stream_version(stream) == 0:
            raise NotFound(f"no sweep {sweep_id!r} in the ledger")
        names.append(stream)
        # a trial never started has no stream yet: nothing of it to carry
        names += [t["run_id"] for t in sweep_trials(ledger.read(stream)) if ledger.stream_version(t["run_id"]) > 0]
    return list(dict.fromkeys(names))


def _referenced_blobs(store: StreamStore, streams: dict[str, list[dict[str, Any]]]) -> dict[str, tuple[str, bytes]]:
    """Every stored blob whose digest appears anywhere in the events (``*_digest`` fields, the
    prompt-set map of RunStarted, ...). A digest of a blob field (EventType.blobs) with no blob
    is refused: the bundle would carry a run whose record is incomplete; any other digest
    with no blob is an identity of content held elsewhere (RunStarted.spec_digest)."""
    required: dict[str, str] = {}
    wanted: set[str] = set()
    for name, rows in streams.items():
        for r in rows:
            data = json.loads(r["data"])
            wanted.update(_digests(data))
            for field_name, digest in blob_references(r["type"], data):
                required.setdefault(digest, f"run {name} version {r['version']} ({r['type']}.{field_name})")
    found = store.blobs(wanted)
    for digest, where in required.items():
        if digest not in found:
            raise BundleError(f"{where} names blob {digest}, which the ledger does not hold (deleted?); run "
                              "`firetitan-track verify`; no bundle was written")
        if sha256_hex(found[digest][1]) != digest:
            raise BundleError(f"blob {digest} ({where}) no longer hashes to its digest; run "
                              "`firetitan-track verify`; no bundle was written")
    return found


def _digests(node: object) -> Iterator[str]:
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
        if any(secret in name for secret in secrets):
            raise BundleError("a run id holds the value of a credential in this environment; it is not "
                              "carried in a bundle")
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
    return _frame(raw.getvalue())


def _frame(tar_bytes: bytes) -> bytes:
    """The gzip framing by hand (RFC 1952), so the header is the fixed one whatever Python writes."""
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


class _TooLarge(Exception):
    """Raised inside the stream when a limit is passed; turned into a BundleError naming it."""


class _Inflater:
    """The bundle file, its gzip body decompressed as tarfile reads it: never more than a
    bounded amount at a time, every compressed byte hashed (the header's digest), and each
    stretch tarfile reads between two members held to an allowance, so a header (a PAX
    record) cannot make tarfile pull a gigabyte into memory."""

    _IN, _OUT = 64 * 1024, 1024 * 1024

    def __init__(self, f: BinaryIO, limits: Limits, where: str) -> None:
        self._f = f
        self._where = where
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._pending = b""  # compressed input not yet consumed
        self._buf = bytearray()
        self.limits = limits
        self.hasher = hashlib.sha256()
        self.total = 0  # decompressed bytes so far
        self.crc = 0
        self.read_compressed = 0
        self.ended = False  # the deflate stream ended
        self.truncated = False
        self.allowance = 0  # bytes tarfile may still read before the next mark

    def allow(self, n: int) -> None:
        self.allowance = n + 2 * tarfile.RECORDSIZE  # tarfile reads ahead one record

    def read(self, n: int = -1) -> bytes:
        n = self._OUT if n < 0 else n
        self._fill(n)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self.allowance -= len(out)
        if self.allowance < 0:
            raise _TooLarge(f"a tar header (a PAX or long-name record) larger than {_size(_HEADER_BYTES)}")
        return out

    def _fill(self, want: int) -> None:
        while len(self._buf) < want and not self.ended:
            if not self._pending:
                chunk = self._f.read(self._IN)
                if not chunk:
                    self.truncated = True
                    return
                self.read_compressed += len(chunk)
                self.hasher.update(chunk)
                self._pending = chunk
            try:
                out = self._z.decompress(self._pending, self._OUT)
            except zlib.error as e:
                raise BundleError(f"{self._where} is damaged: its compressed data does not decode ({e})") from None
            self._pending = self._z.unconsumed_tail
            self.total += len(out)
            if self.total > self.limits.total:
                raise _TooLarge(f"it expands to more than {_size(self.limits.total)} (FIRETITAN_BUNDLE_MAX_BYTES)")
            if self.total > _RATIO_FLOOR and self.total > self.limits.ratio * self.read_compressed:
                raise _TooLarge(f"it expands more than {self.limits.ratio} times its compressed size ({_size(self.total)} "
                                f"from {_size(self.read_compressed)}): a compression bomb, not a bundle "
                                "(FIRETITAN_BUNDLE_MAX_RATIO)")
            self.crc = zlib.crc32(out, self.crc)
            self._buf += out
            if self._z.eof:
                self.ended = True
                self._pending = self._z.unused_data

    def drain(self) -> None:
        """Decompress what tarfile left (the tar's zero padding), within the limits."""
        self.allowance = self.limits.total
        while not self.ended and not self.truncated:
            self._fill(self._OUT)
            self._buf.clear()

    def trailer(self) -> tuple[bytes, bool]:
        """The 8 bytes after the deflate stream, and whether anything follows them."""
        rest = self._pending
        if len(rest) < 9:
            more = self._f.read(9 - len(rest))
            self.hasher.update(more)
            self.read_compressed += len(more)
            rest += more
        return rest[:8], len(rest) > 8


@dataclass(frozen=True)
class Limits:
    """How far a bundle may expand: in all, one member, what is parsed in memory (the manifest
    and the event streams together), and against its compressed size (past the first 64 MiB:
    JSON compresses some tens of times; deflate's most, about 1000 times, is what a bomb of
    zeros reaches). Beyond them a bundle is refused, naming the limit, before the rest is
    read. Environment variables raise them for a larger bundle."""

    total: int
    member: int
    events: int
    ratio: int = 500

    @classmethod
    def from_env(cls) -> Limits:
        def read(name: str, default: int) -> int:
            text = os.environ.get(name)
            if not text:
                return default
            try:
                value = int(text)
            except ValueError:
                value = 0
            if value <= 0:
                raise BundleError(f"{name}={text!r}: expected a positive whole number")
            return value

        return cls(read("FIRETITAN_BUNDLE_MAX_BYTES", 8 << 30), read("FIRETITAN_BUNDLE_MAX_MEMBER_BYTES", 1 << 30),
                   read("FIRETITAN_BUNDLE_MAX_EVENT_BYTES", 256 << 20), read("FIRETITAN_BUNDLE_MAX_RATIO", 500))


_HEADER_BYTES = 1 << 20  # a tar header, PAX records included: ours are a few hundred bytes
_RATIO_FLOOR = 64 << 20  # below this, any ratio: a small bundle of repetitive JSON is no threat
_CHUNK = 1 << 20


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.3g} {unit}"
    return f"{n} bytes"


def read_bundle(path: str | os.PathLike[str], limits: Limits | None = None) -> Bundle:
    """Read and verify a bundle with no ledger, streaming it: memory holds the manifest and the
    event streams, never a blob's content nor the whole archive.

    A file that is not a bundle, is truncated or damaged beyond reading, passes a limit
    (``Limits``), or comes from a newer bundle format raises BundleError; anything else wrong
    is listed in ``problems`` (the first bad version of a stream: a chain break or a payload
    its event type refuses; a blob or member that does not hash to its digest; a member
    missing, not in the manifest or not canonically named; a signed head the stream does not
    reach).
    """
    where = str(path)
    limits = limits or Limits.from_env()
    try:
        f = open(path, "rb")
    except OSError as e:
        raise BundleError(f"cannot read {where}: {e.strerror or e}") from None
    with f:
        header = f.read(_HEADER_LEN)
        if header[:2] != _GZIP_FIXED[:2]:
            raise BundleError(f"{where} is not a firetitan-track bundle (not gzip data)")
        problems, digest = _check_header(header)
        if digest is None:  # another gzip header: skip it to reach the deflate data
            f.seek(0)
            _skip_gzip_header(where, f)
        inflater = _Inflater(f, limits, where)
        try:
            bundle = _read_members(where, inflater, limits)
            inflater.drain()
        except _TooLarge as e:
            raise BundleError(f"{where} is refused: {e}; nothing was read past the limit") from None
        if inflater.truncated or not inflater.ended:
            raise BundleError(f"{where} is truncated: its compressed data ends early (after "
                              f"{inflater.read_compressed + len(header)} bytes); copy it again")
        trailer, extra = inflater.trailer()
    if len(trailer) < 8:
        raise BundleError(f"{where} is truncated: its gzip trailer is missing; copy it again")
    crc, size = struct.unpack("<II", trailer)
    if crc != inflater.crc or size != inflater.total & 0xFFFFFFFF:
        problems.append(BundleProblem("gzip trailer", "its CRC or length does not match the data: damaged"))
    if extra:
        problems.append(BundleProblem("end of file", "bytes follow the end of the compressed data"))
    elif digest is not None and inflater.hasher.hexdigest() != digest:
        problems.append(BundleProblem(f"compressed data (bytes {_HEADER_LEN}-{len(header) + inflater.read_compressed - 1})",
                                      "altered: its sha256 differs from the one in the gzip header"))
    bundle.problems[:0] = problems
    return bundle


def _check_header(header: bytes) -> tuple[list[BundleProblem], str | None]:
    """The header's problems and the digest it carries (None when it is not ours)."""
    digest = header[len(_GZIP_FIXED) + len(_COMMENT):-1]
    if (header[:len(_GZIP_FIXED)] != _GZIP_FIXED or header[len(_GZIP_FIXED):-65] != _COMMENT
            or header[-1:] != b"\0" or not is_digest(digest.decode("latin-1"))):
        return [BundleProblem(f"gzip header (bytes 0-{_HEADER_LEN - 1})",
                              "altered: it is not the header firetitan-track writes")], None
    return [], digest.decode()


def _skip_gzip_header(where: str, f: BinaryIO) -> None:
    """Past an RFC 1952 header of any shape (to read a foreign or damaged file far enough to say what it is)."""
    fixed = f.read(10)
    if len(fixed) < 10 or fixed[2] != 8:
        raise BundleError(f"{where} is not a firetitan-track bundle (not deflate-compressed gzip data)")
    flags = fixed[3]
    if flags & 4:  # FEXTRA
        (n,) = struct.unpack("<H", f.read(2) or b"\0\0")
        f.read(n)
    for flag in (8, 16):  # FNAME, FCOMMENT: NUL-terminated, at most 64 KiB read
        if flags & flag:
            for _ in range(65536):
                byte = f.read(1)
                if not byte or byte == b"\0":
                    break
    if flags & 2:  # FHCRC
        f.read(2)


_EVENTS_FILE = re.compile(r"events/[0-9]{4,9}\.jsonl")


def _canonical_member(name: str) -> bool:
    """The member names a bundle may hold: nothing that a tar extraction could place outside
    its folder (``../x``, ``/tmp/x``) and nothing this code would not write."""
    return name == MANIFEST or _EVENTS_FILE.fullmatch(name) is not None or (
        name.startswith("blobs/") and is_digest(name[len("blobs/"):]))


def _read_members(where: str, inflater: _Inflater, limits: Limits) -> Bundle:
    inflater.allow(_HEADER_BYTES)
    try:
        tar = tarfile.open(fileobj=inflater, mode="r|")
    except tarfile.TarError as e:
        raise BundleError(f"{where} is not a firetitan-track bundle (not a tar archive: {e})") from None
    bundle: Bundle | None = None
    expected: dict[str, dict[str, Any]] = {}  # member name -> its manifest entry
    seen: set[str] = set()
    event_budget = limits.events
    try:
        for info in tar:
            name = info.name
            if name in seen:
                raise BundleError(f"{where}: member {name!r} appears twice")
            seen.add(name)
            if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                raise BundleError(f"{where}: member {name!r} is not a plain file")
            if info.size > limits.member:
                raise _TooLarge(f"member {name!r} holds {_size(info.size)}, more than one member may "
                                f"({_size(limits.member)}, FIRETITAN_BUNDLE_MAX_MEMBER_BYTES)")
            inflater.allow(info.size)
            body = tar.extractfile(info)
            assert body is not None  # a regular file
            if bundle is None:
                if name != MANIFEST:
                    raise BundleError(f"{where} is not a firetitan-track bundle (it has no {MANIFEST} first; "
                                      f"its first member is {name!r})")
                event_budget -= info.size
                if event_budget < 0:
                    raise _TooLarge(f"{MANIFEST} holds {_size(info.size)}, more than the manifest and event "
                                    f"streams may together ({_size(limits.events)}, FIRETITAN_BUNDLE_MAX_EVENT_BYTES)")
                manifest = _manifest(where, _read_all(where, body, info.size))
                bundle = Bundle(where, manifest, {}, {}, [])
                expected = _expected_members(bundle)
            elif name not in expected:
                _drain(where, body, info.size)
                why = "not listed in the manifest" if _canonical_member(name) else \
                    "not a name this format uses (and not listed in the manifest)"
                bundle.problems.append(BundleProblem(_shown_name(name), why))
            elif name.startswith("events/"):
                event_budget -= info.size
                if event_budget < 0:
                    raise _TooLarge(f"member {name!r} takes the event streams past {_size(limits.events)} "
                                    "(FIRETITAN_BUNDLE_MAX_EVENT_BYTES)")
                data = _read_all(where, body, info.size)
                entry = expected[name]
                if _matches(bundle, entry, hashlib.sha256(data).hexdigest()):
                    rows = _stream_rows(bundle, entry, data)
                    if rows is not None:
                        bundle.streams[entry["run_id"]] = rows
            else:
                entry = expected[name]
                digest = _hash_member(where, body, info.size)
                if _matches(bundle, entry, digest):
                    if digest != entry["digest"]:
                        bundle.problems.append(BundleProblem(f"blob {entry['digest']}",
                                                             "its content does not hash to its digest"))
                    else:
                        bundle.blobs[entry["digest"]] = BlobEntry(
                            str(entry.get("media_type") or "application/octet-stream"), info.size)
            inflater.allow(_HEADER_BYTES)
    except tarfile.TarError as e:
        if inflater.truncated:
            raise BundleError(f"{where} is truncated: its compressed data ends early (after "
                              f"{inflater.read_compressed + _HEADER_LEN} bytes); copy it again") from None
        raise BundleError(f"{where} is not a firetitan-track bundle (not a tar archive: {e})") from None
    if bundle is None:
        raise BundleError(f"{where} is not a firetitan-track bundle (it has no {MANIFEST})")
    for name in sorted(set(expected) - seen):
        bundle.problems.append(BundleProblem(name, "listed in the manifest but missing"))
    _check_signed_heads(bundle)
    return bundle


def _shown_name(name: str) -> str:
    return name if _canonical_member(name) else repr(name)


def _chunks(where: str, body: IO[bytes], size: int) -> Iterator[bytes]:
    while size > 0:
        chunk = body.read(min(_CHUNK, size))
        if not chunk:
            raise BundleError(f"{where} is truncated: a member ends early; copy it again")
        size -= len(chunk)
        yield chunk


def _read_all(where: str, body: IO[bytes], size: int) -> bytes:
    return b"".join(_chunks(where, body, size))


def _drain(where: str, body: IO[bytes], size: int) -> None:
    for _ in _chunks(where, body, size):
        pass


def _hash_member(where: str, body: IO[bytes], size: int) -> str:
    h = hashlib.sha256()
    for chunk in _chunks(where, body, size):
        h.update(chunk)
    return h.hexdigest()


def _matches(bundle: Bundle, entry: dict[str, Any], digest: str) -> bool:
    if digest != entry["sha256"]:
        bundle.problems.append(BundleProblem(entry["file"], "altered: its sha256 differs from the manifest's"))
        return False
    return True


def _expected_members(bundle: Bundle) -> dict[str, dict[str, Any]]:
    """The manifest's entries by member name; an entry whose name, run id or digest breaks the
    format's rules is a problem, not a member to read."""
    expected: dict[str, dict[str, Any]] = {}
    for entry in bundle.manifest["streams"]:
        file, run_id = entry["file"], entry["run_id"]
        if _EVENTS_FILE.fullmatch(file) is None:
            bundle.problems.append(BundleProblem(f"stream {run_id!r}", f"its file {file!r} is not a canonical "
                                                                      "member name (events/NNNN.jsonl)"))
        elif not is_stream_id(run_id):
            bundle.problems.append(BundleProblem(file, f"names run {run_id!r}: a run id is {RUN_ID_RULE}"))
        elif file in expected or run_id in {e["run_id"] for e in expected.values() if "digest" not in e}:
            bundle.problems.append(BundleProblem(file, f"listed twice (run {run_id})"))
        else:
            expected[file] = entry
    for entry in bundle.manifest["blobs"]:
        digest, file = entry["digest"], entry["file"]
        if not is_digest(digest) or file != f"blobs/{digest}":
            bundle.problems.append(BundleProblem(f"blob {digest[:64]!r}", f"its file {file!r} is not a canonical "
                                                                          "member name (blobs/<sha256>)"))
        elif file in expected:
            bundle.problems.append(BundleProblem(file, "listed twice"))
        else:
            expected[file] = entry
    return expected


def _manifest(where: str, body: bytes) -> dict[str, Any]:
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
        for key in ("streams", "blobs"):
            if not isinstance(manifest.get(key), list):
                raise ValueError(f"{key} is missing or not a list")
        for entry in manifest["streams"]:
            _require(entry, {"run_id": str, "file": str, "events": int, "head_hash": str, "sha256": str})
        for entry in manifest["blobs"]:
            _require(entry, {"digest": str, "file": str, "sha256": str})
        if not isinstance(manifest.get("signed_heads", []), list):
            raise ValueError("signed_heads is not a list")
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{where}: {MANIFEST} is malformed ({e})") from None
    return manifest


def _require(entry: object, fields: dict[str, type]) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"an entry is {type(entry).__name__}, not an object")
    for name, kind in fields.items():
        if type(entry.get(name)) is not kind:
            raise ValueError(f"entry {str(entry.get('file') or entry)[:80]}: {name} is missing or not a {kind.__name__}")


def _stream_rows(bundle: Bundle, entry: dict[str, Any], body: bytes) -> list[dict[str, Any]] | None:
    """The stream's rows, checked by the ledger's own check (chain and payloads); None when unreadable."""
    name, file = entry["run_id"], entry["file"]
    rows = []
    for n, line in enumerate(body.split(b"\n")[:-1] if body.endswith(b"\n") else body.split(b"\n"), start=1):
        try:
            ev = json.loads(line)
            row = {k: ev[k] for k in _EVENT_KEYS}
            row["data"] = canonical_json(row["data"])  # the stored text, byte for byte
            RowView(row)  # the column types a ledger stores
        except (ValueError, KeyError, TypeError, LedgerError) as e:
            bundle.problems.append(BundleProblem(f"{file} line {n}", f"not an event ({e})"))
            return None
        if row["run_id"] != name:
            bundle.problems.append(BundleProblem(f"{file} line {n}", f"names run {row['run_id']!r}, not {name!r}"))
            return None
        rows.append(row)
    problem = check_stream(name, [RowView(r) for r in rows])
    if problem is not None:
        bundle.problems.append(_chain_problem(problem))
    elif len(rows) != entry["events"] or (rows and rows[-1]["hash"] != entry["head_hash"]):
        bundle.problems.append(BundleProblem(
            f"run {name}", f"the manifest lists {entry['events']} events ending in {entry['head_hash'][:12]}, "
                           f"the stream holds {len(rows)}"))
    return rows


def _check_signed_heads(bundle: Bundle) -> None:
    """Each signed head verifies and its stream reaches it with the same hash."""
    by_stream: dict[str, list[SignedHead]] = {}
    for n, raw in enumerate(bundle.manifest.get("signed_heads", [])):
        try:
            head = SignedHead.from_dict(raw)
        except ValueError as e:
            bundle.problems.append(BundleProblem(f"{MANIFEST} signed head {n}", str(e)))
            continue
        if head.run_id not in bundle.streams:
            if head.run_id not in {e["run_id"] for e in bundle.manifest["streams"]}:
                bundle.problems.append(BundleProblem(f"{MANIFEST} signed head {n}",
                                                     f"signs run {head.run_id!r}, which the bundle does not hold"))
            continue  # an unreadable stream is reported already
        by_stream.setdefault(head.run_id, []).append(head)
        bundle.heads.append(head)
    for name, rows in bundle.streams.items():
        check = check_heads(name, [r["hash"] for r in rows], by_stream.get(name, []))
        bundle.head_checks[name] = check
        bundle.problems += [BundleProblem(f"run {name} version {v}", why) for v, why in check.problems]


def _chain_problem(p: Problem) -> BundleProblem:
    return BundleProblem(f"run {p.run_id} version {p.version}", p.reason)


def bundle_blobs(bundle: Bundle, limits: Limits | None = None) -> Iterator[tuple[str, str, bytes]]:
    """The blobs of a bundle already read (``read_bundle``), one at a time: (digest, media type,
    bytes), each checked against its digest; the file read again, streaming. A blob the first
    reading found and this one does not (the file changed meanwhile) is an error."""
    limits = limits or Limits.from_env()
    wanted = dict(bundle.blobs)
    with open(bundle.path, "rb") as f:
        f.seek(_HEADER_LEN)
        inflater = _Inflater(f, limits, bundle.path)
        inflater.allow(_HEADER_BYTES)
        try:
            with tarfile.open(fileobj=inflater, mode="r|") as tar:
                for info in tar:
                    entry = wanted.get(info.name[len("blobs/"):]) if info.name.startswith("blobs/") else None
                    if info.size > limits.member or info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                        raise BundleError(f"{bundle.path} changed while it was imported; nothing was imported")
                    inflater.allow(info.size)
                    body = tar.extractfile(info)
                    assert body is not None
                    if entry is None:
                        _drain(bundle.path, body, info.size)
                    else:
                        data = _read_all(bundle.path, body, info.size)
                        digest = info.name[len("blobs/"):]
                        yield digest, entry.media_type, data
                        del wanted[digest]
                    inflater.allow(_HEADER_BYTES)
        except (_TooLarge, tarfile.TarError) as e:
            raise BundleError(f"{bundle.path} changed while it was imported ({e}); nothing was imported") from None
    if wanted:
        raise BundleError(f"{bundle.path} changed while it was imported (blob {next(iter(wanted))} is gone); "
                          "nothing was imported")


# -- importing ---------------------------------------------------------------------------


def importable_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read the bundle and refuse it (BundleError) unless it verifies (chains, payloads against
    their event types, run ids, member names, signed heads), this version can read every
    event in it, and nothing in it holds a credential; touches no ledger."""
    bundle = read_bundle(path)
    if bundle.problems:
        raise BundleError(f"{bundle.path} does not verify ({bundle.problems[0]}); nothing was imported")
    _refuse_newer_events(bundle)
    _refuse_secrets(bundle.streams, {})
    return bundle


def import_bundle(ledger: Ledger, bundle: Bundle | str | os.PathLike[str]) -> ImportReport:
    """Add a bundle's streams, blobs and signed heads to ``ledger`` in one transaction, after
    checking it (``importable_bundle``); the blobs are read again from the file one at a time,
    each checked against its digest and for credentials as it is written.

    Importing again writes nothing; a run the ledger holds with a different history is
    refused. On any error nothing is written.
    """
    if not isinstance(bundle, Bundle):
        bundle = importable_bundle(bundle)
    written = import_streams(ledger, bundle.streams, _without_secrets(bundle_blobs(bundle)), bundle.heads)
    return ImportReport(written, len(bundle.blobs))


def _without_secrets(blobs: Iterator[tuple[str, str, bytes]]) -> Iterator[tuple[str, str, bytes]]:
    for digest, media_type, data in blobs:
        if redact_bytes(data) != data:
            raise BundleError(f"blob {digest} holds the value of a credential in this environment; it is not "
                              "imported, and nothing was")
        yield digest, media_type, data


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


def import_streams(ledger: Ledger, streams: dict[str, list[dict[str, Any]]],
                   blobs: Iterable[tuple[str, str, bytes]] = (),
                   heads: Iterable[SignedHead] = ()) -> dict[str, int]:
    """Write streams recorded elsewhere as they are, with the blobs they reference and the
    signed heads that vouch for them, in one transaction: event ids, versions, payload text,
    times and hashes unchanged (so ``verify`` passes here), positions (and writing transaction)
    this ledger's own.

    ``streams`` maps a run id to its rows (``StreamStore.rows`` of the source), an intact chain
    from version 0 whose every payload its event type accepts, checked here as an append would
    check them (run ids, columns, chain, payloads); ``blobs`` are (digest, media type, bytes),
    each checked as it is written (they may be read lazily, one at a time); ``heads`` are kept
    when they verify and their stream reaches them. A stream this ledger holds must share its
    history (its stored versions hash alike), and only the versions it lacks are written;
    otherwise LedgerError, and nothing at all is written. Returns the number of events
    written per stream.
    """
    secrets = secret_values()
    incoming: dict[str, list[RowView]] = {}
    for run_id, rows in streams.items():
        problem = run_id_problem(run_id, secrets)
        if problem is not None:
            raise LedgerError(problem)
        ns = [RowView(r) for r in rows]
        if any(r.run_id != run_id for r in ns):
            raise LedgerError(f"run {run_id!r}: an imported row names another run")
        problem = check_stream(run_id, ns)
        if problem is not None:
            raise LedgerError(f"cannot import {problem}")
        incoming[run_id] = ns
    vouched = [h for h in heads if h.run_id in incoming
               and not check_heads(h.run_id, [r.hash for r in incoming[h.run_id]], [h]).problems]
    written: dict[str, int] = {}
    store = StreamStore(ledger)
    with store.importing() as tx:
        new_rows: list[RowView] = []
        for run_id, rows in incoming.items():
            held = tx.held(run_id)
            problem = check_chain(run_id, held)
            if problem is not None:
                raise LedgerError(f"run {run_id!r} here is damaged ({problem}); nothing was imported")
            for mine, theirs in zip(held, rows):
                if mine.hash != theirs.hash:
                    raise LedgerError(f"run {run_id!r} already exists in {store.url} with a different history "
                                      f"(version {mine.version} differs); nothing was imported")
            new_rows += rows[len(held):]
            written[run_id] = max(0, len(rows) - len(held))
        for digest, media_type, data in blobs:  # one at a time: a bundle's blobs need not fit in memory
            if sha256_hex(data) != digest:
                raise LedgerError(f"cannot import blob {digest}: its content does not hash to it; "
                                  "nothing was imported")
            tx.add_blob(digest, media_type, data)
        tx.add_heads(vouched)
        tx.add_events(new_rows)
    return written


# -- the ledger's store, as bundles see it ----------------------------------------------------

# An event row as a ledger stores it and a bundle carries it: every column but ``position`` and
# ``xid``, which each ledger gives its rows itself (its follow order, store.py).
ROW_KEYS = tuple(c.name for c in event_table.c if c.name not in ("position", "xid"))


class RowView:
    """A row given as a dict (``StreamStore.rows``, a bundle's), read by attribute like a database
    row, as ``check_stream`` reads rows; LedgerError when a column is missing or of another type
    than the ledger stores."""

    __slots__ = ROW_KEYS
    _TYPES = {"version": int, "schema_version": int, "recorded_at": float}  # else str

    def __init__(self, row: dict[str, Any]) -> None:
        for k in ROW_KEYS:
            value = row.get(k)
            if type(value) is not self._TYPES.get(k, str):
                shown = repr(value)
                raise LedgerError(f"an imported event's {k} is {shown if len(shown) <= 60 else shown[:57] + '...'}, "
                                  f"not a {self._TYPES.get(k, str).__name__}")
            setattr(self, k, value)

    def stored(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ROW_KEYS}


class StreamStore:
    """All a bundle touches of a ledger's database: a stream's rows and signed heads as stored,
    the blobs they name, and one transaction that adds rows chained elsewhere, with their blobs
    and heads. Rows go in as they are, past ``Ledger.append`` (they are already chained and
    hashed), but with this ledger's positions and writing transaction (store.py), so followers
    never skip one: the transaction reads the streams it adds to before it writes anything."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._store: Store = ledger.store
        self.url = ledger.url

    def rows(self, run_id: str) -> list[dict[str, Any]]:
        """The run's events exactly as stored (``data`` is the hashed payload text), in version
        order; NotFound when there is no such run."""
        with self._store.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(_stream_select(run_id)).mappings()]
        if not rows:
            raise unknown_run(run_id)
        return rows

    def heads(self, run_id: str) -> list[SignedHead]:
        """The stream's signed heads, oldest first."""
        return self._ledger.signed_heads(run_id)

    def blobs(self, digests: Iterable[str]) -> dict[str, tuple[str, bytes]]:
        """{digest: (media type, bytes)} of those of ``digests`` the ledger holds (unchecked)."""
        found: dict[str, tuple[str, bytes]] = {}
        ordered = sorted(digests)
        with self._store.engine.connect() as conn:
            for i in range(0, len(ordered), 500):
                stmt = sa.select(blob_table.c.digest, blob_table.c.media_type, blob_table.c.data).where(
                    blob_table.c.digest.in_(ordered[i:i + 500]))
                for digest, media_type, data in conn.execute(stmt):
                    found[digest] = (media_type, bytes(data))
        return found

    @contextlib.contextmanager
    def importing(self) -> Iterator[_Import]:
        """One import's transaction: all it adds commits together, or nothing does. A concurrent
        write to a stream it adds to (the unique version index) is a LedgerError."""
        duplicate = (IntegrityError, self._store.engine.dialect.loaded_dbapi.IntegrityError)
        try:
            with self._store.append_transaction() as conn:
                yield _Import(self._store, conn)
        except duplicate:
            raise LedgerError("the import conflicted with a concurrent write; nothing was imported, "
                              "retry") from None


class _Import:
    """What an import transaction may do (``StreamStore.importing``)."""

    def __init__(self, store: Store, conn: Connection) -> None:
        self._store, self._conn = store, conn

    def held(self, run_id: str) -> list[Any]:
        """The stream's rows this ledger holds now, in version order."""
        return self._conn.execute(_stream_select(run_id)).all()

    def add_blob(self, digest: str, media_type: str, data: bytes) -> None:
        self._conn.execute(self._store.insert_ignoring_duplicates(blob_table),
                           {"digest": digest, "media_type": media_type, "size": len(data), "data": data})

    def add_heads(self, heads: Sequence[SignedHead]) -> None:
        if heads:
            self._conn.execute(self._store.insert_ignoring_duplicates(head_table), [h.to_dict() for h in heads])

    def add_events(self, rows: Sequence[RowView]) -> None:
        """Insert the rows (the last thing the import does) and notify followers at its commit."""
        if rows:
            self._conn.execute(event_table.insert(), [r.stored() for r in rows])
            self._store.notify_followers(self._conn)


def _stream_select(run_id: str) -> sa.Select:
    return (sa.select(*(event_table.c[k] for k in ROW_KEYS)).where(event_table.c.run_id == run_id)
            .order_by(event_table.c.version))
