"""worker: the data plane (Celery workers running the CTPD training core)."""
