#!/usr/bin/env bash
# CUDA check, for a Linux machine with an NVIDIA GPU (driver 580 or newer: CUDA 13):
#   1. installs tapml into .venv with scripts/setup.sh; its dependencies bring NVRTC, the
#      CCCL headers and libcudart 13 from pip (no CUDA toolkit, no nvcc);
#   2. compiles SmolLM2-135M for llvm and cuda, q4f32_1 and q4f16_1, and Qwen2.5-Coder-0.5B and
#      Gemma-3-270M as their GGUFs store them (cached in ~/.cache/tapml);
#   3. runs both on the same tokens and compares (bench/check_parity.py): the first 16 greedy
#      tokens identical, every step's max relative logit error within 1e-3 (q4f32_1) or
#      2e-2 (q4f16_1);
#   4. carves the chat scenario on cuda (tapml carve --source cuda) and replays that suite on
#      cuda (bit-exact) and on llvm (within tolerances).
# Exits non-zero if any check fails. TAPML_SKIP_SETUP=1 uses .venv as it is (no network).
#   bench/cuda_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

step() { printf '\n== %s\n' "$*"; }

step "the GPU (nvidia-smi)"
if ! command -v nvidia-smi >/dev/null; then
    echo "nvidia-smi not found: this script needs a machine with an NVIDIA GPU and its driver" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv

if [[ "${TAPML_SKIP_SETUP:-0}" != 1 ]]; then
    step "installing tapml and its CUDA packages into .venv (scripts/setup.sh)"
    scripts/setup.sh --test  # --test: the Qwen and Gemma weights too
fi
step "CUDA packages in .venv"
.venv/bin/python -m pip list 2>/dev/null | grep -E '^(apache-tvm|cuda-|nvidia-)' || true

step "can TVM's CUDA runtime run here?"
.venv/bin/python - <<'EOF'
from tapml.targets.cuda import available
executes, why = available()
print(why)
raise SystemExit(0 if executes else "cuda cannot execute here: " + why)
EOF

status=0
for quantization in q4f32_1 q4f16_1; do
    step "cuda against llvm, SmolLM2-135M $quantization (compiles both the first time)"
    if ! .venv/bin/python bench/check_parity.py cuda --quantization "$quantization"; then
        status=1
    fi
done

for model in qwen2.5-coder-0.5b gemma3-270m; do
    step "cuda against llvm, $model as its GGUF stores it (gemma3: float32 activations)"
    if ! .venv/bin/python bench/check_parity.py cuda --model "$model" --quantization gguf; then
        status=1
    fi
done

step "carving on cuda, replaying on cuda (bit-exact) and llvm"
suite=$(mktemp -d)/cuda-suite
if ! { .venv/bin/tapml carve smollm2-135m --source cuda --scenario chat -o "$suite" &&
       .venv/bin/tapml test "$suite" --target cuda &&
       .venv/bin/tapml test "$suite" --target llvm; }; then
    status=1
fi

if ((status)); then
    step "FAILED: cuda differs from llvm (see above)"
else
    step "PASSED: cuda matches llvm for q4f32_1 and q4f16_1"
fi
exit "$status"
