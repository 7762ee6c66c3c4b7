"""SQL state: the tables (:mod:`app.db.models`) on one :class:`~app.db.engine.Database`, and the code that
writes them, one module per table family: :mod:`app.db.jobs` (status changes: create, cancel, claim, lease,
finish, hand-back, reap), :mod:`app.db.events` (events, metric points, progress, and the attempt fence),
:mod:`app.db.datasets` and :mod:`app.db.auth` (API keys)."""
