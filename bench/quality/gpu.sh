#!/usr/bin/env bash
# The quality benchmark at GPU scale: one GPU, bf16 autocast, every training pair, 256 held-out prompts with
# 8 samples of up to 48 tokens, three seeds. Sized to finish in under 10 minutes on one H100/H200-class GPU
# (an estimate: it has not yet run on a GPU, none was lent to the session that wrote it).
# Usage: bench/quality/gpu.sh [--device cuda:N] [--publish]   (results in $CTPD_HOME/bench/quality/gpu)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/python ] || scripts/setup
.venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: use python -m bench.quality (CPU)")'
exec .venv/bin/python -m bench.quality --scale gpu "$@"
