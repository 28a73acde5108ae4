"""Run leases (one writer per run across machines) and, on PostgreSQL, Optuna's tables.

Sweeps run on Optuna's RDB storage in the ledger's own database. On PostgreSQL its
tables are created here, by ``db upgrade``, so that no sweep worker creates schema;
on SQLite a sweep creates them on first use (runner/search.py), as every SQLite
ledger is itself created on first use.

Optuna's tables are Optuna's (``studies``, ``trials``, ...): they are made from the
metadata of the pinned Optuna release, and Optuna's own schema stamp is its
``version_info`` row (its Alembic stamp would collide with ours in
``alembic_version``, so Optuna is opened with its compatibility check off).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "run_leases",
        sa.Column("run_id", sa.String, primary_key=True),
        sa.Column("token", sa.BigInteger, nullable=False),
        sa.Column("holder", sa.String, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
    )
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        create_optuna_tables(bind)


def create_optuna_tables(bind: sa.Connection) -> None:
    """Optuna's tables and its version row, as its RDB storage would make them."""
    try:
        import optuna
        from optuna.storages._rdb import models
    except ModuleNotFoundError as e:
        from firetitan_track.extras import MissingExtra

        raise MissingExtra("postgres", "a PostgreSQL ledger's schema (it holds the sweeps' Optuna tables)",
                           [e.name or "optuna"]) from None

    models.BaseModel.metadata.create_all(bind)
    version_info = models.VersionInfoModel.__table__
    if bind.execute(sa.select(sa.func.count()).select_from(version_info)).scalar() == 0:
        bind.execute(version_info.insert().values(version_info_id=1, schema_version=models.SCHEMA_VERSION,
                                                  library_version=optuna.__version__))


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        from optuna.storages._rdb import models

        models.BaseModel.metadata.drop_all(bind)
    op.drop_table("run_leases")
