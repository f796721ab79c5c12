"""Property-based fuzz of both services' OpenAPI schemas (schemathesis + hypothesis) against real processes.

Every operation of the trainer (tiny model) and of the orchestrator (over the scripted OpenAI-compatible server)
gets schema-valid and schema-violating requests; the property is that the schema tells the truth (issue #18):
no answer is a 5xx, every status is one the operation documents, with the documented content type, body schema
and headers, and a schema-violating request is refused. Rules across fields that JSON Schema cannot state (a
budget over prompts x n x max_tokens, offset + num_examples within the split) are documented on the operation;
schema-valid requests they refuse are counted, not failed. Budgets are kept small by the services' own limits
(TRAINER_MAX_GENERATION_TOKENS, MAX_TREE_NODES), which is what a deployment does too. Derandomized: the same
requests on every run.
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings

from orchestrator.local.processes import free_port, orchestrator_process
from support.fuzz import fuzz as fuzz_with_checks
from support.fuzz import report
from support.scripted_server import ScriptedServer, ServerConfig
from support.trainer_process import TrainerProcess

pytestmark = pytest.mark.integration

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 25  # per operation and per mode (schema-valid, schema-violating)
GENERATION_TOKENS = 64  # the trainer's budget per completion request in this test: seconds, not minutes


def fuzz(url: str, examples: int = EXAMPLES, only: set[str] | None = None, path_parameters=None):
    return fuzz_with_checks(url, AUTH, examples, only, path_parameters)


# ----- trainer ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer(trainer_model_dir, tmp_path_factory):
    env = {"TRAINER_API_TOKEN": TOKEN, "TRAINER_MAX_GENERATION_TOKENS": str(GENERATION_TOKENS)}
    with TrainerProcess(checkpoint_dir=tmp_path_factory.mktemp("fuzz-ckpt"), env=env) as process:
        yield process


def test_trainer_schema_fuzz_conforms(trainer):
    statuses, failures = fuzz(trainer.url)
    print(report(statuses))
    assert not failures, "\n\n".join(failures)
    generated = sum(v for c in statuses.values() for k, v in c.items() if k == "positive:200")
    assert generated > 0  # some fuzzed requests did reach the model, not only the validators
    assert httpx.get(trainer.url + "/health", timeout=30).json()["status"] == "ok"


def test_trainer_generation_budget_beyond_the_limit_gets_422(trainer):
    over = [
        ("/v1/completions", {"model": "student", "prompt": "Hi", "n": 64, "max_tokens": 2048}),
        ("/v1/completions", {"model": "student", "prompt": ["a", "b", "c", "d", "e"], "max_tokens": 16}),
        ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "Hi"}]}),
        (
            "/v1/chat/completions",
            {
                "model": "base",
                "messages": [{"role": "user", "content": "Hi"}],
                "n": 8,
                "max_completion_tokens": 9,
            },
        ),
    ]
    for route, body in over:
        response = httpx.post(trainer.url + route, json=body, headers=AUTH, timeout=60)
        assert response.status_code == 422, (route, body, response.text)
        error = response.json()["error"]
        assert error["param"] == "max_tokens" and "TRAINER_MAX_GENERATION_TOKENS" in error["message"]
    within = {"model": "base", "prompt": "1 + 1 =", "n": 4, "max_tokens": 16, "temperature": 0.0}
    response = httpx.post(trainer.url + "/v1/completions", json=within, headers=AUTH, timeout=300)
    assert response.status_code == 200 and len(response.json()["choices"]) == 4


def test_trainer_errors_have_one_shape(trainer):
    """A body that is not JSON, an unknown route and a wrong method answer in the documented error shape."""
    for method, path, content in (
        ("POST", "/v1/completions", b"{not json"),
        ("GET", "/no/such/route", None),
        ("GET", "/grpo/step", None),
    ):
        response = httpx.request(
            method, trainer.url + path, content=content, headers={**AUTH, "content-type": "application/json"}
        )
        assert 400 <= response.status_code < 500, (path, response.status_code)
        body = response.json()
        assert body["error"]["code"] == response.status_code and body["detail"] == body["error"]["message"]


# ----- orchestrator -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory):
    with ScriptedServer(ServerConfig(answer="42", answer_depth=1)) as scripted:
        env = {"API_TOKEN": TOKEN, "MAX_TREE_NODES": "4096"}
        workdir = tmp_path_factory.mktemp("fuzz-orch")
        with orchestrator_process(free_port(), scripted.url, workdir, env=env) as process:
            process.wait_ready(timeout_s=60)
            yield process


def wait_done(url: str, job_id: str) -> dict:
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/jobs/{job_id}", headers=AUTH).json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.2)
    raise TimeoutError(job_id)


def test_orchestrator_schema_fuzz_conforms(orchestrator):
    url = orchestrator.url
    # A finished eval job first, so the job routes are also fuzzed with an id that exists (its files, trees,
    # events, cancel and resume), before the fuzzed /train and /eval fill the queue.
    job_id = httpx.post(url + "/eval", json={"num_examples": 2, "max_tokens": 16}, headers=AUTH).json()[
        "job_id"
    ]
    assert wait_done(url, job_id)["status"] == "completed"
    job_routes = {
        "GET /jobs/{job_id}",
        "GET /jobs/{job_id}/steps",
        "POST /jobs/{job_id}/cancel",
        "POST /jobs/{job_id}/resume",
        "GET /jobs/{job_id}/events",
        "GET /jobs/{job_id}/trees/{n}",
        "GET /jobs/{job_id}/results.jsonl",
        "GET /jobs/{job_id}/files/{name}",
    }
    known, known_failures = fuzz(url, only=job_routes, path_parameters={"job_id": job_id})
    statuses, failures = fuzz(url)
    print(report(known), report(statuses), sep="\n")
    assert not known_failures + failures, "\n\n".join(known_failures + failures)
    assert any(k.endswith(":202") for k in statuses["POST /train"])  # the fuzz did get jobs accepted
    for job in httpx.get(url + "/jobs", headers=AUTH, params={"limit": 1000}).json()["jobs"]:
        if job["status"] in ("queued", "running"):
            assert httpx.post(f"{url}/jobs/{job['id']}/cancel", headers=AUTH).status_code in (200, 409)
    assert httpx.get(url + "/health").status_code == 200


def test_orchestrator_train_budget_beyond_the_limits_gets_422(orchestrator):
    too_big = [
        # fork (the default): 1 + (root_samples + iterations x children + gold) x max_tokens nodes > 4096
        ({"search": {"iterations": 64}}, "MAX_TREE_NODES"),
        ({"search": {"iterations": 2, "n_student": 64}}, "MAX_TREE_NODES"),
        ({"search": {"shape": "line", "iterations": 2048}}, "MAX_TREE_NODES"),  # line: 1 + 2048 x 4 > 4096
        ({"trees_in_flight": 1024}, "MAX_TREES_IN_FLIGHT"),
    ]
    for body, setting in too_big:
        response = httpx.post(orchestrator.url + "/train", json={"num_examples": 1, **body}, headers=AUTH)
        assert response.status_code == 422, (body, response.text)
        assert setting in response.text
    fits = {"num_examples": 1, "search": {"iterations": 2}, "trees_in_flight": 2}
    response = httpx.post(orchestrator.url + "/train", json=fits, headers=AUTH)
    assert response.status_code in (202, 429)  # within the limits: accepted, or refused only for a full queue
    if response.status_code == 202:
        httpx.post(f"{orchestrator.url}/jobs/{response.json()['job_id']}/cancel", headers=AUTH)


def test_every_route_but_health_refuses_a_missing_token(orchestrator, trainer):
    for url in (orchestrator.url, trainer.url):
        spec = httpx.get(url + "/openapi.json", headers=AUTH).json()
        for path, methods in spec["paths"].items():
            concrete = path.replace("{job_id}", "x").replace("{n}", "0").replace("{name}", "report.html")
            for method in methods:
                response = httpx.request(
                    method.upper(), url + concrete, headers={"Authorization": "Bearer no"}
                )
                expected = 200 if path == "/health" else 401
                assert response.status_code == expected, (url, method, path, response.status_code)


# Found by probing around the schema (schemathesis rarely generates them): each was a 500 before the fix.
BAD_TRAINER_INPUTS = [
    ("/v1/completions", {"model": "student", "prompt": "\ud800", "max_tokens": 2}, 422, "prompt"),
    (
        "/v1/completions",
        {"model": "student", "prompt": ["ok", "a\udfffb"], "max_tokens": 2},
        422,
        "prompt[1]",
    ),
    (
        "/v1/chat/completions",
        {"model": "student", "max_tokens": 2, "messages": [{"role": "user", "content": "\udfff"}]},
        422,
        "messages[0].content",
    ),
    (
        "/v1/chat/completions",
        {
            "model": "student",
            "max_tokens": 2,
            "continue_final_message": True,
            "add_generation_prompt": False,
            "messages": [{"role": "assistant", "content": "The answer"}],
        },
        422,
        "messages",
    ),
    ("/logprobs", {"items": [{"prompt": "a", "completion": "\ud800"}]}, 422, "items[0].completion"),
    (
        "/grpo/step",
        {"items": [{"prompt": "a", "completion": "b\udc00", "advantage": 1.0}]},
        422,
        "items[0].completion",
    ),
    (
        "/grpo/step",
        {"items": [{"prompt": "a", "completion": "hi", "advantage": 1.0}], "loss": {"learning_rate": 1e300}},
        422,
        "loss.learning_rate",
    ),
    (
        "/grpo/step",
        {"items": [{"prompt": "a", "completion": "hi", "advantage": 1e300, "weight": 1e300}]},
        422,
        "items",
    ),
]


@pytest.mark.parametrize("route, body, status, field", BAD_TRAINER_INPUTS)
def test_trainer_bad_inputs_get_a_4xx_naming_the_field(trainer, route, body, status, field):
    import json

    before = httpx.get(trainer.url + "/health", timeout=30).json()["adapter_version"]
    # json.dumps writes lone surrogates as \\ud800 escapes, exactly as a client's JSON encoder would
    response = httpx.post(
        trainer.url + route,
        content=json.dumps(body),
        timeout=120,
        headers={**AUTH, "content-type": "application/json"},
    )
    assert response.status_code == status, response.text
    param = response.json()["error"]["param"]  # pydantic writes items.0.x where the service writes items[0].x
    assert param.replace("[", ".").replace("]", "") == field.replace("[", ".").replace("]", ""), param
    assert (
        httpx.get(trainer.url + "/health", timeout=30).json()["adapter_version"] == before
    )  # nothing applied


def test_malformed_bodies_get_a_4xx_on_both_services(orchestrator, trainer):
    for url, route in ((trainer.url, "/v1/completions"), (orchestrator.url, "/eval")):
        for content in (
            b"[" * 200_000 + b"]" * 200_000,
            b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
            b'{"prompt": "\xff\xfe"}',
            b'{"model": "student", "prompt": "x", "temperature": NaN}',
            b'{"model": "student", "prompt": "x", "max_tokens": 1e999}',
            b'{"prompt": "x",',
        ):
            response = httpx.post(
                url + route, content=content, timeout=60, headers={**AUTH, "content-type": "application/json"}
            )
            assert 400 <= response.status_code < 500, (url, content[:20], response.status_code)


def test_trainer_model_routes_with_arbitrary_text_and_numbers(trainer):
    """Schema-valid requests that do reach the model, with any text (all of Unicode, lone surrogates included)
    and any finite numbers where the schema allows them: never a 5xx, and a GRPO step either applies or is refused
    whole."""
    from hypothesis import strategies as st

    # st.text() leaves out surrogates; the second alphabet lets lone ones in (JSON can carry them as \ud800).
    any_char = st.one_of(st.characters(), st.characters(exclude_categories=()))
    text = st.text(alphabet=any_char, max_size=40)
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": text}
    )
    prompt_or_messages = st.one_of(
        st.fixed_dictionaries({"prompt": st.text(alphabet=any_char, min_size=1, max_size=40)}),
        st.fixed_dictionaries({"messages": st.lists(message, min_size=1, max_size=3)}),
    )
    completion = st.text(alphabet=any_char, min_size=1, max_size=20)
    item = st.tuples(
        prompt_or_messages, completion, st.floats(allow_nan=False), st.floats(min_value=0, allow_nan=False)
    ).map(lambda t: {**t[0], "completion": t[1], "advantage": t[2], "weight": t[3]})
    loss = st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["grpo", "dr_grpo", "legacy"]),
            "beta": st.floats(0, 1e6),
            "learning_rate": st.floats(1e-12, 1.0),
            "micro_batch_size": st.integers(1, 4),
        },
    )
    seen: Counter = Counter()

    @settings(
        max_examples=15,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(
        items=st.lists(item, min_size=1, max_size=3),
        loss=loss,
        messages=st.lists(message, min_size=1, max_size=3),
        continue_final=st.booleans(),
        n=st.integers(1, 4),
        seed=st.integers(-(2**70), 2**70),
    )
    def check(items, loss, messages, continue_final, n, seed):
        import json

        headers = {**AUTH, "content-type": "application/json"}
        before = httpx.get(trainer.url + "/health", timeout=30).json()["adapter_version"]
        step = httpx.post(
            trainer.url + "/grpo/step",
            content=json.dumps({"items": items, "loss": loss}),
            headers=headers,
            timeout=300,
        )
        after = httpx.get(trainer.url + "/health", timeout=30).json()["adapter_version"]
        assert step.status_code < 500, step.text
        assert after == before + (1 if step.status_code == 200 else 0)
        scored = httpx.post(
            trainer.url + "/logprobs",
            timeout=300,
            headers=headers,
            content=json.dumps(
                {"items": [{k: v for k, v in i.items() if k not in ("advantage", "weight")} for i in items]}
            ),
        )
        assert scored.status_code < 500, scored.text
        chat = {
            "model": "student",
            "messages": messages,
            "n": n,
            "max_tokens": 2,
            "seed": seed,
            "continue_final_message": continue_final,
            "add_generation_prompt": not continue_final,
        }
        answer = httpx.post(
            trainer.url + "/v1/chat/completions", content=json.dumps(chat), headers=headers, timeout=300
        )
        assert answer.status_code < 500, answer.text
        seen[(step.status_code, scored.status_code, answer.status_code)] += 1

    check()
    print(dict(seen))
    assert any(codes[0] == 200 for codes in seen) and any(codes[2] == 200 for codes in seen)


def test_huge_invalid_bodies_get_a_small_422(orchestrator, trainer):
    """Bodies just under the size limits made of many bad elements: one error per element used to cost the trainer
    18 s, 1.8 GiB and a 175 MiB answer (1.6 M bad items), the orchestrator 70 MiB and a 6 MiB answer (60k unknown
    fields). Lists now stop at their first bad element, many unknown fields make one error, and a 422 spells out a
    bounded number of errors."""
    import json

    headers = {**AUTH, "content-type": "application/json"}
    cases = [
        (trainer.url + "/logprobs", {"items": [{"completion": 1}] * 1_500_000}),
        (
            trainer.url + "/grpo/step",
            {
                "items": [
                    {"prompt": "a", "completion": "b", "advantage": 0.0, "old_logprobs": ["x"] * 3_000_000}
                ]
            },
        ),
        (trainer.url + "/v1/completions", {"model": "student", "prompt": [1] * 3_000_000}),
        (
            trainer.url + "/grpo/step",
            {"items": [{"completion": "b", **{f"k{i}": 0 for i in range(1_000_000)}}]},
        ),
        (orchestrator.url + "/train", {f"k{i}": i for i in range(60_000)}),
        (orchestrator.url + "/eval", {"models": [f"m{i}" for i in range(100_000)]}),
    ]
    for url, body in cases:
        content = json.dumps(body).encode()
        response = httpx.post(url, content=content, headers=headers, timeout=300)
        assert response.status_code == 422, (url, response.status_code)
        assert len(response.content) < 2 * 2**20, (url, len(content), len(response.content))


def test_every_path_answers_options_and_405_with_all_its_methods(orchestrator, trainer):
    """Issue #18: OPTIONS /checkpoints left out GET (Starlette's 405 named only the first route of the path). Now
    OPTIONS lists every method the schema declares for the path, and a wrong method's 405 does the same."""
    import re

    for url in (orchestrator.url, trainer.url):
        spec = httpx.get(url + "/openapi.json", headers=AUTH).json()
        for path in spec["paths"]:
            concrete = path.replace("{job_id}", "x").replace("{n}", "0").replace("{name}", "report.html")
            # /checkpoints/load is also a /checkpoints/{name}: DELETE is served there too
            declared = {
                method.upper()
                for template, operations in spec["paths"].items()
                if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), concrete)
                for method in operations
            }
            expected = declared | {"OPTIONS"} | ({"HEAD"} if "GET" in declared else set())
            options = httpx.options(url + concrete)
            assert options.status_code == 204, (url, path, options.status_code)
            assert set(options.headers["allow"].split(", ")) == expected, (url, path, options.headers)
            wrong = next(m for m in ("PATCH", "PUT", "DELETE") if m not in declared)
            refused = httpx.request(wrong, url + concrete, headers=AUTH)
            assert refused.status_code == 405, (url, path, wrong, refused.status_code)
            assert set(refused.headers["allow"].split(", ")) == expected, (url, path, refused.headers)


# Bodies that JSON Schema calls invalid but a lax parser takes (1.0 for an integer, 0 or "true" for a boolean):
# both services refuse them, as their schemas say.
NOT_OF_THEIR_TYPE = [
    ("trainer", "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 2, "n": 1.0}, "n"),
    ("trainer", "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 2.0}, "max_tokens"),
    ("trainer", "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 2, "echo": 0}, "echo"),
    (
        "trainer",
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "continue_final_message": 0},
        "continue_final_message",
    ),
    (
        "trainer",
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "logprobs": "true"},
        "logprobs",
    ),
    (
        "trainer",
        "/grpo/step",
        {"items": [{"prompt": "a", "completion": "b", "advantage": True}]},
        "advantage",
    ),
    (
        "trainer",
        "/grpo/step",
        {"items": [{"prompt": "a", "completion": "b", "advantage": 1.0}], "loss": {"micro_batch_size": 2.0}},
        "micro_batch_size",
    ),
    ("orchestrator", "/eval", {"num_examples": 2.0}, "num_examples"),
    ("orchestrator", "/train", {"num_examples": 1, "search": {"use_checker": 1}}, "use_checker"),
]


@pytest.mark.parametrize("service, route, body, field", NOT_OF_THEIR_TYPE)
def test_values_not_of_their_schema_type_get_422(orchestrator, trainer, service, route, body, field):
    url = trainer.url if service == "trainer" else orchestrator.url
    response = httpx.post(url + route, json=body, headers=AUTH, timeout=60)
    assert response.status_code == 422, response.text
    assert field in response.text


def test_the_schemas_state_the_rules_across_fields(orchestrator, trainer):
    """What JSON Schema can say is in the models (exactly one of prompt and messages; two messages or more to
    continue the last); what it cannot (budgets, the last message's role, old_logprobs per token) is in the
    operation's description. Every status a route answers is documented with its body."""
    spec = httpx.get(trainer.url + "/openapi.json", headers=AUTH).json()
    schemas, paths = spec["components"]["schemas"], spec["paths"]
    one_of = schemas["GrpoStepItem"]["oneOf"]
    assert [branch["required"] for branch in one_of] == [["prompt"], ["messages"]]
    assert schemas["ChatCompletionRequest"]["then"]["properties"]["messages"]["minItems"] == 2
    assert "TRAINER_MAX_GENERATION_TOKENS" in paths["/v1/completions"]["post"]["description"]
    assert "the last is the assistant's" in paths["/v1/chat/completions"]["post"]["description"]
    assert "old_logprobs" in paths["/grpo/step"]["post"]["description"]
    assert set(paths["/checkpoints"]["post"]["responses"]) >= {
        "200",
        "401",
        "413",
        "422",
        "429",
        "503",
        "507",
    }
    assert set(paths["/checkpoints/load"]["post"]["responses"]) >= {"404", "409"}
    assert "Retry-After" in paths["/v1/completions"]["post"]["responses"]["429"]["headers"]
    spec = httpx.get(orchestrator.url + "/openapi.json", headers=AUTH).json()
    paths = spec["paths"]
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert set(paths["/jobs/{job_id}/cancel"]["post"]["responses"]) >= {"200", "401", "404", "409"}
    assert set(paths["/jobs/{job_id}/resume"]["post"]["responses"]) >= {"202", "404", "409", "429"}
    assert set(paths["/train"]["post"]["responses"]) >= {"202", "400", "401", "413", "422", "429"}
    assert "MAX_TREE_NODES" in paths["/train"]["post"]["description"]
    metrics = httpx.get(orchestrator.url + "/metrics", headers=AUTH)
    assert metrics.headers["content-type"].startswith("text/plain")
