"""keyed evidence of erased texts; rate limits move out of the database

Sensitive texts kept an unsalted SHA-256 after erasure, which gives a short code back to
anyone who can read the table; it is dropped, and an HMAC under SECRET_KEY takes its
place from now on. Idempotency fingerprints of sensitive requests are made unmatchable
for the same reason: a repeat of such a request with its old key is a 422, never a
second send. The fixed-window `rate_counters` give way to moving windows kept in the
rate-limit storage (RATE_LIMIT_STORAGE).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Not 64 hex digits, so it never equals a fingerprint.
UNMATCHABLE = "erased"


def upgrade() -> None:
    with op.batch_alter_table("notifications") as batch:
        batch.add_column(sa.Column("text_hmac", sa.String(length=64), nullable=True))
    # Texts erased before: still marked erased (never resent as an empty mail), no hash kept.
    op.execute(
        sa.text(
            "UPDATE notifications SET text_hmac = :erased WHERE text_sha256 IS NOT NULL"
        ).bindparams(erased=UNMATCHABLE)
    )
    with op.batch_alter_table("notifications") as batch:
        batch.drop_column("text_sha256")
    op.execute(
        sa.text(
            "UPDATE idempotency_keys SET fingerprint = :unmatchable WHERE notification_id IN"
            " (SELECT id FROM notifications WHERE sensitive)"
            " OR batch_id IN (SELECT batch_id FROM notifications WHERE sensitive)"
        ).bindparams(unmatchable=UNMATCHABLE)
    )
    op.drop_table("rate_counters")


def downgrade() -> None:
    op.create_table(
        "rate_counters",
        sa.Column("subject", sa.String(length=400), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("hits", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("subject", "window_start", name=op.f("pk_rate_counters")),
    )
    with op.batch_alter_table("notifications") as batch:
        batch.add_column(sa.Column("text_sha256", sa.String(length=64), nullable=True))
        batch.drop_column("text_hmac")
