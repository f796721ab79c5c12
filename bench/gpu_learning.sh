#!/bin/bash
# Runs bench/learning.py on a lent GPU machine (the `device` tool; see "## learning" in bench/RESULTS.md), one piece
# per call. That machine has torch, transformers (so `tokenizers`), peft and httpx but no fastapi/uvicorn/pydantic/
# gguf, no internet, and takes at most 64 MiB of files per call, so two git-ignored folders travel with it (name
# them in the call's carry):
#   .whl/         py3.12 wheels of what the service and the decode need there: bash bench/carry_wheels.sh fills it
#                 (fastapi 0.165 imports opentelemetry, whose absence stopped the trainer on 2026-11-30)
#   .gguf_parts/  the 98 MB SmolLM2 GGUF cut in two (split -b 50000000): part_aa in one call, part_ab in the next;
#                 each is copied to /tmp/gguf there, which outlives the call while the machine stays warm
# GSM8K is the copy shipped in orchestrator/gsm8k/dataset/ (tracked, so it travels with the tree).
# bench/learning.py starts three services on free ports of 127.0.0.1 there: the trainer, the reference teacher
# (python -m orchestrator.reference_teacher: GSM8K train reference solutions over the OpenAI API, its usage counted
# with the student's tokenizer.json from the converted model) and the orchestrator (TEACHER_TIER=custom, the
# reference teacher as the only teacher); `--teacher base` runs the embedded tier instead.
#
# Usage there: bash bench/gpu_learning.sh <bench/learning.py arguments>, e.g.
#   bash bench/gpu_learning.sh --piece-s 480 --token-budget 1200000 --arms mcts,grpo
#   bash bench/gpu_learning.sh --dev --piece-s 480 --token-budget 400000 --arms mcts,lr2e-4 \
#        --arm 'lr2e-4={"loss":{"learning_rate":2e-4}}'        (tuning: judged on the train tail, never on test)
# Pieces: the state lives in /tmp/learning-gpu (/tmp/learning-gpu-dev with --dev, so a dev check never resets the
# test run's state; kept while the machine stays warm); each call runs at most
# --piece-s seconds (keep it under the call's limit, with ~60 s for the wheels, the GGUF and the copies below) and
# exits 3 while work is left: run the same command again. Exit 0: every arm judged; learning.json and learning.png
# come back in $OUT. Every call copies the state and the logs to $OUT, so a lost machine loses only the
# checkpoints (the state file says how far the run got). PROBE=1 also runs .gpu/probe.py if present.
# `bash bench/gpu_learning.sh throughput <arguments>` runs bench/search_throughput.py there instead (its JSON is
# written after every phase into $OUT/search_throughput.json); `... reliability <arguments>` runs
# bench/reliability_bench.py (into $OUT/reliability.json; its load and keep_alive phases need no extra wheels).
set -o pipefail
cd "$(dirname "$0")/.."
# Installed once per machine, and again when the carried wheels change (a warm machine keeps /tmp/site).
# A call that does not carry .whl uses what an earlier call installed.
STAMP=$(ls .whl 2>/dev/null | sha256sum | cut -c1-16)
if ls .whl/*.whl > /dev/null 2>&1 && [ "$(cat /tmp/site/.wheels 2>/dev/null)" != "$STAMP" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  echo "$STAMP" > /tmp/site/.wheels
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
G=/tmp/gguf; mkdir -p $G
for p in aa ab; do for d in .gguf_parts .models; do [ -f $d/part_$p ] && cp $d/part_$p $G/part_$p; done; done
if ! echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $G/smollm2.gguf" | sha256sum -c --status; then
  ls -la $G; [ -f $G/part_aa ] && [ -f $G/part_ab ] || exit 3
  cat $G/part_aa $G/part_ab > $G/smollm2.gguf
fi
export TRAINER_MODEL_SOURCE=$G/smollm2.gguf TRAINER_MODEL_CACHE_DIR=/tmp/models-cache TRAINER_LOAD_IN_4BIT=false
# 1024 rows: four eval jobs of 256 answers decode in one batch.
export TRAINER_MAX_BATCH_SIZE=${MAXB:-1024} TRAINER_COMPILE_LAYERS=false TRAINER_GRADIENT_CHECKPOINTING=false HF_HUB_OFFLINE=1
[ -n "$PROBE" ] && [ -f .gpu/probe.py ] && python3 .gpu/probe.py 2>&1 | tee $OUT/probe.log
if [ "$1" = throughput ]; then  # bench/search_throughput.py instead: bash bench/gpu_learning.sh throughput <its arguments>
  shift
  python3 bench/search_throughput.py --workdir /tmp/throughput --out $OUT/search_throughput.json "$@" 2>&1 | tee -a $OUT/log
  rc=$?; tail -c 20000 /tmp/throughput/trainer.log > $OUT/trainer_tail.log 2>/dev/null; exit $rc
fi
if [ "$1" = reliability ]; then  # bench/reliability_bench.py instead, e.g. --phases load --load-max-tokens 64
  shift
  python3 bench/reliability_bench.py --out $OUT/reliability.json "$@" 2>&1 | tee -a $OUT/log
  exit $?
fi
W=/tmp/learning-gpu N=learning
case " $* " in *" --dev "*) W=/tmp/learning-gpu-dev N=learning_dev ;; esac
mkdir -p $W
python3 bench/learning.py --workdir $W --json-out $W/$N.json --png-out $W/$N.png --runs-log $W/learning_runs.json "$@" 2>&1 | tee -a $OUT/log
rc=$?
cp $W/$N.json $W/$N.png $W/learning_runs.json $W/learning_state.json $OUT/ 2>/dev/null
for f in trainer orchestrator reference_teacher; do tail -c 20000 $W/$f.log > $OUT/${f}_tail.log 2>/dev/null; done
echo "bench/learning.py exit $rc (3: a piece is done and work is left: run the same command again)"
exit $rc
