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


class JobSteps(BaseModel):
    job_id: str
    steps: list[dict[str, Any]] = Field(description="one record per step of a train job, in order")


class ErrorDetail(BaseModel):
    """Every error but a 422: what went wrong, for a person to read."""

    detail: str


class EndpointHealth(BaseModel):
    name: str
    url: str
    ok: bool
    status_code: int | None = None
    latency_ms: float | None = None
    error: str | None = None


class TeacherHealth(BaseModel):
    """A teacher as the running train job sees it (search/teachers.py has the weighting)."""

    job_id: str
    name: str
    tier: str | None
    weight: float = Field(description="probability of being picked first for an expansion now")
    failure_rate: float = Field(
        description="moving average of its failed requests (timeouts, 5xx, malformed)"
    )
    score: float = Field(description="moving average of the values its steps earned")
    picks: int
    requests: int
    failures: int
    resting_s: float = Field(description="seconds it still rests after failures in a row (0: it is asked)")
    last_error: str | None = Field(description="kind of its last failure (timeout, http_500, malformed, ...)")


class HealthView(BaseModel):
    status: Literal["ok", "degraded"]
    endpoints: list[EndpointHealth]
    jobs: dict[str, int]
    teachers: list[TeacherHealth] = Field(
        default_factory=list,
        description="the teachers of the running train job, with their weights and failures",
    )
