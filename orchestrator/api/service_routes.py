"""The service routes: GET /health (reachability of every endpoint the orchestrator talks to; no auth) and
GET /metrics (Prometheus)."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
from fastapi import APIRouter, Depends, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from orchestrator.api.dependencies import ManagerDep, SettingsDep, TelemetryDep, require_token
from orchestrator.api.schemas import EndpointHealth, ErrorDetail, HealthView, TeacherHealth
from orchestrator.clients.http import async_client
from orchestrator.settings import EndpointSpec, Settings

router = APIRouter()


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


def probe_headers(settings: Settings, endpoint: EndpointSpec | None) -> dict[str, str]:
    """The endpoint's own key when it names one; the deployment's API_TOKEN for the trainer."""
    if endpoint is not None and endpoint.api_key_env:
        key = os.environ.get(endpoint.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}
    token = settings.api_token.get_secret_value() if settings.api_token else None
    on_trainer = endpoint is None or endpoint.base_url.startswith(settings.trainer_url.rstrip("/"))
    return {"Authorization": f"Bearer {token}"} if token and on_trainer else {}


@router.get("/health", response_model=HealthView)
async def health(settings: SettingsDep, manager: ManagerDep) -> HealthView:
    async with async_client(timeout=5.0) as client:
        endpoints = list(
            await asyncio.gather(
                *(
                    probe(client, name, url, probe_headers(settings, endpoint))
                    for name, url, endpoint in endpoint_probes(settings)
                )
            )
        )
    counts = await manager.store.count_by_status()
    teachers = [
        TeacherHealth(
            job_id=job_id, name=name, **{k: v for k, v in state.items() if k in TeacherHealth.model_fields}
        )
        for job_id, shown in manager.live().items()
        for name, state in shown.get("teachers", {}).items()
    ]
    return HealthView(
        status="ok" if all(e.ok for e in endpoints) else "degraded",
        endpoints=endpoints,
        jobs=counts,
        teachers=teachers,
    )


@router.get(
    "/metrics",
    dependencies=[Depends(require_token)],
    response_class=PlainTextResponse,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition format",
        },
        401: {"model": ErrorDetail, "description": "missing or wrong bearer token (API_TOKEN)"},
    },
)
async def metrics(manager: ManagerDep, telemetry: TelemetryDep) -> Response:
    telemetry.set_job_counts(await manager.store.count_by_status())
    return Response(telemetry.render(), media_type=CONTENT_TYPE_LATEST)
