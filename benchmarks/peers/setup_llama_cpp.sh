#!/usr/bin/env bash
# Create .venv-llama (or $LOWBIT_LLAMA_VENV) with llama-cpp-python for benchmarks/llm_cpu.py.
# PyPI ships it as a source distribution: pip builds llama.cpp with the host's native
# CPU features (AVX2 / AVX-512 / VNNI where present). The build takes several minutes on
# two cores. Idempotent.
#
# AMX is left out (-mno-amx-*, the rest stays -march=native): on the benchmark machine (Xeon
# with AMX, Linux 6.18 guest) ggml's AMX matrix multiplication of llama-cpp-python 0.3.36
# stops with SIGILL at a tile instruction (tilezero), while a standalone AMX program runs.
# LOWBIT_LLAMA_AMX=1 builds with AMX. A venv built the other way is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="${LOWBIT_LLAMA_VENV:-.venv-llama}"
amx="${LOWBIT_LLAMA_AMX:-0}"
[ -x "$venv/bin/python" ] || python3.11 -m venv "$venv"
built() {
  "$venv/bin/python" -c "
import sys, llama_cpp
sys.exit(('AMX_INT8 = 1' in llama_cpp.llama_print_system_info().decode()) != ($amx == 1))" 2>/dev/null
}
if ! built; then
  echo "llama.cpp: building llama-cpp-python into $venv (several minutes)"
  flags=""
  [ "$amx" = 1 ] || flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  # No wheel cache: a cached wheel may have been built with other flags.
  CMAKE_ARGS="-DCMAKE_C_FLAGS='$flags' -DCMAKE_CXX_FLAGS='$flags'" "$venv/bin/python" -m pip install -q \
    --disable-pip-version-check --no-cache-dir --force-reinstall "llama-cpp-python==0.3.36" "numpy==2.4.6"
fi
"$venv/bin/python" -c "import llama_cpp; print('llama.cpp: llama-cpp-python', llama_cpp.__version__)"
