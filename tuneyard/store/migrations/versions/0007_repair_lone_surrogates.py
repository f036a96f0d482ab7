"""repair JSON values holding lone UTF-16 surrogates

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 01:00:00
"""
import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Before the API refused them, a "\ud800" escape in a request could be stored in a JSON column (both SQLite and
# PostgreSQL's json type keep the escape), and every read of that row then failed to encode its answer: one
# request made an organisation's job list a 500 for good. Such text is replaced by U+FFFD, the Unicode
# replacement character, so that every row reads back.
COLUMNS = {
    "jobs": ["request", "metadata", "spec", "resolved_hyperparameters", "result_files", "error"],
    "job_events": ["data"],
    "checkpoints": ["metrics"],
    "datasets": ["source", "metadata"],
    "audit_events": ["details"],
}


def _clean(value):
    if isinstance(value, str):
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return value


def upgrade() -> None:
    bind = op.get_bind()
    for table, columns in COLUMNS.items():
        for column in columns:
            # Only rows whose text holds a \uD8xx-\uDFxx escape can hold one; the escape char keeps the
            # backslash literal on both SQLite and PostgreSQL.
            rows = bind.execute(sa.text(
                f"SELECT pk, CAST({column} AS TEXT) FROM {table} "
                f"WHERE lower(CAST({column} AS TEXT)) LIKE :pattern ESCAPE '!'"), {"pattern": "%\\ud%"}).all()
            for pk, text in rows:
                value = json.loads(text)
                cleaned = _clean(value)
                if cleaned != value:
                    bind.execute(sa.text(f"UPDATE {table} SET {column} = :value WHERE pk = :pk"),
                                 {"value": json.dumps(cleaned), "pk": pk})


def downgrade() -> None:
    # What was replaced is gone; nothing to undo.
    pass
