#!/usr/bin/env bash
# Installs every Debian package dynattn needs to build, test, benchmark and run its demo.
# Idempotent: packages already installed are skipped, and apt-get runs only when something
# is missing. Installs Debian packages only; downloads nothing else.
set -euo pipefail

packages=(
  build-essential cmake pkg-config
  ninja-build             # the build generator: adding a source rebuilds only that source
  libtorch-dev            # LibTorch 1.13 with oneDNN
  libdnnl-dev             # oneDNN headers: Winograd conv stacks (the library LibTorch links)
  libopenblas0-openmp     # fast BLAS; without it matrix products use reference BLAS
  libcli11-dev libfmt-dev libspdlog-dev nlohmann-json3-dev
  libpng-dev zlib1g-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  gnuplot-nox
  libgloo-dev
  dataset-fashion-mnist   # /usr/share/datasets/fashion-mnist
  python3-torch python3-numpy  # oracle for interop tests and the Python baseline
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} Debian packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-deps: need root to install: ${missing[*]}" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
