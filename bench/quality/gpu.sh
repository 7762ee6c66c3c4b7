#!/usr/bin/env bash
# The quality benchmark at GPU scale: one GPU, bf16 autocast.
#   bench/quality/gpu.sh [--device cuda:N] [--publish]             the method table: every training pair, 256
#       held-out prompts with 8 samples of up to 48 tokens, three seeds (python -m bench.quality --scale gpu)
#   bench/quality/gpu.sh frontier [--seeds N ...] [--publish]      the reward-against-KL sweep: all 28 grid points
#       of one seed per run (the next seed not yet stored; seeds accumulate), each student measured on Botchan
#       and the Jargon File (python -m bench.quality.frontier --scale gpu; sizing in bench/quality/config.py)
# Each is sized to finish in under 10 minutes on one H100/H200-class GPU (an estimate: neither has run on a GPU
# yet, none was lent to the sessions that wrote them). Results in $CTPD_HOME/bench/quality/{gpu,frontier-gpu};
# the frontier's measurements in bench/quality/measurements/gpu/ (commit them).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/python ] || scripts/setup
.venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: use python -m bench.quality (CPU)")'
if [ "${1:-}" = "frontier" ]; then
  shift
  exec .venv/bin/python -m bench.quality.frontier --scale gpu "$@"
fi
exec .venv/bin/python -m bench.quality --scale gpu "$@"
