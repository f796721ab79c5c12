"""Schemathesis over a service's OpenAPI schema with the checks that hold it to what it promises (issue #18): no
5xx, every status one the operation documents, with the documented content type, body schema and headers, and a
schema-violating request refused. Used by tests/integration/test_fuzz_api.py and bench/reliability_bench.py.

    statuses, failures = fuzz(url, headers={"Authorization": "Bearer ..."}, examples=25)

Derandomized: the same requests on every run. Failures are collected, not raised, so one run reports all of them.
"""

from __future__ import annotations

from collections import Counter

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]


def fuzz(
    url: str,
    headers: dict[str, str],
    examples: int = 25,
    only: set[str] | None = None,
    path_parameters=None,
) -> tuple[dict[str, Counter], list[str]]:
    """Every operation of the service at `url`, `examples` schema-valid and `examples` schema-violating cases each.

    Returns ({operation label: Counter of "mode:status"}, [failure descriptions])."""
    spec = httpx.get(url + "/openapi.json", headers=headers, timeout=30).json()
    schema = schemathesis.openapi.from_dict(spec)
    statuses: dict[str, Counter] = {}
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if only is not None and operation.label not in only:
            continue
        counts = statuses.setdefault(operation.label, Counter())
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)
            label = f"{operation.label} [{mode.value}]"
            try:
                run_cases(url, headers, strategy, examples, label, counts, failures)
            except (
                Unsatisfiable
            ):  # e.g. no schema-violating value exists for a free-form string path parameter
                counts[f"{mode.value}:unsatisfiable"] += 1
    return statuses, failures


def run_cases(
    url: str,
    headers: dict[str, str],
    strategy,
    examples: int,
    label: str,
    counts: Counter,
    failures: list[str],
) -> None:
    """Call the service with `examples` cases drawn from `strategy`; count status codes, collect failures."""
    mode = label.rsplit("[", 1)[1].rstrip("]")

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=strategy)
    def check(case):
        response = case.call(base_url=url, headers=headers, timeout=300)
        counts[f"{mode}:{response.status_code}"] += 1
        try:
            case.validate_response(response, checks=CONFORMANCE)
        except BaseException as exc:  # schemathesis raises an exception group of its failures
            if isinstance(exc, KeyboardInterrupt):
                raise
            failures.append(f"{label} -> {response.status_code}: {exc}"[:3000])

    check()


def report(statuses: dict[str, Counter]) -> str:
    return "\n".join(f"{label}: {dict(sorted(c.items()))}" for label, c in statuses.items())
