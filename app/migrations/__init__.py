"""Alembic migrations; run them with ``Database(url).upgrade()`` (``ctpd db upgrade``)."""
