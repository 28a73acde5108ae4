"""The conformance suite on PostgreSQL (FIRETITAN_TEST_POSTGRES_URL), each test in its own schema."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from firetitan_track import Ledger, SchemaOutOfDate
from firetitan_track.store import upgrade_schema
from tests.conformance.base import LedgerConformance
from tests.helpers import needs_postgres

pytestmark = needs_postgres


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
