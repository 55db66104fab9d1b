#!/usr/bin/env bash
# Prepare the emulated aarch64 runtime root that runs ARM artifacts here under qemu-user:
#   ROOT/            arm64 Debian packages of python3.11 and the C/C++ runtime libraries, unpacked
#   ROOT/site/       aarch64 wheels of apache-tvm, apache-tvm-ffi (the pins of pyproject.toml), numpy,
#                    typing_extensions and cloudpickle (the versions of the venv)
# ROOT is $LOWBIT_ARM_ROOT or .cache/arm-root (ignored by git through .cache/.gitignore).
# Idempotent: a stamp file records what was installed, and a complete root is left alone.
# The arm64 packages are fetched with a private APT state (package lists for arm64 only), so the
# host's dpkg never learns about arm64 and nothing is installed into the host system: installing
# python3.11:arm64 through apt would replace the host's Python.
# Needs: qemu-user and the aarch64 cross g++ (scripts/setup.sh installs them), apt-get, dpkg-deb, pip.
set -euo pipefail
cd "$(dirname "$0")/.."

root="${LOWBIT_ARM_ROOT:-.cache/arm-root}"
python="${LOWBIT_VENV:-.venv}/bin/python"
[ -x "$python" ] || python=python3.11

pin() {  # the exact version pyproject.toml pins for package $1
  sed -n "s/^ *\"$1==\([^\"]*\)\".*/\1/p" pyproject.toml | head -n 1
}
tvm_version="$(pin apache-tvm)"
ffi_version="$(pin apache-tvm-ffi)"
# numpy and typing_extensions (tvm-ffi needs it) as in the venv, so host and emulated runs agree.
installed() {
  "$python" -c "import importlib.metadata as m; print(m.version('$1'))"
}
numpy_version="$(installed numpy)"
typing_version="$(installed typing_extensions)"
cloudpickle_version="$(installed cloudpickle)"  # TVM's RPC server sends its start-up through it
[ -n "$tvm_version" ] && [ -n "$ffi_version" ] || { echo "setup_arm: no apache-tvm pins in pyproject.toml" >&2; exit 1; }

# Python 3.11 and the shared libraries it, TVM's runtime and numpy's bundled OpenBLAS load.
packages=(
  python3.11-minimal libpython3.11-minimal libpython3.11-stdlib
  libc6 libgcc-s1 libstdc++6 libexpat1 zlib1g libffi8 libssl3 libbz2-1.0 liblzma5 libzstd1
  libcrypt1 libuuid1 libncursesw6 libtinfo6 libreadline8 libsqlite3-0 libdb5.3 libgdbm6
  libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1
)
stamp="$root/.lowbit-arm-root"
want="python3.11 bytecode tvm=$tvm_version ffi=$ffi_version numpy=$numpy_version typing_extensions=$typing_version cloudpickle=$cloudpickle_version packages=${packages[*]}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$root/usr/bin/python3.11" ]; then
  echo "setup_arm: $root is up to date"
  exit 0
fi

mkdir -p .cache
[ -f .cache/.gitignore ] || echo '*' > .cache/.gitignore
rm -rf "$root"
mkdir -p "$root"
apt_state="$(mktemp -d)"
trap 'rm -rf "$apt_state"' EXIT
chmod 755 "$apt_state"  # APT's unprivileged download user must reach it
mkdir -p "$apt_state/lists/partial" "$apt_state/cache/archives/partial" "$apt_state/debs"
apt_options=(-o APT::Architecture=arm64 -o APT::Architectures=arm64
             -o "Dir::State::Lists=$apt_state/lists" -o "Dir::Cache=$apt_state/cache")
echo "setup_arm: fetching arm64 package lists"
apt-get "${apt_options[@]}" update -qq
echo "setup_arm: downloading ${#packages[@]} arm64 packages"
(cd "$apt_state/debs" && apt-get "${apt_options[@]}" download -qq "${packages[@]/%/:arm64}")
for deb in "$apt_state"/debs/*.deb; do
  dpkg-deb -x "$deb" "$root"
done

echo "setup_arm: installing aarch64 wheels (apache-tvm $tvm_version, apache-tvm-ffi $ffi_version, numpy $numpy_version)"
"$python" -m pip install -q --disable-pip-version-check --no-deps --no-compile --target "$root/site" \
  --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp --only-binary=:all: \
  "apache-tvm==$tvm_version" "apache-tvm-ffi==$ffi_version" "numpy==$numpy_version" \
  "typing_extensions==$typing_version" "cloudpickle==$cloudpickle_version"

# Bytecode compiled by the host's Python 3.11 (same .pyc format): the emulated one would otherwise
# compile every module on each start (PYTHONDONTWRITEBYTECODE, or a read-only root), ~3x slower.
# Best effort: a module that does not compile here is compiled when imported.
echo "setup_arm: compiling bytecode"
"$python" -m compileall -q -j 0 "$root/site" "$root/usr/lib/python3.11" >/dev/null || true

echo "setup_arm: checking the emulated Python"
TVM_USE_RUNTIME_LIB=1 PYTHONPATH="$root/site" PYTHONNOUSERSITE=1 \
  qemu-aarch64 -cpu cortex-a76 -L "$root" "$root/usr/bin/python3.11" -c "import numpy, cloudpickle, tvm.runtime, tvm.rpc; print('setup_arm: aarch64 python ok')"
echo "$want" > "$stamp"
