#!/usr/bin/env bash
# Create .venv-llama (or $LOWBIT_LLAMA_VENV) with llama-cpp-python for benchmarks/llm_cpu.py.
# PyPI ships it as a source distribution: pip builds llama.cpp with the host's native
# CPU features (AVX2 / AVX-512 / VNNI where present). The build takes several minutes on
# two cores. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="${LOWBIT_LLAMA_VENV:-.venv-llama}"
[ -x "$venv/bin/python" ] || python3.11 -m venv "$venv"
if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "llama.cpp: building llama-cpp-python into $venv (several minutes)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "llama-cpp-python==0.3.36" "numpy==2.4.6"
fi
"$venv/bin/python" -c "import llama_cpp; print('llama.cpp: llama-cpp-python', llama_cpp.__version__)"
