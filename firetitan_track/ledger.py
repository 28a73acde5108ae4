"""The ledger: one append-only, hash-chained stream of events per run.

- ``append`` names the version it expects; a mismatch is a ConcurrencyError, so of
  two writers on one run exactly one wins. Re-appending events already stored at
  those versions (same event ids) is acknowledged and writes nothing.
- Every event gets a global ``position``; ``follow`` reads every stream's events once each,
  never skipping one that committed late, from a ``FollowCursor`` (store.py says how).
- ``hash = sha256(prev_hash + canonical JSON of the event)``; ``verify`` recomputes
  the chain, checks every blob an event names is there and still hashes to its
  digest, and checks the stream still reaches each head the ledger signed
  (signing.py: what a signature proves, and what it cannot).
- Payloads are checked against their event type and redacted before they are hashed
  and stored; old schema versions are upcast on read, never rewritten.
- Nothing read is trusted: ``read`` checks the chain of what it returns, each payload
  against its type and the newest signed head; ``get_blob`` checks the content still
  hashes to its digest. A damaged read raises CorruptLedger naming the run and version.

Carrying runs between ledgers (export and import, rows as stored) is bundle.py's, which
works on the store underneath (``Ledger.store``) through a narrow interface of its own.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, Row, RowMapping
from sqlalchemy.exc import DBAPIError, IntegrityError

from firetitan_track import blobs as blob_store
from firetitan_track.blobs import is_digest, redacted_json, sha256_hex
from firetitan_track.errors import first_line
from firetitan_track.events import (CATALOGUE, SIGNED_AFTER, InvalidEvent, NewEvent, RecordedEvent, blob_references,
                                    digest_references, payload_problem, upcast, validate)
from firetitan_track.ids import run_id_problem
from firetitan_track.redact import secret_values
from firetitan_track.signing import (HeadCheck, SignedHead, SigningKey, check_heads, should_sign, signing_key_for,
                                     trust_problems)
from firetitan_track.store import (FOLLOW_HORIZON, NEXT_TRANSACTION, CommitWatch, LedgerError, Store, checkpoints,
                                   commit_watch, open_store)
from firetitan_track.store import blobs as blob_table
from firetitan_track.store import events as event_table
from firetitan_track.store import signed_heads as head_table

__all__ = ["Ledger", "LedgerError", "ConcurrencyError", "NotFound", "FollowCursor", "Followed",
           "CorruptLedger", "StoreFailure", "VIEW_ERRORS", "unreadable", "RunInfo", "Problem",
           "GENESIS_HASH", "event_hash", "check_chain", "check_stream", "VerifyReport"]

GENESIS_HASH = ""  # the prev_hash of version 0
_HEX_PREFIX = re.compile(r"[0-9a-f]{6,63}")  # a digest prefix worth looking up
_json_str = json.encoder.encode_basestring  # == json.dumps(s, ensure_ascii=False), in C


class ConcurrencyError(LedgerError):
    """The stream is not at the version the writer expected: someone else appended."""

    def __init__(self, run_id: str, expected: int, actual: int) -> None:
        super().__init__(f"run {run_id!r}: expected to append at version {expected}, but the stream "
                         f"is at version {actual}; read the stream again and retry")
        self.run_id, self.expected, self.actual = run_id, expected, actual


class NotFound(LedgerError, LookupError):
    """A run, snapshot, sweep or blob the ledger does not hold; the message names it."""


class CorruptLedger(LedgerError):
    """A stored event that cannot be decoded: the database was edited or damaged."""


class StoreFailure(LedgerError):
    """The database refused a read or write (disk full, I/O error, read-only, gone).

    ``cleanup``: what a caller cleaned up although the record of it was refused (the
    trainer and deployment outcomes), for the message that says so."""

    cleanup: dict[str, str] | None = None


# What a view's code raises when a stored event is not what its type promises (an event
# stored before the catalogue checked it, or a nested value the catalogue does not type).
VIEW_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)


def unreadable(ev: RecordedEvent | None, exc: BaseException) -> CorruptLedger:
    """A view's failure on a stored event, as an error naming the event (never a traceback)."""
    what = f"run {ev.run_id} version {ev.version} ({ev.type})" if ev is not None else "an event"
    return CorruptLedger(f"{what} cannot be read: {type(exc).__name__}: {exc}; run `firetitan-track verify`")


def unknown_run(run_id: str) -> NotFound:
    return NotFound(f"no run {run_id!r} in the ledger")


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    events: int
    first_at: float
    last_at: float
    last_type: str


@dataclass(frozen=True)
class Problem:
    """Something ``verify`` found wrong: the run, the first bad version, and why."""

    run_id: str
    version: int
    reason: str

    def __str__(self) -> str:
        return f"run {self.run_id} version {self.version}: {self.reason}"


def event_hash(prev_hash: str, run_id: str, version: int, event_id: str, type: str,
               schema_version: int, data_json: str, recorded_at: float) -> str:
    """sha256(prev_hash + canonical JSON of the event), with ``data`` as stored.

    The JSON is assembled by hand in sorted-key order so the stored payload text is
    hashed exactly (no decode/re-encode), equal to canonical_json of the event dict.
    """
    body = (f'{{"data":{data_json},"event_id":{_json_str(event_id)},'
            f'"recorded_at":{recorded_at!r},"run_id":{_json_str(run_id)},'
            f'"schema_version":{schema_version},"type":{_json_str(type)},"version":{version}}}')
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


@dataclass(frozen=True, order=True)
class FollowCursor:
    """How far a follower has read: past the event at ``position`` written by transaction
    ``xid``. Followers read in (xid, position) order; ``xid`` is 0 on SQLite (its commit order
    is position order) and for rows written before PostgreSQL ledgers recorded it (revision
    0004), so a position kept by an older follower is ``FollowCursor(0, position)``. A cursor
    belongs to the ledger it was read from."""

    xid: int = 0
    position: int = 0


class Followed(list[RecordedEvent]):
    """What ``follow`` returns: the events, in follow order, and ``cursor``, where to go on from
    (the last event's; the cursor asked for when there is none)."""

    def __init__(self, events: Iterable[RecordedEvent], cursor: FollowCursor) -> None:
        super().__init__(events)
        self.cursor = cursor


def _as_cursor(after: FollowCursor | int) -> FollowCursor:
    if isinstance(after, FollowCursor):
        return after
    if type(after) is not int or after < 0:
        raise LedgerError(f"a follow cursor is a FollowCursor or a position >= 0, not {after!r}")
    return FollowCursor(0, after)


@dataclass(frozen=True)
class _Pending:
    event_id: str
    type: str
    schema_version: int
    data_json: str


_COLUMNS = tuple(event_table.c[name] for name in (
    "run_id", "version", "position", "event_id", "type", "schema_version", "data", "recorded_at", "hash"))
_LAST_VERSION = (sa.select(sa.func.max(event_table.c.version))
                 .where(event_table.c.run_id == sa.bindparam("run_id")).scalar_subquery())
_HEAD = (sa.select(event_table.c.version, event_table.c.hash)
         .where(event_table.c.run_id == sa.bindparam("run_id"), event_table.c.version == _LAST_VERSION))
_POSITIONS = (sa.select(event_table.c.position)
              .where(event_table.c.run_id == sa.bindparam("run_id"),
                     event_table.c.version >= sa.bindparam("first"),
                     event_table.c.version < sa.bindparam("end"))
              .order_by(event_table.c.version))
_ROW_KEYS = ("run_id", "version", "event_id", "type", "schema_version", "data", "recorded_at", "hash")


@functools.lru_cache(maxsize=None)
def _follow_statement(sqlite: bool, filtered: bool) -> sa.Select:
    """``Ledger.follow``'s query, built once per kind: a follower runs it on every commit, and
    building and keying a statement cost more client time than running it. Parameters:
    ``xid`` and ``position`` (the cursor), ``limit``, and with ``filtered`` the ``run_ids``."""
    xid, position = event_table.c.xid, event_table.c.position
    if sqlite:
        stmt = sa.select(*_COLUMNS, xid).where(position > sa.bindparam("position")).order_by(position)
    else:
        stmt = (sa.select(*_COLUMNS, xid)
                .where(sa.tuple_(xid, position) > sa.tuple_(sa.bindparam("xid"), sa.bindparam("position")),
                       xid < FOLLOW_HORIZON)
                .order_by(xid, position))
    if filtered:
        stmt = stmt.where(event_table.c.run_id.in_(sa.bindparam("run_ids", expanding=True)))
    return stmt.limit(sa.bindparam("limit"))


@dataclass(frozen=True)
class _AppendSQL:
    """The append's statements, compiled once per dialect and run on the DBAPI cursor.

    Per statement, SQLAlchemy's execution machinery costs more than SQLite's own
    work; a single-event append would pay it three times.
    """

    head: str
    insert: str
    insert_returning: str
    positions: str
    signed_head: str  # a signed head, written in its events' transaction

    @classmethod
    def for_dialect(cls, dialect: sa.Dialect) -> _AppendSQL:
        def text(stmt: sa.ClauseElement) -> str:
            return str(stmt.compile(dialect=dialect))

        insert = event_table.insert().values({k: sa.bindparam(k) for k in _ROW_KEYS})
        signed_head = head_table.insert().values({c.name: sa.bindparam(c.name) for c in head_table.c})
        return cls(text(_HEAD), text(insert), text(insert.returning(event_table.c.position)),
                   text(_POSITIONS), text(signed_head))


class Ledger:
    """An open ledger database. Thread-safe: share one per process."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._sql = _AppendSQL.for_dialect(store.engine.dialect)
        self._duplicate_errors = (IntegrityError, store.engine.dialect.loaded_dbapi.IntegrityError)
        self._key: SigningKey | None | bool = False  # False: not looked for yet
        # run -> (version, hash) of the last event this ledger appended to it (PostgreSQL): the
        # head its next append goes after, without reading it (store.py's opening)
        self._written: dict[str, tuple[int, str]] = {}

    def signing_key(self, *, create: bool = True) -> SigningKey | None:
        """The key this ledger's appends sign heads with (signing.py says where it lives);
        None when there is none (PostgreSQL without FIRETITAN_SIGNING_KEY)."""
        if self._key is False:
            key = signing_key_for(self._store.sqlite_file, create=create)
            if key is None and not create:
                return None  # not remembered: a later writer may still make one
            self._key = key
        return self._key  # type: ignore[return-value]

    @classmethod
    def open(cls, url: str, *, create: bool = True) -> Ledger:
        """Open by URL (``sqlite:///PATH`` or ``postgresql+psycopg://...``).

        ``create=False`` refuses to create a missing SQLite file (read-only tools).
        """
        return cls(open_store(url, create=create))

    @property
    def engine(self) -> Engine:
        return self._store.engine

    @property
    def url(self) -> str:
        """The URL, password masked."""
        return self._store.url

    @property
    def store(self) -> Store:
        """The database underneath (store.py), for what works on rows as stored rather than on
        events: bundle.py's export and import."""
        return self._store

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------

    def append(self, run_id: str, events: Sequence[NewEvent], expected_version: int) -> list[RecordedEvent]:
        """Append ``events`` at ``expected_version`` (the count the caller believes stored)."""
        if type(expected_version) is not int or expected_version < 0:
            raise LedgerError(f"expected_version must be an int >= 0, not {expected_version!r}")
        secrets = secret_values()
        _check_run_id(run_id, secrets)
        pending = [_prepare(ev, secrets) for ev in events]
        if not pending:
            return []
        if len({p.event_id for p in pending}) != len(pending):
            raise InvalidEvent(f"run {run_id!r}: the batch repeats an event id")
        last_version = expected_version + len(pending) - 1
        key = (self.signing_key() if should_sign(last_version, pending[-1].type, expected_version, SIGNED_AFTER)
               else None)
        sql = self._sql
        # the head this ledger wrote last, when this append goes right after it (taken out: it
        # stands again only once this append has committed)
        written = self._written.pop(run_id, None)
        known = written[1] if written is not None and written[0] == expected_version - 1 else None
        try:
            with self._store.append_transaction(begun_by_head=True) as conn:
                if known is not None:  # PostgreSQL only: the insert's pipeline begins, and fences
                    prev_hash = known
                else:
                    head = self._store.read_head(conn, sql.head, run_id)  # (and the lease's fence)
                    actual, prev_hash = (head[0] + 1, head[1]) if head else (0, GENESIS_HASH)
                    if actual != expected_version:
                        stored = _already_stored(conn, run_id, expected_version, pending)
                        if stored is None:
                            raise ConcurrencyError(run_id, expected_version, actual)
                        return stored
                rows = _chain(run_id, expected_version, prev_hash, pending, time.time())
                # a head is signed only with its events: in the same transaction
                signed = key.sign(run_id, last_version, rows[-1]["hash"]).to_dict() if key is not None else None
                if not self._store.is_sqlite:
                    positions = self._store.insert_and_commit(
                        conn, sql.insert, rows, sql.positions,
                        {"run_id": run_id, "first": expected_version, "end": expected_version + len(rows)},
                        also=[(sql.signed_head, signed)] if signed else [],
                        begins_for=run_id if known is not None else None)
                else:
                    cursor = conn.connection.cursor()
                    if len(rows) == 1:
                        cursor.execute(sql.insert_returning, rows[0])
                        positions = [cursor.fetchone()[0]]
                    else:
                        # executemany cannot return rows; the positions are read back
                        # inside the same locked transaction
                        cursor.executemany(sql.insert, rows)
                        cursor.execute(sql.positions, {"run_id": run_id, "first": expected_version,
                                                       "end": expected_version + len(rows)})
                        positions = [r[0] for r in cursor.fetchall()]
                    cursor.close()
                    if signed is not None:  # (SQLite commits as the block ends)
                        conn.execute(head_table.insert(), signed)
        except self._duplicate_errors:
            # the head was read unlocked (store.py): a writer that committed meanwhile
            # shows up here, on the unique index
            return self._after_conflict(run_id, expected_version, pending)
        except DBAPIError as e:
            raise StoreFailure(f"cannot write to the ledger at {self.url}: {first_line(e)}; nothing of this "
                               "write was stored (check the disk has space and the file is writable)") from None
        if not self._store.is_sqlite:
            self._written[run_id] = (last_version, rows[-1]["hash"])
        return _recorded_from_rows(rows, positions)

    def _after_conflict(self, run_id: str, expected_version: int, pending: list[_Pending]) -> list[RecordedEvent]:
        with self.engine.connect() as conn:
            stored = _already_stored(conn, run_id, expected_version, pending)
            actual = _stream_version(conn, run_id)
        if stored is not None:
            return stored
        if actual != expected_version:
            raise ConcurrencyError(run_id, expected_version, actual)
        raise LedgerError(f"run {run_id!r}: {self._where_ids_are(run_id, pending)}")

    def fence(self, run_id: str, token: int | None) -> None:
        """Appends to ``run_id`` through this ledger must hold lease token ``token``
        (the writer's lease, taken in the run_leases table; checked inside each append's
        transaction); None stops checking."""
        self._store.fence(run_id, token)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """A read's database errors and damaged payloads as messages naming this ledger."""
        try:
            yield
        except CorruptLedger as e:
            raise CorruptLedger(f"the ledger at {self.url} is damaged: {e}; run `firetitan-track verify` "
                                "to find every damaged event") from None
        except DBAPIError as e:
            raise StoreFailure(f"cannot read the ledger at {self.url}: {first_line(e)}") from None

    def _where_ids_are(self, run_id: str, pending: list[_Pending]) -> str:
        ids = [p.event_id for p in pending]
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(event_table.c.event_id, event_table.c.version).where(
                event_table.c.run_id == run_id, event_table.c.event_id.in_(ids))).first()
        if found is None:
            return "the append conflicted with a concurrent write; retry"
        return (f"event id {found.event_id} is already stored at version {found.version}; "
                "an event is appended once")

    # -- reading ----------------------------------------------------------------

    def read(self, run_id: str, from_version: int = 0, *, check: bool = True) -> list[RecordedEvent]:
        """The run's events from ``from_version`` on, upcast to current schema versions.

        What is returned is checked first: the hash chain of the rows read, each payload
        against its event type, and the run's newest signed head (still reached, with the
        same hash). A failed check raises CorruptLedger naming the run and version.
        ``check=False`` only decodes: for ``replay``, which shows a damaged run with
        ``verify``'s findings beside it.
        """
        first = max(from_version, 0)
        stmt = (sa.select(*_COLUMNS)
                .where(event_table.c.run_id == run_id, event_table.c.version >= max(first - 1, 0))
                .order_by(event_table.c.version))
        with self._reading(), self.engine.connect() as conn:
            newest = _newest_heads(conn, run_id)  # before the events: a head is never ahead of what is read
            rows = conn.execute(stmt).all()
            if rows and first > 0 and rows[0].version == first - 1:
                before, rows = rows[0], rows[1:]
            else:
                before = None
            if not rows and (first == 0 or _stream_version(conn, run_id) == 0):
                if newest and check:
                    _check_read(run_id, first, before, rows, newest)
                raise unknown_run(run_id)
            if check:
                _check_read(run_id, first, before, rows, newest)
            return [_from_row(r, check) for r in rows]

    def read_or_empty(self, run_id: str) -> list[RecordedEvent]:
        """The run's whole stream, checked as :meth:`read` checks it, or [] when the ledger holds
        no such stream (yet): a trial its sweep has not started, a sweep not recorded yet."""
        try:
            return self.read(run_id)
        except NotFound:
            return []

    def stream_version(self, run_id: str) -> int:
        """How many events the run's stream holds (0 if none)."""
        with self._reading(), self.engine.connect() as conn:
            return _stream_version(conn, run_id)

    def follow(self, after: FollowCursor | int = 0, limit: int = 1000,
               run_ids: Sequence[str] | None = None) -> Followed:
        """Up to ``limit`` events after the cursor ``after``, in follow order; the result's
        ``cursor`` is where to go on from. Following on from each result's cursor gives every
        event exactly once, each stream's in version order, never skipping one that
        committed late: on SQLite follow order is position order (its appends commit in
        it), on PostgreSQL it is (writing transaction, position), read only below the
        snapshot's xmin (see store.py). An int is a position, ``FollowCursor(0, position)``:
        exact on SQLite and for a PostgreSQL ledger's rows older than revision 0004; rows
        written since all follow it (read again, never skipped).
        """
        cursor = _as_cursor(after)
        params: dict[str, Any] = {"xid": cursor.xid, "position": cursor.position, "limit": limit}
        if run_ids is not None:
            params["run_ids"] = list(run_ids)
        stmt = _follow_statement(self._store.is_sqlite, run_ids is not None)
        with self._reading(), self._store.one_statement() as conn:
            rows = conn.execute(stmt, params).all()
        if rows:
            cursor = FollowCursor(rows[-1].xid, rows[-1].position)
        return Followed([_from_row(r[:-1]) for r in rows], cursor)

    def settle(self, timeout_s: float = 30.0) -> bool:
        """Wait until ``follow`` can read every event committed before this call (a follower's
        last read before it stops, a one-shot export); False if ``timeout_s`` passed first.
        At once on SQLite. On PostgreSQL a follower reads below the oldest transaction still
        writing anywhere on the database server (store.py): this waits for those that had
        begun writing when it was called, so a transaction left open holds it back."""
        if self._store.is_sqlite:
            return True
        deadline = time.monotonic() + timeout_s
        with self._reading(), self.engine.connect() as conn:
            bound = conn.execute(sa.select(NEXT_TRANSACTION)).scalar()
            while conn.execute(sa.select(FOLLOW_HORIZON)).scalar() < bound:  # a new snapshot each time
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.002)
        return True

    def watch_commits(self) -> CommitWatch:
        """A watch that wakes a follower when an append may have committed (LISTEN/NOTIFY on
        PostgreSQL, the database files on SQLite): call ``follow`` when ``wait`` says so.
        The caller owns it and closes it; one thread waits on it."""
        return commit_watch(self._store)

    def runs(self) -> list[RunInfo]:
        """Every run in the ledger, oldest first."""
        summary = (sa.select(event_table.c.run_id, sa.func.count().label("n"),
                             sa.func.min(event_table.c.recorded_at).label("first_at"),
                             sa.func.max(event_table.c.recorded_at).label("last_at"),
                             sa.func.max(event_table.c.version).label("last_version"))
                   .group_by(event_table.c.run_id).subquery())
        stmt = (sa.select(summary.c.run_id, summary.c.n, summary.c.first_at, summary.c.last_at,
                          event_table.c.type)
                .join(event_table, sa.and_(event_table.c.run_id == summary.c.run_id,
                                      event_table.c.version == summary.c.last_version))
                .order_by(summary.c.first_at, summary.c.run_id))
        with self._reading(), self.engine.connect() as conn:
            return [RunInfo(r.run_id, r.n, r.first_at, r.last_at, r.type) for r in conn.execute(stmt)]

    # -- blobs and checkpoints --------------------------------------------------

    def put_blob(self, data: bytes, media_type: str = "application/octet-stream") -> str:
        return blob_store.put_blob(self._store, data, media_type)

    def put_json(self, obj: object) -> str:
        where = _non_finite(obj)  # a blob is part of the record too: only finite numbers
        if where is not None:
            raise InvalidEvent(f"a JSON blob: {where} is {_non_finite_value(obj, where)}, not a finite number; "
                               "the ledger stores only finite numbers")
        return blob_store.put_json(self._store, obj)

    def get_blob(self, digest: str) -> bytes:
        """The blob with ``digest``: the full sha256, or a prefix of it (``audit`` prints 12
        characters) that names exactly one blob."""
        with self._reading():
            full = self._full_digest(digest)
            data = blob_store.get_blob(self._store, full)
        if is_digest(full) and sha256_hex(data) != full:
            raise CorruptLedger(f"the ledger at {self.url} is damaged: blob {full} no longer hashes to its "
                                "digest (its content was altered); run `firetitan-track verify` to find every "
                                "damaged event and blob")
        return data

    def _full_digest(self, digest: str) -> str:
        if is_digest(digest) or not _HEX_PREFIX.fullmatch(digest):
            return digest
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(blob_table.c.digest).where(blob_table.c.digest.startswith(digest))
                                 .order_by(blob_table.c.digest).limit(2)).scalars().all()
        if not found:
            raise NotFound(f"no blob whose digest starts with {digest}")
        if len(found) > 1:
            raise LedgerError(f"digest prefix {digest} names more than one blob ({found[0][:16]}..., "
                              f"{found[1][:16]}...); give more characters")
        return found[0]

    def get_json(self, digest: str) -> Any:  # Json; Any as each caller knows the shape it stored (a spec, a prompt set)
        data = self.get_blob(digest)
        try:
            return json.loads(data)
        except ValueError:
            raise CorruptLedger(f"the ledger at {self.url} is damaged: blob {digest} is not valid JSON; "
                                "run `firetitan-track verify` to find every damaged event and blob") from None

    def get_checkpoint(self, name: str) -> FollowCursor:
        """A follower's stored cursor (the start when it has none). One stored by a follower
        before revision 0004 (a position alone) reads as ``FollowCursor(0, position)``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(checkpoints.c.xid, checkpoints.c.position)
                               .where(checkpoints.c.name == name)).first()
        return FollowCursor(row.xid, row.position) if row is not None else FollowCursor()

    def set_checkpoint(self, name: str, cursor: FollowCursor | int) -> None:
        cursor = _as_cursor(cursor)
        with self.engine.begin() as conn:
            conn.execute(self._store.upsert(checkpoints, "name", {"name": name, "position": cursor.position,
                                                                  "xid": cursor.xid}))

    def signed_heads(self, run_id: str) -> list[SignedHead]:
        """Every signed head of a stream, oldest first (what ``bundle`` carries)."""
        with self._reading(), self.engine.connect() as conn:
            return _heads(conn, run_id)

    # -- tamper evidence ----------------------------------------------------------

    def verify(self, run_id: str | None = None, trusted: set[str] | None = None) -> list[Problem]:
        """Check every stream (or one run's); an empty list means intact.

        Returns one Problem per broken stream (its first bad version: a version missing, a hash
        that does not chain, a payload its event type refuses, positions or writing transactions
        out of version order), one per signed head the stream no longer matches (events removed,
        history rewritten, a signature altered), one per missing or altered blob an event names, and a stream
        signed by heads but holding no events (a run removed). With ``trusted`` (public keys,
        signing.load_trusted), a stream not vouched for to its end by one of them is a problem too.
        """
        return self.verify_report(run_id, trusted).problems

    def verify_report(self, run_id: str | None = None, trusted: set[str] | None = None) -> VerifyReport:
        """``verify``, with what each stream's signed heads say (who vouches for how much)."""
        stmt = sa.select(*_COLUMNS, event_table.c.xid).order_by(event_table.c.run_id, event_table.c.version)
        heads_stmt = sa.select(head_table).order_by(head_table.c.run_id, head_table.c.version)
        if run_id is not None:
            stmt = stmt.where(event_table.c.run_id == run_id)
            heads_stmt = heads_stmt.where(head_table.c.run_id == run_id)
        report = VerifyReport([], {})
        references: dict[str, tuple[str, int, str, bool]] = {}  # digest -> (run, version, field, must exist)
        with self._reading(), self.engine.connect() as conn:
            heads: dict[str, list[SignedHead]] = {}
            for row in conn.execute(heads_stmt).mappings():
                heads.setdefault(row["run_id"], []).append(_head(row))
            for rid, group in itertools.groupby(conn.execute(stmt), key=lambda r: r.run_id):
                rows = list(group)
                misnamed = run_id_problem(rid)  # a stream written behind the ledger's back
                problem = (Problem(rid, 0, misnamed) if misnamed else None) or check_stream(rid, rows) \
                    or _positions_problem(rid, rows)
                if problem is not None:
                    report.problems.append(problem)
                _collect_references(rows, references)
                report.heads[rid] = check_heads(rid, [r.hash for r in rows], heads.pop(rid, []))
            for rid, orphans in heads.items():  # heads whose stream is gone altogether
                report.heads[rid] = check_heads(rid, [], orphans)
            if run_id is not None and run_id not in report.heads:
                raise unknown_run(run_id)
            report.problems += _check_blobs(conn, references)
        for check in report.heads.values():
            report.problems += [Problem(check.run_id, v, why) for v, why in check.problems]
            if trusted is not None:
                report.problems += [Problem(check.run_id, v, why) for v, why in trust_problems(check, trusted)]
        report.problems.sort(key=lambda p: (p.run_id, p.version))
        return report


@dataclass
class VerifyReport:
    problems: list[Problem]
    heads: dict[str, HeadCheck]  # per stream: what its signed heads vouch for


# -- helpers ----------------------------------------------------------------------

def _check_run_id(run_id: str, secrets: list[str]) -> None:
    problem = run_id_problem(run_id, secrets)
    if problem is not None:
        raise LedgerError(problem)


def _prepare(ev: NewEvent, secrets: list[str]) -> _Pending:
    """Validate against the catalogue, redact, and encode one event (before any write)."""
    if not isinstance(ev, NewEvent):
        raise InvalidEvent(f"append takes NewEvent objects, not {type(ev).__name__}")
    validate(ev)
    if not isinstance(ev.event_id, str) or not ev.event_id:
        raise InvalidEvent(f"{ev.type}: event_id must be a non-empty string")
    data = ev.data if type(ev.data) is dict else dict(ev.data)
    try:
        data_json = redacted_json(data, secrets)
    except (TypeError, ValueError) as e:
        raise InvalidEvent(f"{ev.type}: payload is not JSON: {e}") from None
    if ("NaN" in data_json or "Infinity" in data_json) and (where := _non_finite(data)) is not None:
        # Python's JSON writes them, but they are not JSON: every reader after us would choke
        raise InvalidEvent(f"{ev.type}: {where} is {_non_finite_value(data, where)}, "
                           "not a finite number; the ledger stores only finite numbers")
    version = ev.schema_version if ev.schema_version is not None else CATALOGUE[ev.type].version
    return _Pending(ev.event_id, ev.type, version, data_json)


def _non_finite(node: object, path: str = "") -> str | None:
    """The dotted path of the first non-finite float in a JSON-like value, or None."""
    if isinstance(node, float) and not math.isfinite(node):
        return path or "the payload"
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite(value, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _non_finite_value(data: Any, where: str) -> str:
    for key in where.split("."):
        data = data[int(key)] if isinstance(data, (list, tuple)) else data[key]
    return str(data)


def _chain(run_id: str, first_version: int, prev_hash: str, pending: list[_Pending],
           recorded_at: float) -> list[dict[str, Any]]:
    rows = []
    for i, p in enumerate(pending):
        version = first_version + i
        prev_hash = event_hash(prev_hash, run_id, version, p.event_id, p.type, p.schema_version,
                               p.data_json, recorded_at)
        rows.append({"run_id": run_id, "version": version, "event_id": p.event_id, "type": p.type,
                     "schema_version": p.schema_version, "data": p.data_json,
                     "recorded_at": recorded_at, "hash": prev_hash})
    return rows


def _already_stored(conn: Connection, run_id: str, first_version: int,
                    pending: list[_Pending]) -> list[RecordedEvent] | None:
    """The stored events if exactly this batch is already at those versions, else None."""
    stmt = (sa.select(*_COLUMNS)
            .where(event_table.c.run_id == run_id, event_table.c.version >= first_version,
                   event_table.c.version < first_version + len(pending))
            .order_by(event_table.c.version))
    rows = conn.execute(stmt).all()
    if [r.event_id for r in rows] != [p.event_id for p in pending]:
        return None
    return [_from_row(r) for r in rows]


def _stream_version(conn: Connection, run_id: str) -> int:
    head = conn.execute(_HEAD, {"run_id": run_id}).first()
    return head.version + 1 if head else 0


def _decoded(type: str, schema_version: int, data_json: str) -> tuple[int, dict[str, Any]]:
    data = json.loads(data_json)  # a damaged payload raises ValueError: see _from_row
    current = CATALOGUE.get(type)
    if current is not None and current.version == schema_version:
        return schema_version, data  # the common case: nothing to upcast
    return upcast(type, schema_version, data)


def _refused(event_type: str, version: int, data: object) -> str | None:
    """What its event type refuses in a decoded payload (None: readable). An unknown type or a
    schema version ahead of this code is not judged here (``import`` refuses both)."""
    current = CATALOGUE.get(event_type)
    if current is None or version != current.version:
        return None
    return payload_problem(current, data)


def _payload_problem(event_type: str, schema_version: int, data_json: str) -> str | None:
    """``_refused`` for a stored payload, its decoding included."""
    try:
        version, data = _decoded(event_type, schema_version, data_json)
    except ValueError as e:  # JSONDecodeError, or an upcaster that refused
        return f"its payload cannot be read ({e})"
    except Exception as e:  # an upcaster that met a payload it cannot take
        return f"its payload cannot be upcast ({type(e).__name__}: {e})"
    return _refused(event_type, version, data)


def _from_row(row: Row, check: bool = True) -> RecordedEvent:
    run_id, version, position, event_id, type_, schema_version, data_json, recorded_at, hash_ = row  # _COLUMNS
    try:
        current, data = _decoded(type_, schema_version, data_json)
    except json.JSONDecodeError:
        raise CorruptLedger(f"run {run_id} version {version} ({type_}) holds a payload that is "
                            "not valid JSON") from None
    except ValueError as e:  # an upcaster that refused it
        raise CorruptLedger(f"run {run_id} version {version} ({type_}): {e}") from None
    problem = _refused(type_, current, data) if check else None
    if problem is not None:  # no view should meet it: name it here instead
        raise CorruptLedger(f"run {run_id} version {version} ({type_}) holds a payload its "
                            f"event type refuses: {problem}")
    return RecordedEvent(run_id, version, position, event_id, type_, current, data, recorded_at, hash_)


def _recorded_from_rows(rows: list[dict[str, Any]], positions: list[int]) -> list[RecordedEvent]:
    """The RecordedEvents for rows just inserted, their payloads decoded as read() would."""
    payloads = json.loads(f"[{','.join(r['data'] for r in rows)}]")  # one decode per batch
    recorded = []
    for r, position, data in zip(rows, positions, payloads):
        version = r["schema_version"]
        current = CATALOGUE.get(r["type"])
        if current is None or current.version != version:
            version, data = upcast(r["type"], version, data)
        recorded.append(RecordedEvent(r["run_id"], r["version"], position, r["event_id"], r["type"],
                                      version, data, r["recorded_at"], r["hash"]))
    return recorded


# The rows the checks below read by attribute are a database Row or a bundle's RowView (a row
# carried as a dict, its columns set as attributes): Any, as neither type declares the columns.


def check_chain(run_id: str, rows: Iterable[Any]) -> Problem | None:
    """The first version of a stream that is missing or whose hash does not chain (None: intact)."""
    expected, prev_hash = 0, GENESIS_HASH
    for r in rows:
        if r.version != expected:
            return Problem(run_id, expected, f"version {expected} is missing (the next stored version is {r.version})")
        if event_hash(prev_hash, r.run_id, r.version, r.event_id, r.type, r.schema_version, r.data,
                      r.recorded_at) != r.hash:
            return Problem(run_id, r.version, "hash mismatch: the event was edited, reordered, or an event "
                                              "before it was removed")
        expected, prev_hash = r.version + 1, r.hash
    return None


def check_stream(run_id: str, rows: Sequence[Any]) -> Problem | None:
    """The first thing wrong with a stream, in version order: a version missing, a hash that
    does not chain, or a payload its event type refuses (the chain may be intact and the
    payload still unreadable: a forger, or a bug, recomputed it)."""
    chain = check_chain(run_id, rows)
    limit = chain.version if chain is not None else len(rows)
    for r in rows[:limit]:
        problem = _payload_problem(r.type, r.schema_version, r.data)
        if problem is not None:
            return Problem(run_id, r.version, f"{r.type}: {problem}")
    return chain


def _positions_problem(run_id: str, rows: Sequence[Any]) -> Problem | None:
    """Within a stream, positions and follow order (xid, position) grow with the version (store.py
    says why): a follower then sees each stream in version order."""
    for before, after in zip(rows, rows[1:]):
        if after.position <= before.position:
            return Problem(run_id, after.version, f"its position {after.position} is not after version "
                                                  f"{before.version}'s {before.position}: positions were altered")
        if after.xid < before.xid:
            return Problem(run_id, after.version, f"its writing transaction {after.xid} is before version "
                                                  f"{before.version}'s {before.xid}: the xid column was altered")
    return None


def _collect_references(rows: Sequence[Any], references: dict[str, tuple[str, int, str, bool]]) -> None:
    """Every digest the stream's payloads name: those of blob fields (EventType.blobs) must be
    stored; any other must still hash to it when a blob is stored under it."""
    for r in rows:
        if "_digest" not in r.data and "prompt_sets" not in r.data:
            continue
        try:
            data = json.loads(r.data)
        except ValueError:
            continue  # reported by check_stream
        required = {d for _, d in blob_references(r.type, data)} if isinstance(data, dict) else set()
        for field, digest in digest_references(data):
            known = references.get(digest)
            if known is None or (digest in required and not known[3]):
                references[digest] = (r.run_id, r.version, field, digest in required)


def _check_blobs(conn: Connection, references: dict[str, tuple[str, int, str, bool]]) -> list[Problem]:
    problems = []
    for digest, (run_id, version, field, required) in references.items():
        data = blob_store.read_blob(conn, digest)
        if data is None:
            if required:  # a digest that is only an identity (RunStarted.spec_digest) names no blob
                problems.append(Problem(run_id, version, f"{field} {digest}: the blob is missing (it was "
                                                         "deleted, or never stored)"))
        elif sha256_hex(data) != digest:
            problems.append(Problem(run_id, version, f"{field} {digest}: the blob's content was "
                                    "altered (its sha256 no longer matches)"))
    return problems


# -- signed heads ----------------------------------------------------------------------


def _head(row: RowMapping) -> SignedHead:
    return SignedHead(row["run_id"], row["version"], row["hash"], row["signed_at"], row["public_key"],
                      row["signature"])


def _heads(conn: Connection, run_id: str) -> list[SignedHead]:
    stmt = (sa.select(head_table).where(head_table.c.run_id == run_id)
            .order_by(head_table.c.version, head_table.c.public_key))
    return [_head(r) for r in conn.execute(stmt).mappings()]


def _newest_heads(conn: Connection, run_id: str) -> list[SignedHead]:
    newest = (sa.select(sa.func.max(head_table.c.version)).where(head_table.c.run_id == run_id)
              .scalar_subquery())
    stmt = sa.select(head_table).where(head_table.c.run_id == run_id, head_table.c.version == newest)
    return [_head(r) for r in conn.execute(stmt).mappings()]


def _check_read(run_id: str, first: int, before: Row | None, rows: Sequence[Row], newest: list[SignedHead]) -> None:
    """What ``read`` returns: its rows chain on from version ``first`` (``before`` is the row at
    ``first - 1``, None from 0), and the run's newest signed head verifies and is reached with
    the same hash."""
    if first > 0 and rows and before is None:
        raise CorruptLedger(f"run {run_id}: version {first - 1} is missing")
    prev_hash = before.hash if before is not None else GENESIS_HASH
    expected = first
    hashes = []
    # unpacked, not read by attribute: this runs for every event every view reads
    for rid, version, _, event_id, type_, schema_version, data, recorded_at, hash_ in rows:
        if version != expected:
            raise CorruptLedger(f"run {run_id}: version {expected} is missing (the next stored version is "
                                f"{version})")
        if event_hash(prev_hash, rid, version, event_id, type_, schema_version, data, recorded_at) != hash_:
            raise CorruptLedger(f"run {run_id} version {version} ({type_}): hash mismatch: the event was "
                                "edited, reordered, or an event before it was removed")
        expected, prev_hash = version + 1, hash_
        hashes.append(hash_)
    if newest:
        problems = check_heads(run_id, hashes, newest, first=first).problems
        if problems:
            raise CorruptLedger(f"run {run_id}: {problems[0][1]}")


