"""indexes for members' lists and the active-job quota

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 09:00:00
"""
from collections.abc import Sequence

from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A member's list pages through its own objects (org, creator, pk) instead of filtering the organisation's;
# the quota counts an organisation's unfinished jobs without walking its finished ones; a list of files by
# purpose pages through that purpose only.
INDEXES = [
    ("jobs", "ix_jobs_org_owner_pk", ["org_id", "created_by", "pk"]),
    ("jobs", "ix_jobs_org_status", ["org_id", "status"]),
    ("files", "ix_files_org_owner_pk", ["org_id", "created_by", "pk"]),
    ("files", "ix_files_org_purpose_pk", ["org_id", "purpose", "pk"]),
    ("datasets", "ix_datasets_org_owner_pk", ["org_id", "created_by", "pk"]),
]


def upgrade() -> None:
    for table, name, columns in INDEXES:
        op.create_index(name, table, columns, unique=False)


def downgrade() -> None:
    for table, name, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
