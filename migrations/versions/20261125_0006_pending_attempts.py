"""pending attempts: a worker writes its batch's attempts before sending them

A claimed batch's attempts are stored as `pending` (no `finished_at` yet) in the claim's
transaction, and filled in with their outcomes when the batch is settled.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("delivery_attempts") as batch:
        batch.alter_column("finished_at", existing_type=sa.DateTime(timezone=True), nullable=True)


def downgrade() -> None:
    op.execute(
        "UPDATE delivery_attempts SET finished_at = started_at, outcome = 'abandoned' "
        "WHERE finished_at IS NULL"
    )
    with op.batch_alter_table("delivery_attempts") as batch:
        batch.alter_column("finished_at", existing_type=sa.DateTime(timezone=True), nullable=False)
