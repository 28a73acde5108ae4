"""Opening a ledger by URL: bad input gives a clear error and writes nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from firetitan_track import Ledger, LedgerError
from firetitan_track.store import HEAD_REVISION, SCHEMA_DIR, metadata


@pytest.mark.parametrize("url", ["mysql://user@host/db", "ftp://example.com/x", "not a url at all"])
def test_unknown_url_scheme_is_refused(url: str) -> None:
    with pytest.raises(LedgerError, match="sqlite:///PATH"):
        Ledger.open(url)


def test_unreachable_postgres_names_the_url_without_its_password() -> None:
    started = time.monotonic()
    with pytest.raises(LedgerError) as info:
        Ledger.open("postgresql://alice:hunter2@127.0.0.1:1/ledger")
    message = str(info.value)
    assert "cannot reach" in message and "127.0.0.1:1/ledger" in message
    assert "hunter2" not in message
    assert time.monotonic() - started < 10


def test_unwritable_path_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(LedgerError, match="cannot create the ledger at"):
        Ledger.open(f"sqlite:///{blocker}/sub/ledger.db")
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(LedgerError, match="cannot write"):
        Ledger.open(f"sqlite:///{folder}/ledger.db")
    assert list(folder.iterdir()) == []


def test_head_revision_matches_the_alembic_scripts() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(SCHEMA_DIR))
    assert ScriptDirectory.from_config(cfg).get_heads() == [HEAD_REVISION]


def test_tables_in_code_match_the_migrated_schema(ledger: Ledger) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with ledger.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    with ledger.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == HEAD_REVISION
