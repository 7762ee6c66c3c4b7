"""app: the control plane (FastAPI + SQL). Imports no torch; only ctpd_core.spec from the core."""
