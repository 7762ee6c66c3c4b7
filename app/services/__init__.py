"""The control plane's use cases (submit a job, cancel it, manage API keys): what the API routes and the CLI
call. They take a :class:`~app.db.engine.Database`, the caller and plain values, and raise domain errors
that the routes map to HTTP; they import nothing of FastAPI."""
