"""The orchestrator's routes and their dependencies run on the event loop, not in FastAPI's thread pool."""

from __future__ import annotations

import inspect

from fastapi.routing import APIRoute

from orchestrator.api import job_routes, service_routes


def test_every_dependency_and_route_runs_on_the_event_loop():
    """A plain `def` dependency or endpoint costs a thread-pool hand-off per request; none is left."""
    sync: list[str] = []

    def walk(dependant, where: str) -> None:
        for dependency in dependant.dependencies:
            if dependency.call is not None and not inspect.iscoroutinefunction(dependency.call):
                sync.append(f"{where}: {dependency.call.__name__}")
            walk(dependency, where)

    routes = [
        route
        for module in (job_routes, service_routes)
        for route in module.router.routes
        if isinstance(route, APIRoute)
    ]
    assert len(routes) >= 10  # the routers create_app includes: jobs, health, metrics
    for route in routes:
        if not inspect.iscoroutinefunction(route.endpoint):
            sync.append(f"{route.path}: the endpoint {route.endpoint.__name__}")
        walk(route.dependant, route.path)
    assert sync == []
