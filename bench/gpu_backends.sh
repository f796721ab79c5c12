#!/bin/bash
# The two CUDA backends of the trainer (transformers + peft + bitsandbytes, and Unsloth) on one lent GPU machine
# (the `device` tool), in two calls, because the wheels (~95 MB) exceed one call's 64 MiB of carried files:
#
#   call 1, carry [".whl", ".whl-u1"]:  bash bench/gpu_backends.sh transformers
#   call 2, carry [".whl-u2"]:          bash bench/gpu_backends.sh unsloth
#
# Call 2 must follow call 1 on the same warm machine: it finds bitsandbytes, the service wheels and call 1's
# results under /tmp/gpu_backends, which outlives a call only while the machine stays warm.
#   .whl/     py3.12 wheels: fastapi, starlette, uvicorn, pydantic(+core), pydantic-settings, python-dotenv,
#             typing-inspection, annotated-types, gguf, opentelemetry-api, importlib-metadata, httpx-aiohttp
#   .whl-u1/  bitsandbytes 0.50.2
#   .whl-u2/  unsloth and unsloth_zoo 2026.10.9 and what they import that the machine lacks (trl, datasets,
#             torchao, xformers, cut_cross_entropy, diffusers, tyro, ...; docker/trainer-constraints.txt's set)
# Each phase runs, each stage under its own time limit, its output under $OUT/<phase>/ (one stage failing does not
# stop the next):
#   pytest   tests/trainer/test_cuda_trainer.py with CUDA_TEST_BACKEND=<phase> (tiny random Llama, the real app)
#   bench    bench/gpu_bench.py --backend <phase> --service-check, on a random-init Llama-3.2-3B of the real shape
#            in 4-bit, loaded once through the trainer service (the real app, in-process): first the service round
#            of bench/gpu_service.py (load -> generate -> /logprobs -> /grpo/step with beta > 0 and the sampler's
#            own log-probs as old_logprobs -> checkpoint save -> step -> load, each with its checks), then GRPO
#            step tok/s and peak GiB at 8x512 and 16x512, /logprobs tok/s and generation tok/s on that student
# Call 2 also writes $OUT/gpu_backends.json: both phases' rows and service reports, for bench/results/gpu.json.
# BUDGET (seconds, default 520) bounds the whole call; a stage that would start with under 20 s left is skipped.
set -o pipefail
cd "$(dirname "$0")/.."
PHASE=${1:?usage: bash bench/gpu_backends.sh transformers|unsloth}
case $PHASE in transformers|unsloth) ;; *) echo "unknown phase $PHASE" >&2; exit 2 ;; esac
W=/tmp/gpu_backends
OUT=${OUT:-$W/out}
LOG=$OUT/$PHASE
mkdir -p "$W/site" "$W/results" "$LOG"
export PYTHONPATH=$W/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# No network there: no hub look-ups, no Unsloth statistics.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 UNSLOTH_DISABLE_STATISTICS=1
export CUDA_TEST_BACKEND=$PHASE
START=$(date +%s)
BUDGET=${BUDGET:-520}

stage() {  # stage NAME LIMIT_SECONDS COMMAND...: run it under a timeout, log to $LOG/NAME.log, note rc and time
    local name=$1 limit=$2 left t0 rc
    shift 2
    left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then
        echo "$name skipped: ${left}s of the budget left" | tee -a "$LOG/stages.txt"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$LOG/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $(( $(date +%s) - t0 ))s (limit ${limit}s)" | tee -a "$LOG/stages.txt"
    tail -n 25 "$LOG/$name.log"
}

install_wheels() {  # install_wheels DIR...: every wheel of the DIRs present, into $W/site, without dependencies
    local wheels=()
    for dir in "$@"; do [ -d "$dir" ] && wheels+=("$dir"/*.whl); done
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "install: no wheels in $* (carry them)" | tee -a "$LOG/stages.txt"
        return
    fi
    stage install 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$W/site" "${wheels[@]}"
}

if [ "$PHASE" = transformers ]; then
    install_wheels .whl .whl-u1
else
    if [ ! -d "$W/site/bitsandbytes" ] || [ ! -d "$W/site/fastapi" ]; then
        echo "no bitsandbytes/fastapi under $W/site: run 'bash bench/gpu_backends.sh transformers' (carry .whl" \
             ".whl-u1) on this machine first, then this call while it is still warm" | tee "$LOG/stages.txt"
        exit 3
    fi
    install_wheels .whl .whl-u2
fi
python3 - > "$LOG/env.txt" 2>&1 <<'EOF'
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for name in ("transformers", "peft", "accelerate", "bitsandbytes", "triton", "unsloth", "unsloth_zoo", "trl",
             "datasets", "torchao", "xformers", "fastapi", "pydantic", "huggingface-hub", "tokenizers"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "-")
EOF
cat "$LOG/env.txt"
stage pytest 200 python3 -m pytest -q -p no:cacheprovider tests/trainer/test_cuda_trainer.py -rA \
    --junitxml="$LOG/pytest.xml"
stage bench 330 python3 bench/gpu_bench.py --backend "$PHASE" --service-check --configs llama-3.2-3b:nf4:engine \
    --grid 8x512,16x512 --naive-grid "" --gen-quants nf4 --gen-tokens 32 --gen-batch 16 --out "$LOG/bench.json"
[ -f "$LOG/bench.json" ] && cp "$LOG/bench.json" "$W/results/$PHASE-bench.json"
if [ "$PHASE" = unsloth ]; then
    python3 - "$W/results" "$OUT/gpu_backends.json" <<'EOF'
import json, pathlib, sys, time
results, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
merged = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "command": "bash bench/gpu_backends.sh transformers; bash bench/gpu_backends.sh unsloth", "rows": []}
for phase in ("transformers", "unsloth"):
    path = results / f"{phase}-bench.json"
    if not path.is_file():
        merged.setdefault("missing", []).append(path.name)
        continue
    data = json.loads(path.read_text())
    merged["rows"] += data.get("rows", [])
    merged.setdefault("bench_commands", {})[phase] = data.get("command")
    merged.setdefault("service", {})[phase] = data.get("service")
target.write_text(json.dumps(merged, indent=1))
print("wrote", target, len(merged["rows"]), "rows; missing:", merged.get("missing"))
EOF
fi
echo "phase $PHASE done in $(( $(date +%s) - START ))s"; cat "$LOG/stages.txt"
