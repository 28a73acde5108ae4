"""Signed heads: ed25519 signatures over (run, version, hash) that the ledger vouches for.

A row is one signer's signature over one stream's head (see firetitan_track/signing.py):
``public_key`` names the signer (``ed25519:BASE64``), ``signature`` signs the run, the
version, the hash of the event at that version and ``signed_at``. The private key is never
stored here: whoever can rewrite events in this database could then re-sign them.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "signed_heads",
        sa.Column("run_id", sa.String, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("signed_at", sa.Double, nullable=False),
        sa.Column("public_key", sa.String, nullable=False),
        sa.Column("signature", sa.String, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "version", "public_key", name="pk_signed_heads"),
    )


def downgrade() -> None:
    op.drop_table("signed_heads")
