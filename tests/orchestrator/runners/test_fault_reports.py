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
    a, b = teachers.states["a"], teachers.states["b"]
    a.requests, a.failures, a.picks = 3, 1, 3  # before the step
    before = teacher_counts(teachers)
    assert before == {"a": (3, 1, 3), "b": (0, 0, 0)}
    a.requests, a.failures, a.picks, a.failure_rate = 5, 3, 4, 0.75
    a.last_error = LLMError("a", 503, "overloaded", kind="http_503")
    b.requests, b.picks = 4, 3
    tried, failed, summaries = asyncio.run(report_teachers(ctx, teachers, before, step=7))
    assert (tried, failed) == (6, 2)
    assert summaries == ["a: http_503 ([a] HTTP 503: overloaded)"]
    # weights: q = 0.5 each; health a = 0.25, b = 1 -> 0.2 / 0.8
    assert ctx.events[1] == (
        "teachers",
        {
            "step": 7,
            "teachers": {
                "a": {
                    "picks": 1,
                    "pick_share": 0.25,
                    "requests": 2,
                    "failures": 2,
                    "failure_rate": 0.75,
                    "weight": 0.2,
                    "resting_s": 0.0,
                },
                "b": {
                    "picks": 3,
                    "pick_share": 0.75,
                    "requests": 4,
                    "failures": 0,
                    "failure_rate": 0.0,
                    "weight": 0.8,
                    "resting_s": 0.0,
                },
            },
        },
    )
    assert ctx.events[:1] == [
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
