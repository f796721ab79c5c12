import pytest
from support.scripted_server import Rule

from orchestrator.llm import RetryPolicy
from orchestrator.trainer_client import TrainerClient, TrainerError

FAST = RetryPolicy(max_retries=2, backoff_base_s=0.001, backoff_max_s=0.01)


async def test_health_and_logprobs(scripted_server):
    async with TrainerClient(scripted_server.url, retry=FAST) as client:
        assert (await client.health())["status"] == "ok"
        out = await client.logprobs(
            [{"messages": [{"role": "user", "content": "q"}], "context": "", "completion": "a b c"}],
            model="base",
        )
    assert out["results"][0]["num_tokens"] == 3
    assert scripted_server.log[-1]["payload"]["model"] == "base"


async def test_idempotent_calls_retry_on_503(scripted_server):
    scripted_server.set_rules([Rule(mode="error", status=503, path="/logprobs", times=1)])
    async with TrainerClient(scripted_server.url, retry=FAST) as client:
        out = await client.logprobs([{"prompt": "p", "completion": "x"}])
    assert out["results"] and scripted_server.stats()["requests"]["/logprobs"] == 2


async def test_grpo_step_is_retried_only_with_a_step_key(scripted_server):
    scripted_server.set_rules([Rule(mode="error", status=503, path="/grpo/step")])
    async with TrainerClient(scripted_server.url, retry=FAST) as client:
        with pytest.raises(TrainerError) as info:
            await client.grpo_step([], {"type": "grpo"})
        assert info.value.status == 503
        assert scripted_server.stats()["requests"]["/grpo/step"] == 1
        with pytest.raises(TrainerError):
            await client.grpo_step([], {"type": "grpo"}, step_key="k1")
        assert scripted_server.stats()["requests"]["/grpo/step"] == 1 + 3
        assert scripted_server.log[-1]["payload"]["step_key"] == "k1"


async def test_bearer_token_and_unreachable_server(scripted_server):
    async with TrainerClient(scripted_server.url, api_token="tok", retry=FAST) as client:
        await client.logprobs([])
    assert scripted_server.log[-1]["authorization"] == "Bearer tok"
    async with TrainerClient("http://127.0.0.1:9", retry=RetryPolicy(max_retries=0)) as client:
        with pytest.raises(TrainerError, match="connection"):
            await client.health()
