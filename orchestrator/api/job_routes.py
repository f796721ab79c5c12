"""The job routes: submit train and eval jobs, follow them (status, events, steps), cancel and resume them, and
read what they made (trees, per-problem results, reports). Every route needs the bearer token when API_TOKEN
is set."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import ValidationError

from orchestrator.api.dependencies import (
    ManagerDep,
    SettingsDep,
    StreamCount,
    StreamsDep,
    existing_job,
    require_token,
)
from orchestrator.api.schemas import ErrorDetail, JobAccepted, JobList, JobSteps, JobView
from orchestrator.jobs.events import SSE_KEEPALIVE, sse_frame
from orchestrator.jobs.manager import JobStateError
from orchestrator.jobs.store import JobRecord
from orchestrator.runners.requests import EvalRequest, TrainRequest, search_config
from orchestrator.settings import Settings

JOB_FILES = {
    "curves.png": "image/png",
    "report.png": "image/png",
    "report.html": "text/html",
    "report.json": "application/json",
    "eval.jsonl": "application/x-ndjson",
}
RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "string"}}
}


def errors(**described: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses of error statuses, `e404="why"` style, each with its body ({"detail": "..."})."""
    out: dict[int | str, dict[str, Any]] = {}
    for key, description in described.items():
        code = int(key.removeprefix("e"))
        out[code] = {"model": ErrorDetail, "description": description}
        if code == 429:
            out[code]["headers"] = RETRY_AFTER
    return out


NO_JOB = "no job with that id"
SSE_EVENT = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "event": {"type": "string"},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "required": ["id", "event", "data"],
}
BUSY = "MAX_CONCURRENT_JOBS + MAX_QUEUED_JOBS jobs are queued or running; see Retry-After"
# A body that is not JSON (400), too large (413); a field that fails its check is the 422 FastAPI documents.
BODY = errors(e400="the body is not JSON", e413="request body over MAX_REQUEST_BYTES")
SUBMIT_RULES = (
    " Rules across fields (422 naming the field): offset + num_examples within the split (7,473 train, 1,319 "
    "test problems)"
)

router = APIRouter(
    dependencies=[Depends(require_token)],
    responses=errors(e401="missing or wrong bearer token (API_TOKEN)"),
)


def train_budget_errors(settings: Settings, body: TrainRequest) -> list[dict]:
    """What a /train asks beyond the service's limits, as 422 errors: a search config that does not hold
    together (e.g. reward weights whose dense terms could outweigh correctness), the nodes one tree may grow
    (MAX_TREE_NODES) and the trees grown at once (MAX_TREES_IN_FLIGHT) bound the job's memory."""
    errors = []
    try:
        config = search_config(settings, body)
    except ValidationError as exc:
        return [
            {
                "type": error["type"],
                "loc": ("body", "search", *error["loc"]),
                "msg": error["msg"],
                "input": error.get("input"),
            }
            for error in exc.errors(include_url=False)
        ]
    nodes = config.max_nodes()
    if nodes > settings.max_tree_nodes:
        bound = (
            "1 + (root_samples + iterations x (n_student + n_teacher_right + n_teacher_wrong) + teacher_gold) "
            "x max_tokens"
            if config.shape == "fork"
            else "1 + iterations x (n_teacher_right + n_teacher_wrong + n_student)"
        )
        errors.append(
            {
                "type": "value_error",
                "loc": ("body", "search", "iterations"),
                "msg": f"{bound} = {nodes} nodes per tree exceeds MAX_TREE_NODES ({settings.max_tree_nodes})",
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
        kind=job.kind,  # type: ignore[arg-type]  # the store holds only "train" and "eval" jobs
        status=job.status,  # type: ignore[arg-type]  # and only the statuses JobView names
        request=job.request,
        progress=job.progress,
        metrics=job.metrics,
        result=job.result,
        error=job.error,
        created=job.created,
        updated=job.updated,
        links=links,
    )


@router.post(
    "/train",
    status_code=202,
    response_model=JobAccepted,
    responses={**BODY, **errors(e429=BUSY)},
    description="Queue a train job." + SUBMIT_RULES + "; 1 + search.iterations x (n_teacher_right + "
    "n_teacher_wrong + n_student) nodes per tree within MAX_TREE_NODES; trees_in_flight within "
    "MAX_TREES_IN_FLIGHT.",
)
async def train(body: TrainRequest, settings: SettingsDep, manager: ManagerDep) -> JobAccepted:
    if errors := train_budget_errors(settings, body):
        raise RequestValidationError(errors)
    job = await manager.submit("train", body.model_dump(mode="json"))
    return JobAccepted(job_id=job.id, status=job.status, links=job_links(job.id))


@router.post(
    "/eval",
    status_code=202,
    response_model=JobAccepted,
    responses={**BODY, **errors(e429=BUSY)},
    description="Queue an eval job." + SUBMIT_RULES + ".",
)
async def evaluate(body: EvalRequest, manager: ManagerDep) -> JobAccepted:
    job = await manager.submit("eval", body.model_dump(mode="json"))
    return JobAccepted(job_id=job.id, status=job.status, links=job_links(job.id))


@router.get("/jobs", response_model=JobList)
async def list_jobs(
    manager: ManagerDep,
    limit: int = Query(100, ge=1, le=1000),
    status: str | None = None,
    kind: str | None = None,
) -> JobList:
    return JobList(jobs=[job_view(j) for j in await manager.list(limit, status, kind)])


@router.get("/jobs/{job_id}", response_model=JobView, responses=errors(e404=NO_JOB))
async def show_job(job_id: str, manager: ManagerDep) -> JobView:
    return job_view(await existing_job(manager, job_id))


@router.get("/jobs/{job_id}/steps", response_model=JobSteps, responses=errors(e404=NO_JOB))
async def job_steps(job_id: str, manager: ManagerDep) -> JobSteps:
    await existing_job(manager, job_id)
    return JobSteps(job_id=job_id, steps=await manager.steps(job_id))


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobView,
    responses=errors(e404=NO_JOB, e409="the job has already finished"),
)
async def cancel_job(job_id: str, manager: ManagerDep) -> JobView:
    await existing_job(manager, job_id)
    try:
        return job_view(await manager.cancel(job_id))
    except JobStateError as exc:
        raise HTTPException(409, str(exc)) from None


@router.post(
    "/jobs/{job_id}/resume",
    status_code=202,
    response_model=JobView,
    responses=errors(e404=NO_JOB, e409="the job is not interrupted, failed or cancelled", e429=BUSY),
)
async def resume_job(job_id: str, manager: ManagerDep) -> JobView:
    await existing_job(manager, job_id)
    try:
        return job_view(await manager.resume(job_id))
    except JobStateError as exc:
        raise HTTPException(409, str(exc)) from None


@router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
            "description": "server-sent events: `id` (resume with Last-Event-ID or ?after=), `event` (its type: "
            "status, progress, step, teachers, teacher_error, checkpoint, ...) and `data`, the event as JSON",
        },
        **errors(e404=NO_JOB, e429="MAX_EVENT_STREAMS streams are open; see Retry-After"),
    },
)
async def job_events(
    job_id: str,
    settings: SettingsDep,
    manager: ManagerDep,
    streams: StreamsDep,
    last_event_id: str | None = Header(default=None),
    after: int | None = Query(None, ge=0, description="replay events after this id"),
):
    await existing_job(manager, job_id)
    # ASCII digits only: "\xb2".isdigit() is true but int() refuses it, as it does 5000 digits (both were 500s).
    resume_from = int(last_event_id) if last_event_id and re.fullmatch(r"[0-9]{1,18}", last_event_id) else 0
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


@router.get(
    "/jobs/{job_id}/trees/{n}",
    response_class=FileResponse,
    responses={
        200: {
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "image/svg+xml": {"schema": {"type": "string"}},
            },
            "description": "the search tree as JSON, or (format=svg) as a picture",
        },
        **errors(e404="no job with that id, or no tree n (yet)"),
    },
)
async def job_tree(
    job_id: str, n: int, manager: ManagerDep, format: str = Query("json", pattern="^(json|svg)$")
):
    await existing_job(manager, job_id)
    path = manager.job_dir(job_id) / "trees" / f"{n:06d}.json"
    if n < 0 or not path.is_file():
        raise HTTPException(404, f"job {job_id} has no tree {n}")
    if format == "json":
        return FileResponse(path, media_type="application/json")
    from orchestrator.runners import plots  # matplotlib only when a picture is asked for

    record = json.loads(await asyncio.to_thread(path.read_text))
    return Response(plots.tree_svg(record["tree"]), media_type="image/svg+xml")


@router.get(
    "/jobs/{job_id}/results.jsonl",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
            "description": "one JSON line per problem of an eval job",
        },
        **errors(e404="no job with that id, not an eval job, or no results yet"),
    },
)
async def job_results(job_id: str, manager: ManagerDep):
    job = await existing_job(manager, job_id)
    path = manager.job_dir(job_id) / "eval.jsonl"
    if job.kind != "eval" or not path.is_file():
        raise HTTPException(404, f"job {job_id} has no per-problem results (yet)")
    return FileResponse(path, media_type="application/x-ndjson", filename=f"{job_id}.jsonl")


@router.get(
    "/jobs/{job_id}/files/{name}",
    response_class=FileResponse,
    responses={
        200: {
            "content": {media: {"schema": {"type": "string"}} for media in sorted(set(JOB_FILES.values()))},
            "description": "a file the job wrote: " + ", ".join(JOB_FILES),
        },
        **errors(e404="no job with that id, or no such file (yet)"),
    },
)
async def job_file(job_id: str, name: str, manager: ManagerDep):
    await existing_job(manager, job_id)
    path = manager.job_dir(job_id) / name
    if name not in JOB_FILES or not path.is_file():
        raise HTTPException(404, f"job {job_id} has no file {name!r}")
    return FileResponse(path, media_type=JOB_FILES[name])
