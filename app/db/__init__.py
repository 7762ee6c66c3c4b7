"""SQL state: the tables (:mod:`app.db.models`) and the repository (:mod:`app.db.repository`)."""
