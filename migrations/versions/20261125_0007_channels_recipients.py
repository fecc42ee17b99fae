"""channels and recipients: SMS and Telegram beside e-mail, a channel order per notification

- `recipients`: the callers' people (by their own `external_id`) with an address per
  channel, their own channel order, and the channels that refused them for good.
- `notifications`: the order to try (`route`, when more than one channel), where it is
  (`route_position`, `channel_attempts`), what was left out (`skipped`), its recipient,
  and Telegram's `parse_mode`; an index for history by channel.
- `delivery_attempts`: each attempt's `channel`; `smtp_code` becomes the provider's
  `code`; the provider's message id, SMS parts and cost.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "recipients",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("external_id", sa.String(128), nullable=False),
        sa.Column("email", sa.String(320), nullable=True),
        sa.Column("phone", sa.String(16), nullable=True),
        sa.Column("telegram_chat_id", sa.String(64), nullable=True),
        sa.Column("locale", sa.String(35), nullable=True),
        sa.Column("channels", sa.JSON(), nullable=True),
        sa.Column("unreachable", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recipients")),
        sa.UniqueConstraint("external_id", name=op.f("uq_recipients_external_id")),
    )
    with op.batch_alter_table("notifications") as batch:
        batch.add_column(sa.Column("route", sa.JSON(), nullable=True))
        batch.add_column(
            sa.Column("route_position", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch.add_column(
            sa.Column("channel_attempts", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch.add_column(sa.Column("skipped", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("recipient_id", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("parse_mode", sa.String(16), nullable=True))
        batch.create_foreign_key(
            op.f("fk_notifications_recipient_id_recipients"),
            "recipients",
            ["recipient_id"],
            ["id"],
            ondelete="SET NULL",
        )
        batch.create_index(
            "ix_notifications_channel_created_at_id", ["channel", "created_at", "id"]
        )
    # Every notification so far is an e-mail: its attempts so far are on its one channel.
    # Only unfinished ones count on (a resend starts the count again): a million finished
    # rows are not rewritten.
    op.execute(
        "UPDATE notifications SET channel_attempts = attempts"
        " WHERE attempts > 0 AND status IN ('queued', 'sending')"
    )
    with op.batch_alter_table("delivery_attempts") as batch:
        batch.add_column(
            sa.Column("channel", sa.String(32), server_default="email", nullable=False)
        )
        batch.alter_column("smtp_code", new_column_name="code", existing_type=sa.Integer())
        batch.add_column(sa.Column("provider_message_id", sa.String(255), nullable=True))
        batch.add_column(sa.Column("segments", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("cost", sa.Numeric(12, 4), nullable=True))


def downgrade() -> None:
    # Only e-mail can go back: the older schema has no other channel.
    op.execute("DELETE FROM notifications WHERE channel <> 'email'")
    with op.batch_alter_table("delivery_attempts") as batch:
        batch.drop_column("cost")
        batch.drop_column("segments")
        batch.drop_column("provider_message_id")
        batch.alter_column("code", new_column_name="smtp_code", existing_type=sa.Integer())
        batch.drop_column("channel")
    with op.batch_alter_table("notifications") as batch:
        batch.drop_index("ix_notifications_channel_created_at_id")
        batch.drop_constraint(op.f("fk_notifications_recipient_id_recipients"), type_="foreignkey")
        batch.drop_column("parse_mode")
        batch.drop_column("recipient_id")
        batch.drop_column("skipped")
        batch.drop_column("channel_attempts")
        batch.drop_column("route_position")
        batch.drop_column("route")
    op.drop_table("recipients")
