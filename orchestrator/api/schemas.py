"""The response bodies of the orchestrator's REST API (the request bodies are runners/requests.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class JobAccepted(BaseModel):
    job_id: str
    status: str
    links: dict[str, str]


class JobView(BaseModel):
    id: str
    kind: Literal["train", "eval"]
    status: Literal["queued", "running", "completed", "failed", "cancelled", "interrupted"]
    request: dict[str, Any]
    progress: dict[str, Any]
    metrics: dict[str, Any]
    result: dict[str, Any] | None = None
    error: str | None = None
    created: float
    updated: float
    links: dict[str, str] = Field(default_factory=dict)


class JobList(BaseModel):
    jobs: list[JobView]


class EndpointHealth(BaseModel):
    name: str
    url: str
    ok: bool
    status_code: int | None = None
    latency_ms: float | None = None
    error: str | None = None


class HealthView(BaseModel):
    status: Literal["ok", "degraded"]
    endpoints: list[EndpointHealth]
    jobs: dict[str, int]
