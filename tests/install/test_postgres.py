"""firetitan-track[postgres] from the wheel, in a fresh environment, migrates a fresh PostgreSQL
database with the scripts it ships."""

from __future__ import annotations

from pathlib import Path

from firetitan_track.store import HEAD_REVISION
from tests.helpers import needs_postgres
from tests.install.conftest import outside

pytestmark = needs_postgres


def test_db_upgrade_migrates_a_fresh_postgres_database(postgres_bin: Path, empty_schema_url: str,
                                                       postgres_admin, tmp_path: Path) -> None:
    def ft(*args: str) -> str:
        done = outside(postgres_bin, "firetitan-track", "--ledger", empty_schema_url, *args, cwd=tmp_path)
        assert done.returncode == 0, f"firetitan-track {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done.stdout.strip()

    assert ft("db", "current").startswith("(empty)")
    assert ft("db", "upgrade") == f"upgraded from (empty) to {HEAD_REVISION}"
    assert ft("db", "current") == f"{HEAD_REVISION} (head)"
    assert ft("runs") == "no runs"
    schema = empty_schema_url.rpartition("search_path%3D")[2]
    with postgres_admin.connect() as conn:
        tables = {r[0] for r in conn.exec_driver_sql(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %(s)s", {"s": schema})}
    assert {"alembic_version", "events", "blobs"} <= tables
