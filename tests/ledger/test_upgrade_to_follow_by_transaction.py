"""A ledger written before revision 0004 (positions alone, in commit order) keeps its followers:
its rows and a follower's stored position read as cursors at transaction 0, so a follower
resumes exactly where it stopped and then reads what is written after the upgrade."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import sqlalchemy as sa
from alembic import command

from firetitan_track import Ledger, new_event
from firetitan_track.bundle import StreamStore
from firetitan_track.ledger import FollowCursor
from firetitan_track.store import _alembic_config, open_engine_for_url, upgrade_schema
from tests.helpers import needs_postgres


def step(n: int):  # noqa: ANN201
    return new_event("StepCompleted", step=n, data_cursor=n, micro_batches=1, metrics={"loss": 1.0}, optimizer={})


def table_0003(name: str, *columns: str) -> sa.TableClause:
    """A table as revision 0003 made it (store.py's tables are the head's)."""
    return sa.table(name, *(sa.column(c) for c in columns))


def at_revision_0003(url: str) -> None:
    engine = open_engine_for_url(url)
    try:
        with engine.begin() as conn:
            cfg = _alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0003")
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=needs_postgres)])
def old_ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        yield request.getfixturevalue("empty_schema_url")


def test_a_follower_resumes_from_a_position_kept_before_the_upgrade(old_ledger_url: str, tmp_path: Path) -> None:
    url = old_ledger_url
    with Ledger.open(f"sqlite:///{tmp_path / 'scratch.db'}") as scratch:
        scratch.append("old", [step(0), step(1), step(2)], 0)
        rows = StreamStore(scratch).rows("old")
    at_revision_0003(url)
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # what a 0003 ledger holds: three events and a follower past the second
        conn.execute(table_0003("events", *rows[0]).insert(), rows)
        positions = [p for (p,) in conn.exec_driver_sql("SELECT position FROM events ORDER BY version")]
        conn.execute(table_0003("checkpoints", "name", "position").insert(),
                     {"name": "mlflow", "position": positions[1]})
        relfile = (conn.exec_driver_sql("SELECT pg_relation_filenode('events')").scalar()
                   if engine.dialect.name == "postgresql" else None)
    assert upgrade_schema(url) == ("0003", "0004")
    with engine.connect() as conn:
        assert [x for (x,) in conn.exec_driver_sql("SELECT xid FROM events")] == [0, 0, 0]
        if relfile is not None:  # the column came without rewriting the table
            assert conn.exec_driver_sql("SELECT pg_relation_filenode('events')").scalar() == relfile
    engine.dispose()

    with Ledger.open(url) as ledger:
        kept = ledger.get_checkpoint("mlflow")
        assert kept == FollowCursor(0, positions[1])
        ledger.append("old", [step(3)], 3)
        ledger.append("new", [step(0)], 0)
        assert ledger.settle()
        followed = ledger.follow(kept)
        assert [(e.run_id, e.version) for e in followed] == [("old", 2), ("old", 3), ("new", 0)]
        assert ledger.follow(followed.cursor) == []
        assert ledger.verify() == []
