"""Schema migrations with Alembic: stamp a new database at the newest revision, upgrade an old one in place.

bbpt drives Alembic through its API with a connection it opened, so there is no alembic.ini and no second
way to reach a database. A database from before migrations has no alembic_version table; its schema_version
(1) says it is at the baseline revision, which is stamped before upgrading.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.engine import Connection

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"


def alembic_config(connection: Connection | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def _script():
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def stamp_head(connection: Connection) -> None:
    """Mark a database just created from the models as being at the newest revision (in the caller's
    transaction, so a database is never left with tables but no revision)."""
    from alembic.migration import MigrationContext

    MigrationContext.configure(connection).stamp(_script(), "head")


def current(connection: Connection) -> str | None:
    from alembic.migration import MigrationContext

    rev = MigrationContext.configure(connection).get_current_revision()
    if rev is None and inspect(connection).has_table("studies"):
        return BASELINE     # written before bbpt had migrations
    return rev


def upgrade(engine) -> tuple[str | None, str]:
    """Bring a database to the newest revision; returns (revision before, revision after)."""
    from alembic import command

    with engine.begin() as conn:
        before = current(conn)
        cfg = alembic_config(conn)
        if before == BASELINE and not inspect(conn).has_table("alembic_version"):
            command.stamp(cfg, BASELINE)
        command.upgrade(cfg, "head")
        after = current(conn)
    return before, after
