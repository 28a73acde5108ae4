"""The conformance suite on PostgreSQL (FIRETITAN_TEST_POSTGRES_URL), each test in its own schema."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from firetitan_track import ConcurrencyError, Ledger, SchemaOutOfDate
from firetitan_track.bundle import StreamStore, import_streams
from firetitan_track.ledger import FollowCursor, Followed, StoreFailure
from firetitan_track.store import LeaseLost, Store, _parse, upgrade_schema
from firetitan_track.store import events as event_table
from tests.conformance.base import LedgerConformance, run_started, step
from tests.helpers import needs_postgres

pytestmark = needs_postgres


def _one_connection(ledger_url: str) -> Ledger:
    """A ledger whose pool holds one connection: each use gets the one the last gave back."""
    return Ledger(Store(sa.create_engine(_parse(ledger_url), pool_size=1, max_overflow=0), "one connection"))


class TestPostgresLedger(LedgerConformance):
    @pytest.fixture
    def ledger_url(self, empty_schema_url: str) -> str:
        upgrade_schema(empty_schema_url)
        return empty_schema_url

    def raw_contents(self, ledger: Ledger) -> bytes:
        # a dump through SQL: every row of every ledger table, as text, plus raw blob bytes
        with ledger.engine.connect() as conn:
            text = "".join(
                conn.exec_driver_sql(f"SELECT coalesce(string_agg(t::text, ''), '') FROM {table} t").scalar()
                for table in ("events", "blobs", "checkpoints"))
            raw = b"".join(bytes(r[0]) for r in conn.exec_driver_sql("SELECT data FROM blobs"))
        return text.encode() + raw

    def test_a_database_behind_the_head_is_refused_with_the_upgrade_command(self, empty_schema_url: str,
                                                                          postgres_admin: sa.Engine) -> None:
        with pytest.raises(SchemaOutOfDate, match="firetitan-track db upgrade"):
            Ledger.open(empty_schema_url)
        schema = empty_schema_url.rsplit("%3D", 1)[1]
        with postgres_admin.connect() as conn:
            tables = conn.execute(sa.text("SELECT count(*) FROM information_schema.tables "
                                          "WHERE table_schema = :s"), {"s": schema}).scalar()
        assert tables == 0, "opening a stale ledger wrote to it"

    def test_a_database_at_an_unknown_revision_is_refused(self, ledger_url: str) -> None:
        engine = sa.create_engine(ledger_url)
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'from_the_future'")
        engine.dispose()
        with pytest.raises(SchemaOutOfDate, match="from_the_future"):
            Ledger.open(ledger_url)

    # -- followers and appends that commit out of position order ----------------------------

    @staticmethod
    def _row(tmp_path: Path, run_id: str) -> dict[str, Any]:
        """A stream's first event as the ledger stores it (chained, hashed), to insert by hand."""
        with Ledger.open(f"sqlite:///{tmp_path / 'rows.db'}") as scratch:
            scratch.append(run_id, [run_started()], 0)
            [row] = StreamStore(scratch).rows(run_id)
        return row

    @staticmethod
    def _follow_until(ledger: Ledger, cursor: FollowCursor, count: int, timeout_s: float = 30.0) -> Followed:
        """Follow on from ``cursor`` until ``count`` events came (another session's transaction
        on the server may hold rows back for a moment), then once more: nothing else comes."""
        got: list = []
        deadline = time.monotonic() + timeout_s
        while len(got) < count and time.monotonic() < deadline:
            batch = ledger.follow(cursor)
            got += batch
            cursor = batch.cursor
        assert ledger.settle()
        assert ledger.follow(cursor) == [], "an event followed twice"
        return Followed(got, cursor)

    def test_a_follower_waits_for_an_append_that_drew_its_position_first_and_commits_last(
            self, ledger: Ledger, tmp_path: Path) -> None:
        """Writer A inserts and holds its transaction open; writer B appends after it and commits
        first. B's position is after A's, so a follower reading positions alone would pass A's
        by. The follower delivers nothing until A commits, then both, each once, A's first."""
        early = self._row(tmp_path, "early")
        with ledger.engine.connect() as held:
            held.execute(event_table.insert(), early)  # A: inserted, not committed
            [late] = ledger.append("late", [step(0)], 0)  # B: committed
            for _ in range(20):
                assert ledger.follow(0) == [], "a follower passed an append still in flight"
            held.commit()
        followed = self._follow_until(ledger, FollowCursor(), 2)
        assert [(e.run_id, e.version) for e in followed] == [("early", 0), ("late", 0)]
        assert followed[0].position < late.position  # the commits finished out of position order
        assert ledger.verify() == []

    def test_a_position_drawn_before_the_transaction_id_is_not_skipped(self, ledger: Ledger,
                                                                       tmp_path: Path) -> None:
        """A transaction draws its position (the sequence) before it has an xid: a later one gets
        a higher position and a lower xid and commits first, and the follower delivers it. The
        first one's row (lower position) must still come: its xid is above the follower's cursor."""
        with ledger.engine.connect() as conn:
            drawn = conn.exec_driver_sql("SELECT nextval(pg_get_serial_sequence('events', 'position'))").scalar()
            conn.commit()  # (nextval may have taken an xid of its own, to log the sequence: ended here)
        [late] = ledger.append("late", [step(0)], 0)
        first = self._follow_until(ledger, FollowCursor(), 1)
        assert [e.run_id for e in first] == ["late"] and first.cursor.position > drawn
        with ledger.engine.begin() as conn:  # only now does that transaction get its xid
            conn.execute(event_table.insert(), {**self._row(tmp_path, "early"), "position": drawn})
        second = self._follow_until(ledger, first.cursor, 1)
        assert [(e.run_id, e.position) for e in second] == [("early", drawn)]
        assert drawn < late.position

    def test_imported_rows_are_followed_as_this_ledgers_own(self, ledger: Ledger, tmp_path: Path) -> None:
        """An import writes rows chained elsewhere; their position and writing transaction are
        this ledger's, so a follower past what was here before sees them."""
        ledger.append("here", [run_started()], 0)
        assert ledger.settle()
        before = ledger.follow(0)
        with Ledger.open(f"sqlite:///{tmp_path / 'elsewhere.db'}") as elsewhere:
            elsewhere.append("there", [run_started(), step(0)], 0)
            rows = StreamStore(elsewhere).rows("there")
        assert import_streams(ledger, {"there": rows}) == {"there": 2}
        after = self._follow_until(ledger, before.cursor, 2)
        assert [(e.run_id, e.version) for e in after] == [("there", 0), ("there", 1)]

    def test_a_long_open_transaction_holds_followers_back_and_settle_says_so(self, ledger: Ledger,
                                                                              ledger_url: str) -> None:
        """Any transaction on the server that has written holds followers back until it ends
        (the price of reading below xmin): ``settle`` reports it instead of waiting for ever."""
        engine = sa.create_engine(ledger_url)
        try:
            with engine.connect() as other:
                other.exec_driver_sql("SELECT pg_current_xact_id()")  # a transaction holding an xid
                ledger.append("r", [run_started()], 0)
                assert ledger.settle(timeout_s=0.3) is False
                assert ledger.follow(0) == []
                other.rollback()
            assert ledger.settle()
            assert [e.run_id for e in ledger.follow(0)] == ["r"]
        finally:
            engine.dispose()

    def test_an_append_right_after_its_own_still_fences_and_races_without_reading_the_head(
            self, ledger_url: str) -> None:
        """A writer's next append goes right after the head it committed itself, so it does not
        read it (one round trip: store.py's opening). The lease is still checked before its
        commit, and a head another writer appended meanwhile still refuses it on the unique
        index: nothing written, the chain intact."""
        one, other = Ledger.open(ledger_url), Ledger.open(ledger_url)
        try:
            with one.engine.begin() as conn:
                conn.exec_driver_sql("INSERT INTO run_leases VALUES ('r', 1, 'test', 1e12)")
            one.fence("r", 1)
            one.append("r", [run_started()], 0)
            with one.engine.begin() as conn:  # taken over
                conn.exec_driver_sql("UPDATE run_leases SET token = 2 WHERE run_id = 'r'")
            with pytest.raises(LeaseLost, match=r"this process held token 1\)"):  # the pipeline's own check
                one.append("r", [step(1)], 1)
            assert one.stream_version("r") == 1
            one.fence("r", 2)
            one.append("r", [step(1)], 1)  # (after a failure it reads the head again)
            one.append("r", [step(2)], 2)  # right after its own
            other.append("r", [step(3)], 3)
            mine = step(3, mine=1.0)
            with pytest.raises(ConcurrencyError):
                one.append("r", [mine], 3)  # its last head is stale: 3 is another writer's
            stored = one.read("r")
            assert [e.version for e in stored] == [0, 1, 2, 3] and mine.event_id not in {e.event_id for e in stored}
            assert one.verify("r") == []
            assert [e.event_id for e in one.append("r", [step(4)], 4)] != []  # and goes on after reading it
        finally:
            one.close()
            other.close()

    def test_a_follow_is_one_statement_with_no_transaction_around_it(self, ledger_url: str) -> None:
        """A follower reads on every commit it is woken for: its read is one statement in
        autocommit (its own snapshot), with no BEGIN before it and no ROLLBACK after, and the
        connection goes back to the pool as it was lent."""
        one = _one_connection(ledger_url)
        try:
            one.append("r", [run_started(), step(1)], 0)
            seen: list[tuple[str, str]] = []

            def after_execute(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
                seen.append((statement.split()[0], conn.connection.driver_connection.info.transaction_status.name))

            sa.event.listen(one.engine, "after_cursor_execute", after_execute)
            followed = one.follow(0)
            assert [e.version for e in followed] == [0, 1]
            assert one.follow(followed.cursor, run_ids=["r", "other"]).cursor == followed.cursor
            sa.event.remove(one.engine, "after_cursor_execute", after_execute)
            # a statement run inside a transaction leaves the connection INTRANS until it ends
            assert seen == [("SELECT", "IDLE"), ("SELECT", "IDLE")]
            with one.engine.connect() as conn:
                assert conn.connection.driver_connection.autocommit is False
        finally:
            one.close()

    def test_a_follow_whose_connection_dies_says_the_ledger_cannot_be_read(self, ledger_url: str,
                                                                          postgres_admin: sa.Engine) -> None:
        """The server ends the follower's connection (a restart, an administrator): the read
        fails as a StoreFailure naming the ledger, not as the driver's complaint about a
        connection it could not put back out of autocommit, and the next read reconnects."""
        one = _one_connection(ledger_url)
        try:
            one.append("r", [run_started()], 0)
            with one.engine.connect() as conn:
                backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            with postgres_admin.begin() as conn:
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
            with pytest.raises(StoreFailure, match="cannot read the ledger at one connection"):
                one.follow(0)
            assert [e.version for e in one.follow(0)] == [0]
        finally:
            one.close()

    def test_an_append_gives_its_connection_back_as_the_pool_lent_it(self, ledger_url: str) -> None:
        """An append sends its own BEGIN (with its first reads, store.read_head), the driver in
        autocommit meanwhile. Whatever the append's outcome, the connection goes back to the
        pool out of autocommit, so a later transaction through it is still one transaction."""
        one = _one_connection(ledger_url)
        try:
            with one.engine.begin() as conn:
                conn.exec_driver_sql("INSERT INTO run_leases VALUES ('r', 1, 'test', 1e12)")
            one.fence("r", 1)
            first = step(0)

            def lent_in_autocommit() -> bool:
                with one.engine.connect() as conn:
                    return conn.connection.driver_connection.autocommit

            one.append("r", [first], 0)
            assert not lent_in_autocommit()
            assert [e.event_id for e in one.append("r", [first], 0)] == [first.event_id]  # already stored
            assert not lent_in_autocommit()
            with pytest.raises(ConcurrencyError):
                one.append("r", [step(1)], 0)
            assert not lent_in_autocommit()
            one.fence("r", 2)
            with pytest.raises(LeaseLost):
                one.append("r", [step(1)], 1)
            assert not lent_in_autocommit()
            with pytest.raises(ZeroDivisionError), one.engine.begin() as conn:
                conn.exec_driver_sql("INSERT INTO checkpoints (name, position) VALUES ('half', 1)")
                1 / 0
            assert one.get_checkpoint("half") == FollowCursor(), "a transaction was committed in parts"
        finally:
            one.close()
