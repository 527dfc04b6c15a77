"""Baseline: schema 1, the tables bbpt wrote before it had migrations.

A database from before migrations is stamped at this revision (it has these tables, though perhaps not
request_cache, which older bbpts added on open; revision 0002 creates it where it is missing).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _timestamps():
    return sa.Column("created", sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table("schema_version", sa.Column("version", sa.Integer, primary_key=True))
    op.create_table(
        "studies", sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.String(200), unique=True, nullable=False),
        sa.Column("config", sa.JSON, nullable=False), sa.Column("state", sa.String(20), nullable=False),
        sa.Column("bbpt_version", sa.String(40), nullable=False), sa.Column("model", sa.String(400), nullable=False),
        sa.Column("summary", sa.JSON, nullable=True), _timestamps(),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False))
    op.create_table(
        "trials", sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("number", sa.Integer, nullable=False), sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("z", sa.LargeBinary, nullable=False), sa.Column("loss", sa.Float, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False), sa.Column("calls", sa.Integer, nullable=False),
        sa.Column("tokens", sa.Integer, nullable=False), sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("backward_seconds", sa.Float, nullable=False), sa.Column("state", sa.String(20), nullable=False),
        _timestamps(), sa.UniqueConstraint("study_id", "number"))
    op.create_table(
        "checkpoints", sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("generation", sa.Integer, nullable=False), sa.Column("optimizer_state", sa.LargeBinary, nullable=False),
        sa.Column("loop_state", sa.JSON, nullable=False), sa.Column("best_trial", sa.Integer, nullable=True),
        _timestamps())
    op.create_table(
        "evaluations", sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("trial_number", sa.Integer, nullable=True), sa.Column("split", sa.String(10), nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False), sa.Column("calls_at", sa.Integer, nullable=False),
        sa.Column("seconds_at", sa.Float, nullable=False), sa.Column("tokens", sa.Integer, nullable=False),
        sa.Column("note", sa.Text, nullable=False))
    op.create_table(
        "request_cache", sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("key", sa.String(64), nullable=False), sa.Column("answer", sa.JSON, nullable=False), _timestamps(),
        sa.UniqueConstraint("study_id", "key"))
    op.execute("INSERT INTO schema_version (version) VALUES (1)")


def downgrade() -> None:
    for table in ("request_cache", "evaluations", "checkpoints", "trials", "studies", "schema_version"):
        op.drop_table(table)
