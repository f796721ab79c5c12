import asyncio

import pytest

from orchestrator.clients.llm import LLMPool, RetryPolicy
from orchestrator.search.terminal import TerminalChecker, rule_verdict
from orchestrator.settings import EndpointSpec
from support.scripted_server import Rule


@pytest.mark.parametrize(
    "step,finish,eos,expected,reason",
    [
        ("#### 18", "stop", False, True, "answer_line"),
        ("So she makes $18.\n#### 18", "stop", False, True, "answer_line"),
        ("The answer is 18.", "stop", False, True, "answer_phrase"),
        ("Answer: $1,000", "stop", False, True, "answer_phrase"),
        ("She has 3 apples left", "stop", True, True, "eos"),
        ("So the total is 5 + 3 = 8 and", "length", False, False, "truncated"),
        ("First, 16 - 3 = 13 eggs remain.", "stop", False, False, "rule"),
        ("Let me compute the cost per day", "stop", False, False, "rule"),
        ("So she makes 18 dollars.", "stop", False, None, "unsure"),
        ("Therefore, in total 42.", "stop", False, None, "unsure"),
        ("####", "stop", False, False, "rule"),
    ],
)
def test_rules(step, finish, eos, expected, reason):
    v = rule_verdict(step, finish, eos)
    assert (v.terminal, v.reason) == (expected, reason)


def checker(server, pool) -> TerminalChecker:
    return TerminalChecker(
        pool, EndpointSpec(name="checker", base_url=server.v1, model="checker", timeout_s=2)
    )


async def test_llm_only_when_unsure_and_cached(scripted_server):
    scripted_server.config.checker_reply = "Yes."
    async with LLMPool(retry=RetryPolicy(max_retries=0)) as pool:
        tc = checker(scripted_server, pool)
        assert (await tc.check("q", "#### 5\n", "#### 5")).reason == "answer_line"
        assert (await tc.check("q", "Add 2 and 3.\n", "Add 2 and 3.")).terminal is False
        assert tc.llm_calls == 0 and scripted_server.stats()["total"] == 0
        v = await tc.check("q", "So she makes 18 dollars.\n", "So she makes 18 dollars.")
        assert (v.terminal, v.reason) == (True, "checker")
        again = await asyncio.gather(
            *(tc.check("q", "So she makes 18 dollars.\n", "So she makes 18 dollars.") for _ in range(5))
        )
        assert all(x.terminal for x in again)
        assert tc.llm_calls == 1 and tc.cache_hits == 5 and scripted_server.stats()["total"] == 1
        prompt = scripted_server.log[0]["payload"]["messages"][0]["content"]
        assert "yes or no" in prompt and "So she makes 18 dollars." in prompt
        scripted_server.config.checker_reply = "no"
        assert (await tc.check("q2", "So it is 7.\n", "So it is 7.")).terminal is False


async def test_concurrent_same_state_shares_one_request(scripted_server):
    scripted_server.config.latency_ms = 50
    async with LLMPool(retry=RetryPolicy(max_retries=0)) as pool:
        tc = checker(scripted_server, pool)
        await asyncio.gather(*(tc.check("q", "So 5.\n", "So 5.") for _ in range(4)))
    assert tc.llm_calls == 1 and scripted_server.stats()["total"] == 1


async def test_checker_failure_means_not_terminal(scripted_server):
    scripted_server.set_rules([Rule(mode="error", status=500)])
    async with LLMPool(retry=RetryPolicy(max_retries=0)) as pool:
        tc = checker(scripted_server, pool)
        v = await tc.check("q", "So 5.\n", "So 5.")
    assert (v.terminal, v.reason) == (False, "checker_failed") and tc.errors


async def test_without_checker_unsure_is_not_terminal():
    v = await TerminalChecker(None, None).check("q", "So 5.\n", "So 5.")
    assert (v.terminal, v.reason) == (False, "unsure_no_checker")
