#!/usr/bin/env bash
# The GPU checks, as one script for a machine with a CUDA GPU: the CUDA-marked tests (a bf16 step, an fp16 +
# GradScaler step, DDP over a 1-process NCCL group, pinned-memory loading), then bench.py for ViT-B/16 at batch 128
# and ViT-L/14 at batch 64 in bf16, eager and compiled, and the data pipeline with the node's cores. Writes every
# output to ${OUT:-gpu-out}/ and prints it; the README's speed table comes from bench.txt.
set -uo pipefail
cd "$(dirname "$0")"
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -q tests/test_cuda.py 2>&1 | tee "$out/tests.txt"
{
  for spec in "ViT-B/16 128" "ViT-L/14 64"; do
    set -- $spec
    python bench.py --model "$1" --batch "$2" --amp bf16 --steps 20 --warmup 5
    python bench.py --model "$1" --batch "$2" --amp bf16 --steps 20 --warmup 5 --compile
  done
  python bench.py --pipeline --model ViT-B/16 --workers "$(nproc)"
} 2>&1 | tee "$out/bench.txt"
