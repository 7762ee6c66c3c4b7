# The control plane: the API (`ctpd serve`), the one-shot migration (`ctpd db upgrade`) and the scheduler
# (`ctpd worker --queues default --beat`: the reaper and its clock). No torch, transformers or numpy:
# app/ imports none of them (tests/test_boundaries.py), and run_job's training stack is imported only by
# the GPU worker image. Build context: the repository root.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CTPD_HOME=/data

# curl for the compose health check (GET /readyz).
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /srv/ctpd
COPY docker/requirements-api.txt docker/requirements-api.txt
RUN pip install -r docker/requirements-api.txt

COPY pyproject.toml README.md ./
COPY app app
COPY ctpd_core ctpd_core
COPY ctpd_cli ctpd_cli
COPY worker worker
# --no-deps: the core's own dependencies (torch, transformers, ...) stay out of this image. The check
# fails the build if anything the control plane imports pulls torch in.
RUN pip install --no-deps . \
    && python -c "import sys, app.main, worker.tasks; bad = {'torch', 'numpy'} & set(sys.modules); assert not bad, bad"

RUN useradd --create-home --uid 1000 ctpd && mkdir -p /data && chown ctpd /data
USER ctpd
VOLUME ["/data"]
EXPOSE 8000
CMD ["ctpd", "serve", "--host", "0.0.0.0", "--port", "8000"]
