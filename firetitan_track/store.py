"""Where the ledger lives: its tables, opening a database by URL, and schema revisions.

SQLite (the default, a file in WAL mode) and PostgreSQL are both reached through
SQLAlchemy Core. They differ in how a follower (the MLflow exporter) reads every event
once, never skipping one that committed late:

- SQLite: an append runs in ``BEGIN IMMEDIATE``, taking the database's single write
  lock before it reads the stream head. Insert order is then commit order, and a
  follower reads ``position > p`` in position order.
- PostgreSQL: appends run side by side, unlocked, so they commit in any order of
  their positions (drawn from a sequence). Each row also records the id of the
  transaction that wrote it (``events.xid``: ``pg_current_xact_id()``, 64 bits, never
  wrapping around), set by the column's default so that no writer can leave it out. A
  follower reads only rows whose xid is below its snapshot's ``xmin`` (every
  transaction below it has finished: its rows are all visible or never will be), in
  ``(xid, position)`` order, and its cursor is that pair. A row written later has an
  xid at or above that ``xmin``, so it sorts after the cursor, even when its
  transaction drew its position before another's that committed first (a position and
  an xid are not taken in one step). ``xmin`` is the whole server's: a transaction that
  writes anywhere on it and stays open holds followers back, never makes them skip
  (``Ledger.settle`` waits until what committed before it can be followed).
  An append reads the stream head before it writes anything (before its xid exists),
  so within a stream ``(xid, position)`` grows with the version and a follower sees a
  stream in order. Two appends to one stream race on the ``(run_id, version)`` unique
  index: the loser's insert waits for the winner's commit and fails, as a
  ConcurrencyError. An append is two round trips, pipelined: BEGIN, the head read and
  the lease check (below); then the insert, its positions read back, COMMIT and the
  notification (below). A writer's next append to a stream goes right after the head it
  committed itself, so it skips the read and takes one round trip: its transaction
  begins after that commit (its xid comes after the head's), a head another writer
  appended meanwhile fails it on the unique index, and its lease check is a statement
  that fails unless the lease is held, so the COMMIT pipelined after it never runs.
  Rows written before the column existed hold 0: they sort first, in position order,
  which was their commit order (a commit-order lock serialized appends then).

Followers wake on commit rather than polling: on PostgreSQL an append, once committed,
sends a ``NOTIFY`` on :data:`COMMIT_CHANNEL` from a transaction of its own (in its last
round trip), which :class:`CommitWatch` listens for on a connection of its own. Not from
the append's transaction: a NOTIFY takes a database-wide lock from its transaction's
pre-commit to the end of its commit (PostgreSQL keeps its queue in commit order), which
would serialize every append's WAL flush again; the notifying transaction skips the
flush wait (``synchronous_commit off``), so it holds that lock only for a moment. On
SQLite the watch looks at the database and WAL files, which every commit writes. Either
way a follower still polls at its own interval as the fallback (a transaction outside
the ledger, a lease renewal say, can hold rows back for a moment and notifies no one).

An append to a run whose writer holds a lease in the database (run_leases)
also checks the lease's fencing token inside its transaction, right after it reads the
head (the check locks the lease row, which gives the transaction its xid): a writer
whose lease was taken over stops with LeaseLost instead of writing. Taking, renewing and
releasing a lease (and SQLite's file lock) are lease.py's.

The schema is owned by the Alembic scripts in ``firetitan_track/schema/`` (package data,
so an installed wheel creates and upgrades ledgers); the tables below mirror the head
revision and are what the code queries.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import StaticPool

from firetitan_track.errors import UserError, first_line
from firetitan_track.extras import MissingExtra
from firetitan_track.urls import absolute_url

__all__ = [
    "LedgerError",
    "LeaseLost",
    "FOLLOW_HORIZON",
    "NEXT_TRANSACTION",
    "SchemaOutOfDate",
    "HEAD_REVISION",
    "Store",
    "CommitWatch",
    "commit_watch",
    "open_store",
    "open_engine_for_url",
    "revision_status",
    "mask_url",
    "sqlite_path",
    "upgrade_schema",
    "schema_revision",
    "metadata",
    "events",
    "blobs",
    "checkpoints",
    "run_leases",
    "signed_heads",
]

# The Alembic head this code is written against (tests check it matches SCHEMA_DIR).
HEAD_REVISION = "0004"
SCHEMA_DIR = Path(__file__).resolve().parent / "schema"
UPGRADE_HINT = "firetitan-track db upgrade"


class LedgerError(UserError):
    """Anything the ledger cannot do, with a message a person can act on."""


class SchemaOutOfDate(LedgerError):
    """The database is at a different schema revision than this code needs."""


class LeaseLost(LedgerError):
    """This process's lease on a run was taken over by another writer: it must stop."""

    def __init__(self, run_id: str, detail: str = "") -> None:
        super().__init__(f"run {run_id}: this process lost its lease on the run to another writer"
                         f"{detail}; it stops without writing more (the other writer continues the run)")
        self.run_id = run_id


metadata = sa.MetaData()


class _WritingTransaction(sa.sql.expression.ColumnElement):
    """events.xid's default: on PostgreSQL the id of the transaction that inserts the row
    (xid8, as a bigint: 32 bits of epoch over 32 of xid, far from the sign bit); on SQLite
    0, since its single writer commits in position order."""

    type = sa.BigInteger()
    inherit_cache = True


@compiles(_WritingTransaction, "postgresql")
def _writing_transaction_postgres(element, compiler, **kw):  # type: ignore[no-untyped-def]
    return "(pg_current_xact_id())::text::bigint"


@compiles(_WritingTransaction)
def _writing_transaction_other(element, compiler, **kw):  # type: ignore[no-untyped-def]
    return "0"


def _snapshot_bound(bound):  # type: ignore[no-untyped-def]
    return sa.cast(sa.cast(bound(sa.func.pg_current_snapshot()), sa.Text), sa.BigInteger)


# What a PostgreSQL follower may read: rows of transactions below its snapshot's xmin, all finished.
FOLLOW_HORIZON = _snapshot_bound(sa.func.pg_snapshot_xmin)
# The first transaction id not yet handed out: every commit so far is below it.
NEXT_TRANSACTION = _snapshot_bound(sa.func.pg_snapshot_xmax)

events = sa.Table(
    "events", metadata,
    # global order for followers; AUTOINCREMENT on SQLite so a position is never reused
    sa.Column("position", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("event_id", sa.String, nullable=False),
    sa.Column("type", sa.String, nullable=False),
    sa.Column("schema_version", sa.Integer, nullable=False),
    sa.Column("data", sa.Text, nullable=False),  # canonical JSON, exactly the hashed text
    sa.Column("recorded_at", sa.Double, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    # the writing transaction (PostgreSQL; 0 on SQLite and for rows older than the column):
    # followers read in (xid, position) order, see the module's opening
    sa.Column("xid", sa.BigInteger, nullable=False, server_default=_WritingTransaction()),
    sa.UniqueConstraint("run_id", "version", name="uq_events_run_version"),
    sa.UniqueConstraint("run_id", "event_id", name="uq_events_run_event_id"),
    sqlite_autoincrement=True,
)

blobs = sa.Table(
    "blobs", metadata,
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Column("media_type", sa.String, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

# PostgreSQL followers page by (xid, position); SQLite's never reads xid, so it has no index.
sa_event.listen(events, "after_create", sa.DDL("CREATE INDEX ix_events_xid_position ON events (xid, position)")
                .execute_if(dialect="postgresql"))

# A follower's cursor (ledger.FollowCursor); a checkpoint from before xid existed reads as (0, position).
checkpoints = sa.Table(
    "checkpoints", metadata,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("xid", sa.BigInteger, nullable=False, server_default=sa.text("0")),
)

# One writer per run across machines (PostgreSQL; the writer takes and renews it). A row is never
# deleted, so a run's fencing token only ever grows and an old holder can never
# match a later one's.
run_leases = sa.Table(
    "run_leases", metadata,
    sa.Column("run_id", sa.String, primary_key=True),
    sa.Column("token", sa.BigInteger, nullable=False),  # the fencing token, +1 per takeover
    sa.Column("holder", sa.String, nullable=False),  # host:pid, for messages
    sa.Column("expires_at", sa.Double, nullable=False),  # the database's clock, unix seconds
)

# Signatures over stream heads (firetitan_track/signing.py); the private key is never stored here.
signed_heads = sa.Table(
    "signed_heads", metadata,
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),  # of the event at that version
    sa.Column("signed_at", sa.Double, nullable=False),
    sa.Column("public_key", sa.String, nullable=False),  # the signer, "ed25519:BASE64"
    sa.Column("signature", sa.String, nullable=False),  # base64
    sa.PrimaryKeyConstraint("run_id", "version", "public_key", name="pk_signed_heads"),
)

# Appends notify this channel once they commit (PostgreSQL); CommitWatch listens on it.
COMMIT_CHANNEL = "firetitan_ledger"
_FENCE_SQL = "SELECT token FROM run_leases WHERE run_id = %(run_id)s FOR SHARE"
# the same check where nothing can wait for its answer (a pipeline that commits): it fails,
# dividing by zero, unless the row holds this process's token, and the commit after it with it
_FENCE_OR_FAIL_SQL = ("SELECT 1 / (SELECT count(*) FROM (SELECT 1 FROM run_leases WHERE run_id = %(run_id)s"
                      " AND token = %(token)s FOR SHARE) AS held)")
# a transaction of its own, its commit not waiting for the WAL flush (set_config(..., true): this transaction only)
_NOTIFY_SQL = f"SELECT set_config('synchronous_commit', 'off', true), pg_notify('{COMMIT_CHANNEL}', '')"


# -- URLs ------------------------------------------------------------------------

def mask_url(url: str | URL) -> str:
    """The URL as it may appear in a message: password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return str(url)


def _parse(url: str) -> URL:
    url = absolute_url(url) if isinstance(url, str) else url
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise LedgerError(f"cannot parse ledger URL {url!r}: use sqlite:///PATH or "
                          "postgresql+psycopg://USER@HOST/DB") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+psycopg")  # the one driver we ship
    if backend == "sqlite" and parsed.get_driver_name() in ("pysqlite", ""):
        return parsed
    raise LedgerError(f"unsupported ledger URL {mask_url(parsed)}: use sqlite:///PATH or "
                      "postgresql+psycopg://USER@HOST/DB")


def sqlite_path(url: str) -> Path | None:
    """The file behind a ``sqlite:///`` URL; None for PostgreSQL or in-memory SQLite."""
    parsed = _parse(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


# -- engines ---------------------------------------------------------------------

def _sqlite_engine(parsed: URL) -> Engine:
    in_memory = parsed.database in (None, "", ":memory:")
    engine = sa.create_engine(
        parsed, connect_args={"timeout": 30, "check_same_thread": False},
        paramstyle="named",  # the ledger's append passes dict rows straight to sqlite3
        **({"poolclass": StaticPool} if in_memory else {}),
    )

    @sa_event.listens_for(engine, "connect")
    def _configure(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None  # transactions are begun below, explicitly
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: each commit is fsynced, so an acknowledged append survives power loss.
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @sa_event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # appends take the write lock up front, so reading the head and inserting
        # cannot interleave with another writer (no upgrade deadlock, no busy retry)
        immediate = conn.get_execution_options().get("ledger_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _postgres_engine(parsed: URL) -> Engine:
    connect_args = {} if "connect_timeout" in parsed.query else {"connect_timeout": 5}
    try:
        return sa.create_engine(parsed, connect_args=connect_args, pool_size=10, max_overflow=20)
    except ModuleNotFoundError as e:  # the driver (psycopg) is the [postgres] extra
        raise MissingExtra("postgres", f"the PostgreSQL ledger at {mask_url(parsed)}", [e.name or str(e)]) from None


@dataclass
class Store:
    """An open ledger database: the engine plus the few dialect-specific statements."""

    engine: Engine
    url: str  # masked, for messages
    sqlite_file: Path | None = None  # the database file of a SQLite ledger (its signing key lives beside it)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def __post_init__(self) -> None:
        self._fences: dict[str, int] = {}  # run -> the lease token its appends must hold

    def fence(self, run_id: str, token: int | None) -> None:
        """Appends to ``run_id`` through this store must find lease token ``token`` (None: stop checking)."""
        if token is None:
            self._fences.pop(run_id, None)
        else:
            self._fences[run_id] = token

    @contextlib.contextmanager
    def append_transaction(self, *, begun_by_head: bool = False) -> Iterator[Connection]:
        """A transaction for one append (or import). On SQLite it holds the database's write
        lock from the start; on PostgreSQL it takes nothing until it writes. With
        ``begun_by_head`` (an append) :meth:`read_head` begins the PostgreSQL transaction
        itself, in the round trip of its reads: the driver is left in autocommit mode till
        the transaction ends, or it would send a BEGIN of its own and wait for it."""
        with self.engine.connect() as conn:
            if self.is_sqlite:
                conn = conn.execution_options(ledger_write=True)
                with conn.begin():
                    yield conn
                return
            if not begun_by_head:
                with conn.begin():
                    yield conn
                return
            # (the block's commit or rollback ends the BEGIN read_head sent)
            with _driver_autocommit(conn), conn.begin():
                yield conn

    @contextlib.contextmanager
    def one_statement(self) -> Iterator[Connection]:
        """A connection for a read that is one statement. On PostgreSQL it runs in autocommit:
        the statement is its own transaction with its own snapshot, as it would be inside one
        at read committed, without the BEGIN and ROLLBACK round trips around it (a follower
        woken by every commit reads once per commit)."""
        with self.engine.connect() as conn:
            if self.is_sqlite:
                yield conn
                return
            with _driver_autocommit(conn):
                yield conn

    def read_head(self, conn: Connection, head_sql: str, run_id: str) -> tuple | None:
        """The row ``head_sql`` reads, the head of the stream an append to ``run_id`` goes after.
        For a fenced run on PostgreSQL (a SQLite lease is a file lock) the lease token is checked
        in the same round trip, after the head: LeaseLost unless this process still holds it.
        That check locks the lease row FOR SHARE (a takeover waits until this append commits),
        which gives the transaction its xid, and the xid must come after the head read (see the
        module's opening)."""
        params = {"run_id": run_id}
        if self.is_sqlite:
            cursor = conn.connection.cursor()
            cursor.execute(head_sql, params)
            return cursor.fetchone()
        token = self._fences.get(run_id)
        driver = conn.connection.driver_connection
        with driver.pipeline():
            driver.execute("BEGIN")  # (append_transaction(begun_by_head=True) left this to us)
            head = driver.execute(head_sql, params)
            fence = driver.execute(_FENCE_SQL, params) if token is not None else None
        if fence is not None:
            held = fence.fetchone()
            if held is None or held[0] != token:
                raise LeaseLost(run_id, f" (its token is {held[0] if held else None}, this process held {token})")
        return head.fetchone()

    def notify_followers(self, conn: Connection) -> None:
        """Queue a wake-up for followers, delivered when ``conn``'s transaction commits
        (PostgreSQL). For the rare big write (an import); an append notifies after its
        commit instead (insert_and_commit), see the module's opening."""
        if not self.is_sqlite:
            conn.exec_driver_sql(f"SELECT pg_notify('{COMMIT_CHANNEL}', '')")

    def insert_and_commit(self, conn: Connection, insert: str, rows: list[dict], positions: str,
                          positions_params: dict, also: list[tuple[str, dict]] = (),
                          begins_for: str | None = None) -> list[int]:
        """PostgreSQL: insert ``rows``, read back their positions (``positions``, in version order),
        run each ``also`` statement in the same transaction, commit, then notify followers from a
        transaction of its own: all pipelined, in one round trip (see the module's opening).
        Returns the positions. The transaction is over when this returns (the caller's
        transaction block then has nothing left to commit).

        ``begins_for``: the run whose head this writer committed itself, so it was not read: the
        pipeline begins the transaction too, and checks the run's lease first (LeaseLost, with
        nothing written, unless this process holds it)."""
        import psycopg

        driver = conn.connection.driver_connection
        token = self._fences.get(begins_for) if begins_for is not None else None
        try:
            with driver.pipeline():
                if begins_for is not None:
                    driver.execute("BEGIN")
                    if token is not None:  # first: it locks the lease row, giving the transaction its xid
                        driver.execute(_FENCE_OR_FAIL_SQL, {"run_id": begins_for, "token": token})
                # executemany(returning=True) would wait for the inserts' results before going on
                driver.cursor().executemany(insert, rows)
                read_back = driver.execute(positions, positions_params)
                for statement, params in also:
                    driver.execute(statement, params)
                # COMMIT as a statement: driver.commit() would wait for it (a sync) and the next
                # statement would wait for a BEGIN. The server runs the notification after the
                # commit, in an implicit transaction of its own that ends at the pipeline's sync.
                driver.execute("COMMIT")
                driver.execute(_NOTIFY_SQL)
        except psycopg.errors.DivisionByZero:  # the fence's: another writer holds the lease now
            raise LeaseLost(begins_for or "", f" (this process held token {token})") from None
        return [r[0] for r in read_back.fetchall()]

    def insert_ignoring_duplicates(self, table: sa.Table) -> sa.Insert:
        return self._dialect_insert(table).on_conflict_do_nothing()

    def upsert(self, table: sa.Table, key: str, values: dict) -> sa.Insert:
        stmt = self._dialect_insert(table).values(**values)
        return stmt.on_conflict_do_update(index_elements=[key],
                                          set_={k: v for k, v in values.items() if k != key})

    def _dialect_insert(self, table: sa.Table):  # type: ignore[no-untyped-def]
        # both dialects spell ON CONFLICT the same way, through their own insert()
        if self.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(table)

    def close(self) -> None:
        self.engine.dispose()


class CommitWatch:
    """Tells a follower when an append may have committed, so it reads only then.

    ``wait(timeout)`` returns True as soon as a commit may have happened since the last
    call (at once on the first call, so nothing committed before the watch began is
    missed), False after ``timeout`` seconds without one. A wake may be spurious (a
    checkpoint of the SQLite WAL, another ledger's append on the same PostgreSQL
    database): the follower then reads nothing new and waits again.
    """

    stop_check_s = 0.25  # how promptly wait_or_stop notices its stop event

    def wait(self, timeout: float) -> bool:
        raise NotImplementedError

    def wait_or_stop(self, stop: threading.Event, poll_s: float) -> None:
        """Return when a commit may have happened, ``stop`` is set, or ``poll_s`` has passed
        (the fallback poll: a follower reads at least that often whatever it hears)."""
        deadline = time.monotonic() + poll_s
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or self.wait(min(left, self.stop_check_s)):
                return

    def close(self) -> None:
        pass


class _PollingWatch(CommitWatch):
    """No way to hear commits (an in-memory database): every wait runs its full time."""

    def __init__(self) -> None:
        self._first = True

    def wait(self, timeout: float) -> bool:
        if self._first:
            self._first = False
            return True
        time.sleep(max(0.0, timeout))
        return True


class _FileWatch(CommitWatch):
    """SQLite: every commit writes the database's WAL file (or, after a checkpoint, the
    database file): their sizes and modification times change. A stat is a system call,
    not a query; at every ``interval`` it costs nothing measurable."""

    interval = 0.02

    def __init__(self, path: Path) -> None:
        self._files = (path, path.with_name(path.name + "-wal"))
        self._seen = self._stamp()
        self._first = True
        # A commit writes the WAL a moment before readers can see it: a wake is repeated
        # once, an interval later, so a read that came too early is made again.
        self._again_at: float | None = None

    def _stamp(self) -> tuple:
        stamps = []
        for f in self._files:
            try:
                st = f.stat()
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def wait(self, timeout: float) -> bool:
        if self._first:  # watching from now on: what committed before is read at once
            self._first = False
            return True
        deadline = time.monotonic() + timeout
        while True:
            stamp, now = self._stamp(), time.monotonic()
            if stamp != self._seen:
                self._seen, self._again_at = stamp, now + self.interval
                return True
            if self._again_at is not None and now >= self._again_at:
                self._again_at = None
                return True
            left = deadline - now
            if left <= 0:
                return False
            time.sleep(min(self.interval, left))


class _NotifyWatch(CommitWatch):
    """PostgreSQL: LISTEN on a connection of its own (autocommit, outside the pool)."""

    def __init__(self, engine: Engine) -> None:
        import psycopg

        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        self._conn = psycopg.connect(*cargs, **cparams, autocommit=True)
        self._conn.execute(f"LISTEN {COMMIT_CHANNEL}")
        self._first = True

    def wait(self, timeout: float) -> bool:
        if self._first:  # listening from now on: what committed before is read at once
            self._first = False
            return True
        heard = any(True for _ in self._conn.notifies(timeout=timeout, stop_after=1))
        if heard:  # one wake for every notification already queued
            for _ in self._conn.notifies(timeout=0.0):
                pass
        return heard

    def close(self) -> None:
        self._conn.close()


@contextlib.contextmanager
def _driver_autocommit(conn: Connection) -> Iterator[None]:
    """PostgreSQL's driver in autocommit for the block (it sends no BEGIN of its own), and out
    of it again afterwards, as the pool lends it. A connection the block left broken is not
    touched: setting the mode would fail over the block's own error, and the pool discards it."""
    from psycopg.pq import TransactionStatus

    driver = conn.connection.driver_connection
    driver.autocommit = True
    try:
        yield
    finally:
        if driver.info.transaction_status == TransactionStatus.IDLE:
            driver.autocommit = False


def commit_watch(store: Store) -> CommitWatch:
    """A watch for commits to ``store``'s database (see CommitWatch)."""
    if not store.is_sqlite:
        return _NotifyWatch(store.engine)
    database = store.engine.url.database
    if database in (None, "", ":memory:"):
        return _PollingWatch()
    return _FileWatch(Path(database))


def _store_for(parsed: URL) -> Store:
    if parsed.get_backend_name() == "sqlite":
        file = None if parsed.database in (None, "", ":memory:") else Path(parsed.database)
        return Store(_sqlite_engine(parsed), mask_url(parsed), file)
    return Store(_postgres_engine(parsed), mask_url(parsed))


def open_engine_for_url(url: str) -> Engine:
    """A configured engine for ``url`` with no schema check (Alembic's own entry point)."""
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return _store_for(_parse(url)).engine


def open_store(url: str, create: bool = True) -> Store:
    """Open the ledger at ``url``.

    A SQLite file is created (with its parent folders) and brought to the head
    schema on first use; with ``create=False`` a missing file is an error instead.
    A PostgreSQL ledger must already be at the head revision.
    """
    parsed = _parse(url)
    path = sqlite_path(url)
    if path is not None:
        if not create and (not path.exists() or path.stat().st_size == 0):
            # an empty file is no ledger either, and a reading command must not make it one
            raise LedgerError(f"no ledger at {path}" + (" (the file is empty)" if path.exists() else ""))
        if not path.exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise LedgerError(f"cannot create the ledger at {path}: {e.strerror or e}") from None
        if create and not os.access(path if path.exists() else path.parent, os.W_OK):
            raise LedgerError(f"cannot write the ledger at {path}: permission denied")
    store = _store_for(parsed)
    try:
        _ensure_schema(store, upgrade=store.is_sqlite and create)  # reading changes nothing
    except BaseException:
        store.close()
        raise
    return store


def _ensure_schema(store: Store, upgrade: bool) -> None:
    try:
        with store.engine.connect() as conn:
            current = schema_revision(conn)
    except DBAPIError as e:
        raise LedgerError(f"cannot reach the ledger database at {store.url}: {first_line(e)}") from None
    if current == HEAD_REVISION:
        return
    if current is not None and current not in _known_revisions():
        raise SchemaOutOfDate(
            f"the ledger at {store.url} is at schema revision {current}, which this version of "
            f"firetitan-track does not know (it needs {HEAD_REVISION}); upgrade firetitan-track")
    if not upgrade:
        raise SchemaOutOfDate(
            f"the ledger at {store.url} is at schema revision {current or '(none)'}, "
            f"this firetitan-track needs {HEAD_REVISION}: run `{UPGRADE_HINT}` "
            "with the same --ledger or FIRETITAN_LEDGER")
    _upgrade(store)


# -- revisions (Alembic) ----------------------------------------------------------

def schema_revision(conn: Connection) -> str | None:
    """The revision recorded in the database, or None for an empty database."""
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()


def _alembic_config():  # type: ignore[no-untyped-def]
    from alembic.config import Config

    if not (SCHEMA_DIR / "env.py").exists():
        raise LedgerError(f"the schema scripts are missing (looked in {SCHEMA_DIR}): this "
                          "installation of firetitan-track is incomplete; reinstall it")
    cfg = Config()
    cfg.set_main_option("script_location", str(SCHEMA_DIR))
    return cfg


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {s.revision for s in ScriptDirectory.from_config(_alembic_config()).walk_revisions()}


def _upgrade(store: Store) -> None:
    from alembic import command

    cfg = _alembic_config()
    try:
        with store.engine.connect() as conn:
            if store.is_sqlite:
                conn = conn.execution_options(ledger_write=True)  # one creator at a time
            with conn.begin():
                if not store.is_sqlite:
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7201)")  # one upgrader at a time
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
    except DBAPIError as e:
        raise LedgerError(f"cannot upgrade the ledger at {store.url}: {first_line(e)}") from None


def upgrade_schema(url: str) -> tuple[str | None, str]:
    """Bring the ledger at ``url`` to the head revision; returns (before, after)."""
    parsed = _parse(url)
    path = sqlite_path(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LedgerError(f"cannot create the ledger at {path}: {e.strerror or e}") from None
    store = _store_for(parsed)
    try:
        before = current_revision(store)
        if before != HEAD_REVISION:
            if before is not None and before not in _known_revisions():
                raise SchemaOutOfDate(f"the ledger at {store.url} is at unknown revision {before}")
            _upgrade(store)
        return before, HEAD_REVISION
    finally:
        store.close()


def current_revision(store: Store) -> str | None:
    try:
        with store.engine.connect() as conn:
            return schema_revision(conn)
    except DBAPIError as e:
        raise LedgerError(f"cannot reach the ledger database at {store.url}: {first_line(e)}") from None


def revision_status(url: str) -> tuple[str | None, str]:
    """(revision in the database, head revision) without changing anything."""
    parsed = _parse(url)
    path = sqlite_path(url)
    if path is not None and not path.exists():
        raise LedgerError(f"no ledger at {path}")
    store = _store_for(parsed)
    try:
        return current_revision(store), HEAD_REVISION
    finally:
        store.close()
