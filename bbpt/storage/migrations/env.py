"""Alembic's environment: bbpt always hands it an open connection (see bbpt.storage.migrate)."""

from alembic import context

from bbpt.storage.models import Base

connection = context.config.attributes["connection"]
# render_as_batch: SQLite cannot ALTER most things in place; batch mode copies the table instead.
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
