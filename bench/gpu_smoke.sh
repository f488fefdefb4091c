#!/usr/bin/env bash
# One GPU, under 8 minutes: bench/gpu_smoke.py (random ~1.1B Llama pruned on the GPU, distilled in bf16 with
# the fused loss) then bench/step.py at 8 x 2048 with MFU; both write their sections of bench/RESULTS.md.
#   bash bench/gpu_smoke.sh            (PYTHON=... to pick the interpreter; default .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu_smoke.py "$@"
