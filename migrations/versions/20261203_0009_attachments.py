"""attachments: files attached to e-mail, their bytes stored once per SHA-256

- `attachment_blobs`: the bytes, by SHA-256.
- `attachments`: an upload's file name, content type and size, and its bytes by hash.
- `notification_attachments`: which notification refers to which attachment (an
  attachment nothing refers to expires).
- `notifications.attachments`: what a notification carries, in order.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "attachment_blobs",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_attachment_blobs")),
    )
    op.create_table(
        "attachments",
        sa.Column("id", BIG_ID, primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("content_type", sa.String(127), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_attachments")),
        sa.ForeignKeyConstraint(
            ["sha256"],
            ["attachment_blobs.sha256"],
            name=op.f("fk_attachments_sha256_attachment_blobs"),
        ),
    )
    op.create_index(op.f("ix_attachments_sha256"), "attachments", ["sha256"])
    op.create_index(op.f("ix_attachments_created_at"), "attachments", ["created_at"])
    op.create_table(
        "notification_attachments",
        sa.Column("notification_id", sa.BigInteger(), nullable=False),
        sa.Column("attachment_id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "notification_id", "attachment_id", name=op.f("pk_notification_attachments")
        ),
        sa.ForeignKeyConstraint(
            ["notification_id"],
            ["notifications.id"],
            name=op.f("fk_notification_attachments_notification_id_notifications"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["attachment_id"],
            ["attachments.id"],
            name=op.f("fk_notification_attachments_attachment_id_attachments"),
        ),
    )
    op.create_index(
        op.f("ix_notification_attachments_attachment_id"),
        "notification_attachments",
        ["attachment_id"],
    )
    with op.batch_alter_table("notifications") as batch:
        batch.add_column(sa.Column("attachments", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("notifications") as batch:
        batch.drop_column("attachments")
    op.drop_table("notification_attachments")
    op.drop_table("attachments")
    op.drop_table("attachment_blobs")
