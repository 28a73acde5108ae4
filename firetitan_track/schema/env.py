"""Alembic environment for the ledger tables.

firetitan-track passes its own open connection (already inside a transaction that
holds the ledger's upgrade lock) in ``config.attributes["connection"]``. Run as
plain ``alembic``, the URL comes from FIRETITAN_LEDGER or alembic.ini.
"""

from __future__ import annotations

import os

from alembic import context

from firetitan_track.store import metadata, open_engine_for_url

config = context.config


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    engine = open_engine_for_url(_url())
    try:
        with engine.connect() as conn:
            _migrate(conn)
            conn.commit()
    finally:
        engine.dispose()


def _migrate(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, target_metadata=metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    return os.environ.get("FIRETITAN_LEDGER") or config.get_main_option("sqlalchemy.url")


if context.is_offline_mode():
    run_offline()
else:
    run_online()
