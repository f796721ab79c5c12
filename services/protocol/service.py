"""The trainer's service-level answers: /health (ready, or still loading / failed) and the shape of every error."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class BatcherStats(BaseModel):
    requests: int = Field(description="jobs completed or failed")
    forward_batches: int = Field(
        description="merged batches run (one decode loop or one set of scoring passes)"
    )
    exclusive_jobs: int = Field(description="GRPO steps and checkpoint operations")
    max_batch_rows: int
    merged_requests: int = Field(description="jobs that ran in a batch together with at least one other")
    admitted_requests: int = Field(description="jobs that joined a batch already running")
    forward_passes: int = Field(description="model forward calls")
    queue_wait_s: float = Field(
        default=0.0,
        description="seconds jobs waited in all, from being queued to starting or joining a batch",
    )
    prefill_passes: int = Field(
        default=0, description="of forward_passes, the slot engine's prefills of joining rows"
    )
    decode_steps: int = Field(default=0, description="of forward_passes, the slot engine's decode steps")
    decoded_rows: int = Field(
        default=0,
        description="rows those decode steps decoded, in all: decoded_rows / decode_steps is the mean batch",
    )
    place_wait_s: float = Field(
        default=0.0,
        description="seconds the slot engine's rows waited in all, from joining a batch to having a KV slot",
    )
    read_wait_s: float = Field(
        default=0.0,
        description="seconds the slot engine's host waited for the device's sampled tokens (CUDA)",
    )
    idle_launches: int = Field(
        default=0,
        description="slot engine loop iterations that found the device idle, its last step done before the host "
        "launched more (CUDA): the host, not the device, set the pace",
    )
    gc_collections: int = Field(
        default=0,
        description="the engine process's garbage collections (with the model in this process: its)",
    )
    gc_s: float = Field(default=0.0, description="their seconds in all, each holding the GIL")
    gc_longest_s: float = Field(default=0.0, description="the longest of them")


class EngineHops(BaseModel):
    """With TRAINER_ENGINE_PROCESS: where the generation jobs' time went between the two processes, in seconds
    summed over `replies` jobs (each field / replies is a mean per job)."""

    replies: int = Field(description="generation jobs answered by the engine process")
    to_engine_s: float = Field(description="written to the pipe here -> read by the engine process")
    in_engine_s: float = Field(description="read -> answered by the engine (its queue wait and decode)")
    outbox_s: float = Field(description="answered -> the reply written to the pipe by the engine process")
    from_engine_s: float = Field(description="written -> read by this process")
    to_handler_s: float = Field(description="read -> the waiting request handler running again")


class ServiceStats(BaseModel):
    """Where a request's time goes on the HTTP side (the trainer's front end; with TRAINER_ENGINE_PROCESS, the
    process apart from the engine's): per request, request_seconds / requests against the client's latency, and
    generation_seconds / generations against the engine's queue wait and decode."""

    requests: int = Field(description="HTTP requests answered (all but /health)")
    request_seconds: float = Field(
        description="their wall time in all, from arrival to the answer's last byte"
    )
    generations: int = Field(description="generation jobs (one per prompt) handed to the engine")
    generation_seconds: float = Field(
        description="their wall time in all, from being handed to the engine until their samples came back"
    )
    gc_collections: int = Field(default=0, description="this process's garbage collections")
    gc_s: float = Field(default=0.0, description="their seconds in all, each holding the GIL")
    gc_longest_s: float = Field(default=0.0, description="the longest of them")
    engine_hops: EngineHops | None = Field(
        default=None, description="with the engine in its own process: the hops of generation_seconds"
    )


class HealthResponse(BaseModel):
    """200: the model is loaded and serving."""

    status: Literal["ok"] = "ok"
    backend: str = Field(description="transformers | unsloth")
    device: str
    model: str
    decode_dtype: str = Field(
        default="",
        description="the weights' dtype generation decodes with (TRAINER_DECODE_DTYPE resolved: float32 or bfloat16 "
        "on CPU); sampled log-probs come from it, scoring and training from the model",
    )
    adapter_version: int
    adapter_path: str | None = Field(
        default=None,
        description="the PEFT directory of the current adapter version (TRAINER_ADAPTER_EXPORT_DIR; None when off)",
    )
    step: int
    queue_depth: int = Field(description="jobs waiting for the model")
    batcher: BatcherStats
    service: ServiceStats | None = None
    started_at: float = Field(description="Unix time the service started: a new value = a restarted trainer")


class HealthNotReady(BaseModel):
    """503: the model is still loading, or failed to load (then `error` says why)."""

    status: Literal["loading", "error"]
    error: str | None
    loading_s: float


class ErrorInfo(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error (4xx) | server_error (5xx)")
    param: str | None = Field(default=None, description="the request field the error concerns")
    code: int = Field(description="the HTTP status")


class ErrorBody(BaseModel):
    """Every error of the trainer: OpenAI's `error` object, plus `detail` (the message) for FastAPI clients."""

    error: ErrorInfo
    detail: str


class TooLarge(BaseModel):
    detail: str
