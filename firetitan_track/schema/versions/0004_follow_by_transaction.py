"""Each event's writing transaction, so that PostgreSQL appends need no commit-order lock.

``events.xid`` holds the id of the transaction that wrote the row: on PostgreSQL
``pg_current_xact_id()`` (xid8, 64 bits, no wraparound) as a bigint, set by the column's
default; on SQLite always 0 (its single writer commits in position order). A follower
reads in (xid, position) order below its snapshot's xmin (store.py says why nothing is
skipped), so ``checkpoints`` keeps a cursor's xid beside its position.

Rows and checkpoints from before this revision read 0: the old rows were appended under
the commit-order lock, so their position order is their commit order, and they sort
before every row written since; a follower's old position ``p`` is the cursor (0, p).
The columns are added with a constant default (no table rewrite on PostgreSQL), and the
default of ``events.xid`` then becomes the writing transaction. Only the index is built
over the existing rows (PostgreSQL).

A follower of an older firetitan-track still running when this applies would follow
positions alone and could miss events committed out of position order: stop followers
(``export mlflow --follow``, live exports) before ``db upgrade``; they refuse to open the
upgraded ledger until they are upgraded too.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("events", sa.Column("xid", sa.BigInteger, nullable=False, server_default=sa.text("0")))
    op.add_column("checkpoints", sa.Column("xid", sa.BigInteger, nullable=False, server_default=sa.text("0")))
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("events", "xid", server_default=sa.text("(pg_current_xact_id())::text::bigint"))
        op.create_index("ix_events_xid_position", "events", ["xid", "position"])


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_events_xid_position", "events")
    op.drop_column("checkpoints", "xid")
    op.drop_column("events", "xid")
