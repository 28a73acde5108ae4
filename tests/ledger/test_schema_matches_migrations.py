"""The tables store.py declares are the tables the migrations create.

The ledger reads and writes through store.py's Table objects, while a database is made by
the Alembic scripts (firetitan_track/schema/versions); the two declare each table apart.
Each test makes one database with ``upgrade_schema`` and one with ``metadata.create_all``
and compares what the database itself reports of every table store.py declares: columns
with their types, nullability and defaults, primary and unique keys, indexes, foreign keys
(on SQLite also the stored CREATE statements, which carry AUTOINCREMENT). A column, type,
key or index changed on one side only fails here.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import sqlalchemy as sa

from firetitan_track.store import metadata, upgrade_schema
from tests.helpers import POSTGRES_URL, needs_postgres


def shape(url: str, tables: sa.MetaData = metadata) -> dict[str, Any]:
    """What the database at ``url`` reports of each table ``tables`` declares."""
    engine = sa.create_engine(url)
    try:
        inspector = sa.inspect(engine)
        missing = sorted(set(tables.tables) - set(inspector.get_table_names()))
        assert not missing, f"no table {missing} in the database at {url}"
        found: dict[str, Any] = {}
        for name in sorted(tables.tables):
            found[name] = {
                "columns": [{k: str(v) for k, v in sorted(c.items())} for c in inspector.get_columns(name)],
                "primary key": inspector.get_pk_constraint(name),
                "unique": sorted(str(sorted(u.items())) for u in inspector.get_unique_constraints(name)),
                "indexes": sorted(str(sorted(i.items())) for i in inspector.get_indexes(name)),
                "foreign keys": sorted(str(sorted(f.items())) for f in inspector.get_foreign_keys(name)),
            }
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                rows = conn.exec_driver_sql("SELECT type, name, tbl_name, sql FROM sqlite_master").all()
            found["sqlite_master"] = sorted((kind, name, table, " ".join((sql or "").split()))
                                            for kind, name, table, sql in rows if table in tables.tables)
        return found
    finally:
        engine.dispose()


def declared(url: str, tables: sa.MetaData = metadata) -> str:
    engine = sa.create_engine(url)
    try:
        tables.create_all(engine)
    finally:
        engine.dispose()
    return url


def test_the_sqlite_tables_store_py_declares_are_those_the_migrations_create(tmp_path: Path) -> None:
    migrated = f"sqlite:///{tmp_path / 'migrated.db'}"
    upgrade_schema(migrated)
    assert shape(migrated) == shape(declared(f"sqlite:///{tmp_path / 'declared.db'}"))


def test_a_table_declared_differently_is_told_apart(tmp_path: Path) -> None:
    """The comparison above would see a change: events.hash one character shorter in the
    declaration than in the migration."""
    changed = sa.MetaData()
    for table in metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["events"].c.hash.type = sa.String(63)
    migrated = f"sqlite:///{tmp_path / 'migrated.db'}"
    upgrade_schema(migrated)
    ours, theirs = shape(migrated), shape(declared(f"sqlite:///{tmp_path / 'declared.db'}", changed), changed)
    assert ours["events"] != theirs["events"]
    assert ours["blobs"] == theirs["blobs"]


@pytest.fixture
def schema_urls(postgres_admin: Any) -> Iterator[Callable[[], str]]:
    """Make PostgreSQL URLs whose search_path is a new, empty schema each; all dropped afterwards."""
    made: list[str] = []

    def make() -> str:
        schema = f"ft_test_{uuid.uuid4().hex[:12]}"
        with postgres_admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
        made.append(schema)
        sep = "&" if "?" in (POSTGRES_URL or "") else "?"
        return f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"

    yield make
    with postgres_admin.begin() as conn:
        for schema in made:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")


@needs_postgres
def test_the_postgres_tables_store_py_declares_are_those_the_migrations_create(
        schema_urls: Callable[[], str]) -> None:
    migrated = schema_urls()
    upgrade_schema(migrated)
    assert shape(migrated) == shape(declared(schema_urls()))
