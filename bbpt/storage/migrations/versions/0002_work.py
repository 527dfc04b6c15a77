"""Schema 2: the work table, where workers claim studies and hold leases on them.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if not sa.inspect(op.get_bind()).has_table("request_cache"):   # a schema-1 database from before it existed
        op.create_table(
            "request_cache", sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id", ondelete="CASCADE"), nullable=False,
                      index=True),
            sa.Column("key", sa.String(64), nullable=False), sa.Column("answer", sa.JSON, nullable=False),
            sa.Column("created", sa.DateTime(timezone=True), nullable=False), sa.UniqueConstraint("study_id", "key"))
    op.create_table(
        "work", sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.String(200), unique=True, nullable=False),
        sa.Column("spec_name", sa.String(200), nullable=False), sa.Column("spec_path", sa.String(1000), nullable=False),
        sa.Column("spec_text", sa.Text, nullable=False), sa.Column("config", sa.JSON, nullable=True),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("worker", sa.String(200), nullable=True), sa.Column("lease_until", sa.Float, nullable=False),
        sa.Column("claimed_at", sa.Float, nullable=True), sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("runs", sa.Integer, nullable=False), sa.Column("created", sa.DateTime(timezone=True), nullable=False))
    op.execute("INSERT INTO schema_version (version) VALUES (2)")


def downgrade() -> None:
    op.drop_table("work")
    op.execute("DELETE FROM schema_version WHERE version = 2")
