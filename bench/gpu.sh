#!/usr/bin/env bash
# The GPU checks, for a machine that has GPUs (the dev and CI machines have none). Each line prints its figures;
# a line that cannot run here says why and the next one runs. Sized for a few minutes on one H100/H200-class GPU
# (an estimate: written in a session without a GPU).
#
#   bench/gpu.sh                       # every line, on the GPUs CUDA_VISIBLE_DEVICES shows
#   bench/gpu.sh plan job multi        # only some: plan (memory plan vs measured), job (a short real job), multi
#
# 1. plan  — bench/memory_plan_check.py: the memory planner's per-GPU estimates against measured peaks of one
#            training step and one frozen pass (model shapes from its table, random weights: nothing downloaded).
# 2. job   — a short real CTPD job on the packaged models (Gemma-3-270M -> SmolLM2-135M-Instruct) with
#            `ctpd run --device cuda`: the whole pipeline on one GPU, bf16 autocast, its stage wall times.
# 3. multi — with 2 or more GPUs: bench/distributed_equivalence.py --device cuda, single process against 2 ranks
#            (torchrun, NCCL) with DDP, FSDP2 and FSDP2 + activation checkpointing: per-step loss, max |diff|,
#            final weights' max |diff|, wall times. With 1 GPU it is skipped, and says so.
# bench/logprobs_memory.py is not here: it measures CPU RSS (the chunked log-probs' saving is the same on a GPU,
# and the plan line measures GPU memory with those chunks in place).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || scripts/setup
LINES=("$@")
[ ${#LINES[@]} -gt 0 ] || LINES=(plan job multi)
export TOKENIZERS_PARALLELISM=false

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "bench/gpu.sh: no nvidia-smi on this machine: no GPU to check (the CPU benchmarks are in DEVELOPERS.md)"
  exit 0
fi
echo "== GPUs (nvidia-smi)"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
# What torch sees honours CUDA_VISIBLE_DEVICES; that is what the worker would own.
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
echo "torch sees ${GPUS} GPU(s) (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}); torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
if [ "$GPUS" -lt 1 ]; then
  echo "bench/gpu.sh: torch sees no CUDA device (a CPU build of torch, or no driver); nothing to run"
  exit 1
fi

status=0
run_line() {  # name, then the command; a failing line is reported and the next one runs
  local name=$1; shift
  echo
  echo "== ${name}"
  local started=$SECONDS
  if "$@"; then
    echo "-- ${name}: done in $((SECONDS - started)) s"
  else
    echo "-- ${name}: FAILED (exit $?) after $((SECONDS - started)) s"
    status=1
  fi
}

short_job() {
  local artifacts
  artifacts=$(mktemp -d)
  # The quickstart example cut to a handful of steps: every stage runs (prepare, reference, π± by DPO, weights,
  # distill, evaluate, export) on cuda:0.
  # CTPD_HOME stays the user's: its catalog cache holds the converted packaged models (a first use converts them).
  "$(dirname "$PY")/ctpd" run examples/quickstart.yaml --device cuda \
    --artifacts "$artifacts" --set contrastive.max_steps=2 --set training.max_steps=4 \
    --set dataset.max_pairs=32 --set evaluation.max_pairs=16
  local rc=$?
  rm -rf "$artifacts"
  return $rc
}

for line in "${LINES[@]}"; do
  case "$line" in
    plan) run_line "plan: memory plan vs measured (bench/memory_plan_check.py)" "$PY" bench/memory_plan_check.py --device cuda ;;
    job) run_line "job: a short real job on the packaged models (ctpd run --device cuda)" short_job ;;
    multi)
      if [ "$GPUS" -ge 2 ]; then
        run_line "multi: 2 ranks on 2 GPUs vs one process (bench/distributed_equivalence.py, NCCL)" \
          "$PY" bench/distributed_equivalence.py --device cuda --precision fp32
      else
        echo
        echo "== multi: skipped: torch sees ${GPUS} GPU; the multi-GPU line needs 2 (torchrun over 2 ranks with NCCL)."
        echo "   The same comparison runs on CPU with gloo: $PY bench/distributed_equivalence.py"
      fi ;;
    *) echo "bench/gpu.sh: unknown line '$line' (plan, job, multi)"; status=2 ;;
  esac
done
exit $status
