"""suppressions and bounces: one list of addresses not sent to, for every channel

- `suppressions`: (channel, folded address, scope) unique, with its reason, the
  notification it came from and an optional expiry.
- `inbound_reports`: what the inbound SMTP listener received (bounces, complaints).
- `notifications.category` and `notifications.unsubscribe` (the scope its one-click
  link offers); `templates.unsubscribe` (a transactional template that offers one).
- `recipients.unreachable` becomes suppressions: a blocked Telegram bot is
  `telegram_blocked`, an SMS stop-list refusal `sms_stoplist` (only those two channels
  ever set it); the column goes.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 14:30:00
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# The reason each channel's old mark becomes, and the recipient column of its address.
OLD_MARKS = {"telegram": ("telegram_blocked", "telegram_chat_id"), "sms": ("sms_stoplist", "phone")}


def upgrade() -> None:
    suppressions = op.create_table(
        "suppressions",
        sa.Column("id", BIG_ID, primary_key=True),
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("scope", sa.String(80), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("notification_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_suppressions")),
        sa.UniqueConstraint(
            "channel", "address", "scope", name=op.f("uq_suppressions_channel_address_scope")
        ),
        sa.ForeignKeyConstraint(
            ["notification_id"],
            ["notifications.id"],
            name=op.f("fk_suppressions_notification_id_notifications"),
            ondelete="SET NULL",
        ),
    )
    op.create_table(
        "inbound_reports",
        sa.Column("id", BIG_ID, primary_key=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("mail_from", sa.String(320), nullable=False),
        sa.Column("rcpt_to", sa.String(320), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("notification_id", sa.BigInteger(), nullable=True),
        sa.Column("code", sa.String(32), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("raw", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbound_reports")),
        sa.ForeignKeyConstraint(
            ["notification_id"],
            ["notifications.id"],
            name=op.f("fk_inbound_reports_notification_id_notifications"),
            ondelete="SET NULL",
        ),
    )
    op.create_index(op.f("ix_inbound_reports_received_at"), "inbound_reports", ["received_at"])
    op.create_index("ix_inbound_reports_status_id", "inbound_reports", ["status", "id"])
    with op.batch_alter_table("notifications") as batch:
        batch.add_column(
            sa.Column("category", sa.String(32), nullable=False, server_default="transactional")
        )
        batch.add_column(sa.Column("unsubscribe", sa.String(80), nullable=True))
    with op.batch_alter_table("templates") as batch:
        batch.add_column(
            sa.Column("unsubscribe", sa.Boolean(), nullable=False, server_default=sa.false())
        )

    recipients = sa.table(
        "recipients",
        sa.column("id", sa.BigInteger()),
        sa.column("phone", sa.String()),
        sa.column("telegram_chat_id", sa.String()),
        sa.column("unreachable", sa.JSON()),
    )
    connection = op.get_bind()
    now = datetime.now(UTC)
    rows = []
    seen = set()
    marked = connection.execute(
        sa.select(recipients).where(recipients.c.unreachable.is_not(None))
    ).all()
    for recipient in marked:
        for channel, error in (recipient.unreachable or {}).items():
            if channel not in OLD_MARKS:
                continue
            reason, column = OLD_MARKS[channel]
            address = getattr(recipient, column)
            if address is None or (channel, address) in seen:
                continue
            seen.add((channel, address))
            rows.append(
                {
                    "channel": channel,
                    "address": address,
                    "scope": "all",
                    "reason": reason,
                    "detail": error,
                    "created_at": now,
                }
            )
    if rows:
        op.bulk_insert(suppressions, rows)
    with op.batch_alter_table("recipients") as batch:
        batch.drop_column("unreachable")


def downgrade() -> None:
    with op.batch_alter_table("recipients") as batch:
        batch.add_column(sa.Column("unreachable", sa.JSON(), nullable=True))
    # The marks are not rebuilt: the next refusal of a blocked address marks it again.
    with op.batch_alter_table("templates") as batch:
        batch.drop_column("unsubscribe")
    with op.batch_alter_table("notifications") as batch:
        batch.drop_column("unsubscribe")
        batch.drop_column("category")
    op.drop_table("inbound_reports")
    op.drop_table("suppressions")
