import httpx
import pytest

from orchestrator.clients.llm import RetryPolicy
from orchestrator.clients.trainer import TrainerClient, TrainerError
from services.protocol import BatcherStats, CompletionScore, GrpoStepResponse, HealthResponse, LossSettings
from support.scripted_server import Rule

FAST = RetryPolicy(max_retries=2, backoff_base_s=0.001, backoff_max_s=0.01)
STEP_ITEM = {"prompt": "p", "completion": "x", "advantage": 1.0}


async def test_health_and_logprobs(scripted_server):
    async with TrainerClient(scripted_server.url, retry=FAST) as client:
        health = await client.health()
        out = await client.logprobs(
            [{"messages": [{"role": "user", "content": "q"}], "context": "", "completion": "a b c"}],
            model="base",
        )
    assert isinstance(health, HealthResponse) and health.started_at == scripted_server.started_at
    assert isinstance(out.results[0], CompletionScore) and out.results[0].num_tokens == 3
    assert scripted_server.log[-1]["payload"]["model"] == "base"


async def test_idempotent_calls_retry_on_503(scripted_server):
    scripted_server.set_rules([Rule(mode="error", status=503, path="/logprobs", times=1)])
    async with TrainerClient(scripted_server.url, retry=FAST) as client:
        out = await client.logprobs([{"prompt": "p", "completion": "x"}])
    assert out.results and scripted_server.stats()["requests"]["/logprobs"] == 2


async def test_grpo_step_is_retried_only_with_a_step_key(scripted_server):
    scripted_server.set_rules([Rule(mode="error", status=503, path="/grpo/step")])
    async with TrainerClient(scripted_server.url, retry=FAST) as client:
        with pytest.raises(TrainerError) as info:
            await client.grpo_step([STEP_ITEM], LossSettings(beta=0.1))
        assert (info.value.status, info.value.kind) == (503, "http_503")
        assert scripted_server.stats()["requests"]["/grpo/step"] == 1
        assert scripted_server.log[-1]["payload"]["loss"]["beta"] == 0.1
        with pytest.raises(TrainerError):
            await client.grpo_step([STEP_ITEM], step_key="k1")
        assert scripted_server.stats()["requests"]["/grpo/step"] == 1 + 3
        assert scripted_server.log[-1]["payload"]["step_key"] == "k1"


async def test_bearer_token_and_unreachable_server(scripted_server):
    async with TrainerClient(scripted_server.url, api_token="tok", retry=FAST) as client:
        await client.logprobs([{"prompt": "p", "completion": "x"}])
    assert scripted_server.log[-1]["authorization"] == "Bearer tok"
    async with TrainerClient("http://127.0.0.1:9", retry=RetryPolicy(max_retries=0)) as client:
        with pytest.raises(TrainerError, match="connection") as info:
            await client.health()
    assert info.value.kind == "connection"


async def test_a_request_that_breaks_the_protocol_is_refused_before_it_is_sent(scripted_server):
    async with TrainerClient(scripted_server.url, retry=FAST) as client:
        with pytest.raises(TrainerError) as info:
            await client.logprobs(
                [{"prompt": "p", "messages": [{"role": "user", "content": "q"}], "completion": "x"}]
            )
        assert info.value.kind == "invalid_request" and "items.0" in info.value.message
        with pytest.raises(TrainerError) as info:
            await client.grpo_step([])
        assert info.value.kind == "invalid_request" and "items" in info.value.message
        with pytest.raises(TrainerError, match="name") as info:
            await client.load_checkpoint("../escape")
        assert info.value.kind == "invalid_request"
    assert not scripted_server.log  # nothing reached the server


def answering(body: bytes):
    """A trainer whose every route answers 200 with `body`; counts the requests."""
    calls = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    return TrainerClient("http://trainer", retry=FAST, transport=httpx.MockTransport(handle)), calls


async def test_an_answer_of_another_shape_is_a_protocol_error_not_a_key_error_later():
    client, calls = answering(b'{"adapter_version": 3, "results": [{"mean": -1.0}]}')
    async with client:
        with pytest.raises(TrainerError) as info:
            await client.logprobs([{"prompt": "p", "completion": "x"}])
    assert (info.value.kind, info.value.status, info.value.retryable) == ("protocol", 200, False)
    assert "results.0." in info.value.message and calls == ["/logprobs"]  # named, and not asked again


async def test_a_cut_off_answer_is_malformed_and_asked_again():
    client, calls = answering(b'{"status": "ok", "backe')
    async with client:
        with pytest.raises(TrainerError) as info:
            await client.health()
    assert (info.value.kind, info.value.retryable) == ("malformed", True) and len(calls) == 3


# --- TrainerWatch: a trainer that goes away and comes back ---------------------------------------------------
HEALTH = HealthResponse(
    backend="fake",
    device="none",
    model="m",
    adapter_version=4,
    step=4,
    queue_depth=0,
    batcher=BatcherStats(**dict.fromkeys(BatcherStats.model_fields, 0)),
    started_at=0.0,
).model_dump()
STEP_ANSWER = GrpoStepResponse(
    loss=0.5, kl=0.0, clip_fraction=0.0, grad_norm=1.0, tokens=3, adapter_version=5, step=5, duplicate=False
).model_dump()


class FakeTrainer:
    """/health answers from a script: a started_at, "down" (connection refused) or "loading" (503)."""

    def __init__(self, script: list):
        self.script, self.grpo_calls = list(script), 0

    def __call__(self, request):
        if request.url.path == "/grpo/step":
            self.grpo_calls += 1
            if self.grpo_calls <= 3:  # every attempt of the first call (FAST: 3 attempts)
                raise httpx.ConnectError("refused", request=request)
            return httpx.Response(200, json=STEP_ANSWER)
        state = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if state == "down":
            raise httpx.ConnectError("refused", request=request)
        if state == "loading":
            return httpx.Response(503, json={"status": "loading"})
        return httpx.Response(200, json={**HEALTH, "started_at": state})


def watch_of(fake: FakeTrainer, wait_s: float = 30.0):
    from orchestrator.clients.trainer import TrainerWatch

    events = []

    async def emit(type, **data):
        events.append((type, data))

    client = TrainerClient("http://trainer", retry=FAST, transport=httpx.MockTransport(fake))
    return TrainerWatch(client, wait_s, emit, poll_s=0.001), events


async def test_watch_waits_for_a_trainer_that_is_down_and_reports_a_restart():
    from orchestrator.clients.trainer import TrainerRestarted

    watch, events = watch_of(FakeTrainer([1.0, "down", "down", "down", "down", "loading", 2.0]))
    watch.accept(await watch.health())
    with pytest.raises(TrainerRestarted) as info:
        await watch.check()
    assert info.value.health.started_at == 2.0
    assert [t for t, _ in events] == ["trainer_unavailable", "trainer_back"]
    assert events[1][1]["restarted"] is True
    watch.accept(info.value.health)
    assert (await watch.check()).started_at == 2.0


async def test_watch_gives_up_after_trainer_wait_s():
    from orchestrator.clients.trainer import TrainerUnavailable

    watch, events = watch_of(FakeTrainer(["down"]), wait_s=0.05)
    with pytest.raises(TrainerUnavailable, match="TRAINER_WAIT_S"):
        await watch.health()
    assert [t for t, _ in events] == ["trainer_unavailable"]


async def test_watch_repeats_a_call_that_lost_its_connection_when_the_same_trainer_answers():
    fake = FakeTrainer([1.0])
    watch, _ = watch_of(fake)
    watch.accept(await watch.health())
    result = await watch.call(lambda: watch.client.grpo_step([STEP_ITEM], step_key="job:5"))
    assert isinstance(result, GrpoStepResponse)
    assert result.step == 5 and fake.grpo_calls == 4  # 3 attempts lost (the client's retries), then one more
