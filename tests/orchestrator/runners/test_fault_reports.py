import asyncio

from orchestrator.clients.llm import LLMError
from orchestrator.runners.fault_reports import note_degraded, report_teachers, teacher_counts
from orchestrator.search.teachers import TeacherEnsemble
from orchestrator.settings import EndpointSpec


class FakeStore:
    def __init__(self):
        self.updates = []

    async def update_job(self, job_id, progress):
        self.updates.append((job_id, progress))


class FakeCtx:
    job_id = "train-0"

    def __init__(self):
        self.events = []
        self.store = FakeStore()

    async def emit(self, type_, **data):
        self.events.append((type_, data))


def ensemble() -> TeacherEnsemble:
    return TeacherEnsemble(
        [EndpointSpec(name=n, base_url="http://127.0.0.1:1/v1", model=n) for n in ("a", "b")]
    )


def test_report_teachers_tells_only_the_failures_of_the_step():
    teachers, ctx = ensemble(), FakeCtx()
    teachers.states["a"].requests, teachers.states["a"].failures = 3, 1  # before the step
    before = teacher_counts(teachers)
    assert before == {"a": (3, 1), "b": (0, 0)}
    a, b = teachers.states["a"], teachers.states["b"]
    a.requests, a.failures, a.last_error = 5, 3, LLMError("a", 503, "overloaded", kind="http_503")
    b.requests = 4
    tried, failed, summaries = asyncio.run(report_teachers(ctx, teachers, before, step=7))
    assert (tried, failed) == (6, 2)
    assert summaries == ["a: http_503 ([a] HTTP 503: overloaded)"]
    assert ctx.events == [
        (
            "teacher_error",
            {
                "step": 7,
                "teacher": "a",
                "kind": "http_503",
                "errors": 2,
                "requests": 2,
                "error": "[a] HTTP 503: overloaded",
                "resting": False,
            },
        )
    ]


def test_note_degraded_tells_each_mode_once():
    ctx, degraded = FakeCtx(), ["checker_failed"]
    asyncio.run(note_degraded(ctx, degraded, ["checker_failed", "teacher_failover"], step=2))
    asyncio.run(note_degraded(ctx, degraded, ["teacher_failover"], step=3))
    assert degraded == ["checker_failed", "teacher_failover"]
    assert ctx.events == [("degraded", {"step": 2, "mode": "teacher_failover"})]
    assert ctx.store.updates == [("train-0", {"degraded": ["checker_failed", "teacher_failover"]})]
