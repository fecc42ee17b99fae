"""notifications and delivery attempts

Revision ID: 0001
Revises:
Create Date: 2026-11-24 20:11:01.148810
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "notifications",
        sa.Column("id", BigIntId, nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("recipient", sa.String(length=320), nullable=False),
        sa.Column("subject", sa.String(length=998), nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.String(length=255), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
    )
    op.create_index("ix_notifications_created_at_id", "notifications", ["created_at", "id"])
    op.create_index(
        "ix_notifications_recipient_created_at_id",
        "notifications",
        ["recipient", "created_at", "id"],
    )
    op.create_index(
        "ix_notifications_status_created_at_id", "notifications", ["status", "created_at", "id"]
    )
    op.create_table(
        "delivery_attempts",
        sa.Column("id", BigIntId, nullable=False),
        sa.Column("notification_id", BigIntId, nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("smtp_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["notification_id"],
            ["notifications.id"],
            name=op.f("fk_delivery_attempts_notification_id_notifications"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_attempts")),
        sa.UniqueConstraint(
            "notification_id", "number", name=op.f("uq_delivery_attempts_notification_id_number")
        ),
    )


def downgrade() -> None:
    op.drop_table("delivery_attempts")
    op.drop_index("ix_notifications_status_created_at_id", table_name="notifications")
    op.drop_index("ix_notifications_recipient_created_at_id", table_name="notifications")
    op.drop_index("ix_notifications_created_at_id", table_name="notifications")
    op.drop_table("notifications")
