"""The conformance suite on SQLite, plus what only a SQLite file can get wrong."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from firetitan_track import Ledger, LedgerError, SchemaOutOfDate
from tests.conformance.base import LedgerConformance, step


class TestSQLiteLedger(LedgerConformance):
    def raw_contents(self, ledger: Ledger) -> bytes:
        path = Path(ledger.engine.url.database)
        # the WAL holds recent commits until a checkpoint copies them into the file
        return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())

    def test_first_use_creates_the_file_and_its_folders_in_wal_mode(self, tmp_path: Path) -> None:
        path = tmp_path / "a" / "b" / "ledger.db"
        with Ledger.open(f"sqlite:///{path}") as ledger:
            ledger.append("r", [step(0)], 0)
        assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)
        with Ledger.open(f"sqlite:///{path}") as ledger:  # reopening keeps what was written
            assert ledger.stream_version("r") == 1

    def test_read_only_open_does_not_create_a_missing_file(self, tmp_path: Path) -> None:
        path = tmp_path / "missing" / "ledger.db"
        with pytest.raises(LedgerError, match="no ledger at"):
            Ledger.open(f"sqlite:///{path}", create=False)
        assert not path.parent.exists()

    def test_an_empty_file_is_brought_to_the_head_schema(self, tmp_path: Path) -> None:
        path = tmp_path / "ledger.db"
        sqlite3.connect(path).close()
        with Ledger.open(f"sqlite:///{path}") as ledger:
            assert ledger.append("r", [step(0)], 0)[0].version == 0

    def test_a_file_at_an_unknown_revision_is_refused_untouched(self, tmp_path: Path) -> None:
        path = tmp_path / "ledger.db"
        with Ledger.open(f"sqlite:///{path}"):
            pass
        with sqlite3.connect(path) as db:
            db.execute("UPDATE alembic_version SET version_num = 'from_the_future'")
        before = path.read_bytes()
        with pytest.raises(SchemaOutOfDate, match="from_the_future"):
            Ledger.open(f"sqlite:///{path}")
        assert path.read_bytes() == before

    def test_in_memory_ledger_works(self) -> None:
        with Ledger.open("sqlite://") as ledger:
            ledger.append("r", [step(0)], 0)
            assert ledger.stream_version("r") == 1
