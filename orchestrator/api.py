"""The orchestrator's REST API: a thin HTTP layer over the JobManager.

    POST /train, POST /eval            -> 202 {job_id}
    GET  /jobs, GET /jobs/{id}          status, progress, metrics, result
    GET  /jobs/{id}/events              server-sent events, replayed from Last-Event-ID
    GET  /jobs/{id}/steps               per-step metrics of a train job
    POST /jobs/{id}/cancel, /resume
    GET  /jobs/{id}/trees/{n}           one search tree as JSON (?format=svg for a picture)
    GET  /jobs/{id}/results.jsonl       per-problem eval results; /jobs/{id}/files/{name} other job files
    GET  /health                        reachability of every configured endpoint
    GET  /metrics                       Prometheus
OpenAPI docs at /docs. With API_TOKEN set, every route but /health needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from orchestrator.events import SSE_KEEPALIVE, sse_frame
from orchestrator.jobs import JobManager, JobNotFound, JobsBusy, JobStateError
from orchestrator.schemas import (
    EndpointHealth,
    EvalRequest,
    HealthView,
    JobAccepted,
    JobList,
    JobView,
    TrainRequest,
)
from orchestrator.settings import EndpointSpec, Settings
from orchestrator.store import JobRecord
from orchestrator.telemetry import CONTENT_TYPE_LATEST, Telemetry
from orchestrator.training import search_config
from services.body_limit import BodySizeLimit

MAX_ERRORS = 50  # validation errors listed in one 422
RETRY_AFTER_S = 30  # the Retry-After of a 429 when the job queue is full
JOB_FILES = {"curves.png", "report.png", "report.html", "report.json", "eval.jsonl"}
# Answers the job routes give besides their own, documented so the OpenAPI schema says what clients will meet.
SUBMIT_RESPONSES = {
    401: {"description": "missing or wrong bearer token (API_TOKEN)"},
    413: {"description": "request body over MAX_REQUEST_BYTES"},
    429: {"description": "MAX_CONCURRENT_JOBS + MAX_QUEUED_JOBS jobs are queued or running; see Retry-After"},
}


def json_safe(value):
    """NaN and +-Infinity (which Python's JSON parser accepts from a client) as strings: JSON has no such numbers,
    and echoing one back in a 422 made the response itself fail with a 500."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def train_budget_errors(settings: Settings, body: TrainRequest) -> list[dict]:
    """What a /train asks beyond the service's limits, as 422 errors: the nodes one tree may grow
    (MAX_TREE_NODES) and the trees grown at once (MAX_TREES_IN_FLIGHT) bound the job's memory."""
    errors = []
    config = search_config(settings, body)
    width = config.n_teacher_right + config.n_teacher_wrong + config.n_student
    nodes = 1 + config.iterations * width
    if nodes > settings.max_tree_nodes:
        errors.append(
            {
                "type": "value_error",
                "loc": ("body", "search", "iterations"),
                "msg": f"1 + iterations x (n_teacher_right + n_teacher_wrong + n_student) = 1 + {config.iterations}"
                f" x {width} = {nodes} nodes per tree exceeds MAX_TREE_NODES ({settings.max_tree_nodes})",
                "input": config.iterations,
            }
        )
    if body.trees_in_flight is not None and body.trees_in_flight > settings.max_trees_in_flight:
        errors.append(
            {
                "type": "less_than_equal",
                "loc": ("body", "trees_in_flight"),
                "msg": f"trees_in_flight must be at most MAX_TREES_IN_FLIGHT ({settings.max_trees_in_flight})",
                "input": body.trees_in_flight,
            }
        )
    return errors


class StreamCount:
    def __init__(self) -> None:
        self.open = 0


class CountedStream(StreamingResponse):
    """A streaming response counted as open from its creation until it has been sent or abandoned, so a limit on
    open event streams (each holds a connection and a follower of the job's events) cannot leak."""

    def __init__(self, count: StreamCount, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.count = count
        count.open += 1

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.count.open -= 1


def job_links(job_id: str) -> dict[str, str]:
    base = f"/jobs/{job_id}"
    return {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel", "resume": f"{base}/resume"}


def job_view(job: JobRecord) -> JobView:
    links = job_links(job.id)
    if job.kind == "train":
        links.update(
            steps=f"/jobs/{job.id}/steps",
            trees=f"/jobs/{job.id}/trees/{{n}}",
            plot=f"/jobs/{job.id}/files/curves.png",
        )
    else:
        links.update(
            results=f"/jobs/{job.id}/results.jsonl",
            report=f"/jobs/{job.id}/files/report.html",
            plot=f"/jobs/{job.id}/files/report.png",
        )
    return JobView(
        id=job.id,
        kind=job.kind,
        status=job.status,
        request=job.request,
        progress=job.progress,
        metrics=job.metrics,
        result=job.result,
        error=job.error,
        created=job.created,
        updated=job.updated,
        links=links,
    )


async def probe(
    client: httpx.AsyncClient, name: str, url: str, headers: dict | None = None
) -> EndpointHealth:
    started = time.perf_counter()
    try:
        response = await client.get(url, headers=headers or {})
        ok = response.status_code == 200
        return EndpointHealth(
            name=name,
            url=url,
            ok=ok,
            status_code=response.status_code,
            latency_ms=round(1000 * (time.perf_counter() - started), 1),
            error=None if ok else response.text[:200],
        )
    except httpx.HTTPError as exc:
        return EndpointHealth(name=name, url=url, ok=False, error=f"{type(exc).__name__}: {exc}"[:200])


def endpoint_probes(settings: Settings) -> list[tuple[str, str, EndpointSpec | None]]:
    """(name, url, endpoint) of everything the orchestrator talks to; OpenAI servers are probed at /models."""
    probes: list[tuple[str, str, EndpointSpec | None]] = [
        ("trainer", settings.trainer_url.rstrip("/") + "/health", None)
    ]
    seen = {probes[0][1]}
    for endpoint in [*settings.teacher_endpoints(), settings.checker_endpoint()]:
        url = endpoint.base_url.rstrip("/") + "/models"
        if url not in seen:
            seen.add(url)
            probes.append((endpoint.name, url, endpoint))
    return probes


def probe_headers(settings: Settings, endpoint: EndpointSpec | None, token: str | None) -> dict[str, str]:
    """The endpoint's own key when it names one; the deployment's API_TOKEN for the trainer."""
    if endpoint is not None and endpoint.api_key_env:
        key = os.environ.get(endpoint.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}
    on_trainer = endpoint is None or endpoint.base_url.startswith(settings.trainer_url.rstrip("/"))
    return {"Authorization": f"Bearer {token}"} if token and on_trainer else {}


def create_app(settings: Settings | None = None, manager: JobManager | None = None) -> FastAPI:
    settings = settings or Settings()
    telemetry = manager.telemetry if manager and manager.telemetry else Telemetry()
    manager = manager or JobManager(settings, telemetry=telemetry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await manager.start()
        yield
        await manager.close()

    app = FastAPI(
        title="alphazero-llm-trainer orchestrator",
        version="0.1.0",
        lifespan=lifespan,
        description="Train a small LLM on GSM8K with AlphaZero-style MCTS + GRPO. Jobs run in the "
        "background; follow them with GET /jobs/{id} or the SSE stream.",
    )
    app.state.settings, app.state.manager, app.state.telemetry = settings, manager, telemetry
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes, setting="MAX_REQUEST_BYTES")
    token = settings.api_token.get_secret_value() if settings.api_token else None

    async def require_token(authorization: str | None = Header(default=None)) -> None:
        if token is None:
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_token)]
    streams = StreamCount()

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        telemetry.http_requests.labels(
            method=request.method, route=getattr(route, "path", "unmatched"), status=str(response.status_code)
        ).inc()
        return response

    async def get_job(job_id: str) -> JobRecord:
        try:
            return await manager.get(job_id)
        except JobNotFound:
            raise HTTPException(404, f"no job {job_id!r}") from None

    # --- jobs -------------------------------------------------------------------------------------------
    @app.post("/train", status_code=202, response_model=JobAccepted, dependencies=auth, responses=SUBMIT_RESPONSES)
    async def train(body: TrainRequest) -> JobAccepted:
        if errors := train_budget_errors(settings, body):
            raise RequestValidationError(errors)
        job = await manager.submit("train", body.model_dump(mode="json"))
        return JobAccepted(job_id=job.id, status=job.status, links=job_links(job.id))

    @app.post("/eval", status_code=202, response_model=JobAccepted, dependencies=auth, responses=SUBMIT_RESPONSES)
    async def evaluate(body: EvalRequest) -> JobAccepted:
        job = await manager.submit("eval", body.model_dump(mode="json"))
        return JobAccepted(job_id=job.id, status=job.status, links=job_links(job.id))

    @app.get("/jobs", response_model=JobList, dependencies=auth)
    async def list_jobs(
        limit: int = Query(100, ge=1, le=1000), status: str | None = None, kind: str | None = None
    ) -> JobList:
        return JobList(jobs=[job_view(j) for j in await manager.list(limit, status, kind)])

    @app.get("/jobs/{job_id}", response_model=JobView, dependencies=auth)
    async def show_job(job_id: str) -> JobView:
        return job_view(await get_job(job_id))

    @app.get("/jobs/{job_id}/steps", dependencies=auth)
    async def job_steps(job_id: str) -> dict:
        await get_job(job_id)
        return {"job_id": job_id, "steps": await manager.steps(job_id)}

    @app.post("/jobs/{job_id}/cancel", response_model=JobView, dependencies=auth)
    async def cancel_job(job_id: str) -> JobView:
        await get_job(job_id)
        try:
            return job_view(await manager.cancel(job_id))
        except JobStateError as exc:
            raise HTTPException(409, str(exc)) from None

    @app.post("/jobs/{job_id}/resume", status_code=202, response_model=JobView, dependencies=auth)
    async def resume_job(job_id: str) -> JobView:
        await get_job(job_id)
        try:
            return job_view(await manager.resume(job_id))
        except JobStateError as exc:
            raise HTTPException(409, str(exc)) from None

    @app.get(
        "/jobs/{job_id}/events",
        dependencies=auth,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "server-sent events"},
            429: {"description": "MAX_EVENT_STREAMS streams are open; see Retry-After"},
        },
    )
    async def job_events(
        job_id: str,
        last_event_id: str | None = Header(default=None),
        after: int | None = Query(None, ge=0, description="replay events after this id"),
    ):
        await get_job(job_id)
        # ASCII digits only: "\xb2".isdigit() is true but int() refuses it, as it does 5000 digits (both were 500s).
        resume_from = int(last_event_id) if re.fullmatch(r"[0-9]{1,18}", last_event_id or "") else 0
        start = after if after is not None else resume_from
        if streams.open >= settings.max_event_streams:
            raise HTTPException(
                429, f"{streams.open} event streams are open (MAX_EVENT_STREAMS)", headers={"Retry-After": "5"}
            )

        async def stream():
            async for event in manager.hub.follow(job_id, start):
                yield SSE_KEEPALIVE if event is None else sse_frame(event)

        return CountedStream(
            streams,
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/jobs/{job_id}/trees/{n}", dependencies=auth)
    async def job_tree(job_id: str, n: int, format: str = Query("json", pattern="^(json|svg)$")):
        await get_job(job_id)
        path = manager.job_dir(job_id) / "trees" / f"{n:06d}.json"
        if n < 0 or not path.is_file():
            raise HTTPException(404, f"job {job_id} has no tree {n}")
        if format == "json":
            return FileResponse(path, media_type="application/json")
        from orchestrator import plots

        record = json.loads(await asyncio.to_thread(path.read_text))
        return Response(plots.tree_svg(record["tree"]), media_type="image/svg+xml")

    @app.get("/jobs/{job_id}/results.jsonl", dependencies=auth)
    async def job_results(job_id: str):
        job = await get_job(job_id)
        path = manager.job_dir(job_id) / "eval.jsonl"
        if job.kind != "eval" or not path.is_file():
            raise HTTPException(404, f"job {job_id} has no per-problem results (yet)")
        return FileResponse(path, media_type="application/x-ndjson", filename=f"{job_id}.jsonl")

    @app.get("/jobs/{job_id}/files/{name}", dependencies=auth)
    async def job_file(job_id: str, name: str):
        await get_job(job_id)
        path: Path = manager.job_dir(job_id) / name
        if name not in JOB_FILES or not path.is_file():
            raise HTTPException(404, f"job {job_id} has no file {name!r}")
        return FileResponse(path)

    # --- service ----------------------------------------------------------------------------------------
    @app.get("/health", response_model=HealthView)
    async def health() -> HealthView:
        async with httpx.AsyncClient(timeout=5.0) as client:
            endpoints = list(
                await asyncio.gather(
                    *(
                        probe(client, name, url, probe_headers(settings, endpoint, token))
                        for name, url, endpoint in endpoint_probes(settings)
                    )
                )
            )
        counts = await manager.store.count_by_status()
        return HealthView(
            status="ok" if all(e.ok for e in endpoints) else "degraded", endpoints=endpoints, jobs=counts
        )

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> Response:
        telemetry.set_job_counts(await manager.store.count_by_status())
        return Response(telemetry.render(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        detail = json_safe(jsonable_encoder(errors[:MAX_ERRORS]))
        if len(errors) > MAX_ERRORS:  # 60k unknown fields in a 1 MiB body made a 6 MiB answer
            detail.append({"type": "too_many_errors", "loc": ["body"], "msg": f"{len(errors)} errors in all"})
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(JobNotFound)
    async def not_found(_request: Request, exc: JobNotFound):
        return JSONResponse({"detail": f"no job {exc.args[0]!r}"}, status_code=404)

    @app.exception_handler(JobsBusy)
    async def busy(_request: Request, exc: JobsBusy):
        # Refused rather than queued without bound; a queued job takes at least seconds, so ask for 30.
        return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": str(RETRY_AFTER_S)})

    return app
