"""Alembic migrations of bbpt's schema; run through :func:`bbpt.storage.migrate.upgrade` (``bbpt storage
upgrade``), never by the ``alembic`` command, so no alembic.ini is needed."""
