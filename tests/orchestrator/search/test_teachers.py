import collections

import pytest

from orchestrator.clients.llm import LLMError, LLMPool, RetryPolicy
from orchestrator.search.teachers import AllTeachersFailed, TeacherEnsemble, first_line, teacher_messages
from orchestrator.settings import EndpointSpec
from support.scripted_server import Rule


def ep(name: str, tier: str | None = None, url: str = "http://127.0.0.1:9/v1", timeout: float = 2.0):
    return EndpointSpec(name=name, base_url=url, model=name, tier=tier, timeout_s=timeout)


def test_prompts():
    right = teacher_messages("right", "How many?", "Step 1: x\n")[1]["content"]
    wrong = teacher_messages("wrong", "How many?", "Step 1: x\n")[1]["content"]
    assert "next single step of a correct solution" in right and "<partial>\nStep 1: x\n</partial>" in right
    assert "plausible but wrong" in wrong and "How many?" in wrong
    assert first_line("\n\n  Step 2: y  \nStep 3") == "Step 2: y" and first_line("") == ""


def test_weights_follow_rewards():
    ens = TeacherEnsemble([ep("a"), ep("b")], learning_rate=0.5, temperature=0.25, explore=0.1, seed=0)
    assert ens.weights() == pytest.approx({"a": 0.5, "b": 0.5})
    ens.record_reward("a", 1.0)  # score a = 0.5
    ens.record_reward("b", 0.0)
    # softmax([0.5, 0]/0.25) = [e^2, 1]/(e^2+1) = [0.8808, 0.1192]; mixed with 0.1 uniform
    w = ens.weights()
    assert w["a"] == pytest.approx(0.9 * 0.880797 + 0.05, abs=1e-5)
    assert w["b"] == pytest.approx(0.9 * 0.119203 + 0.05, abs=1e-5)
    picks = collections.Counter(ens.order()[0] for _ in range(2000))
    assert picks["a"] > picks["b"] > 0
    ens.record_reward("unknown", 1.0)  # ignored


def test_tiers_order_and_validation():
    ens = TeacherEnsemble([ep("a", "local"), ep("b", "free"), ep("c", "local")], seed=1)
    assert ens.tiers() == {"local": ["a", "c"], "free": ["b"]}
    assert set(ens.order()[:2]) == {"a", "c"} and ens.order()[2] == "b"
    with pytest.raises(ValueError):
        TeacherEnsemble([])
    with pytest.raises(ValueError):
        TeacherEnsemble([ep("a"), ep("a")])


async def test_failover_and_cooldown(scripted_server):
    url = scripted_server.v1
    scripted_server.set_rules([Rule(mode="error", status=500, model="bad")])
    ens = TeacherEnsemble(
        [ep("bad", url=url), ep("good", url=url)],
        explore=0.0,
        max_consecutive_failures=2,
        cooldown_s=60,
        seed=0,
    )
    ens.record_reward("bad", 5.0)  # make "bad" the favourite so it is tried first
    ens.record_reward("good", -5.0)
    async with LLMPool(retry=RetryPolicy(max_retries=0)) as pool:
        r1 = await ens.generate(pool, "right", "q", "", n=2, max_tokens=16, temperature=0.7)
        assert r1.teacher == "good" and len(r1.failed) == 1 and len(r1.completion.choices) == 2
        r2 = await ens.generate(pool, "wrong", "q", "", n=1, max_tokens=16, temperature=0.7)
        assert r2.teacher == "good" and len(r2.failed) == 1
        assert not ens.healthy("bad")  # two failures in a row: resting
        r3 = await ens.generate(pool, "right", "q", "", n=1, max_tokens=16, temperature=0.7)
        assert r3.teacher == "good" and r3.failed == []  # not asked while resting
    snap = ens.snapshot()
    assert snap["bad"]["failures"] == 2 and snap["good"]["requests"] == 3
    assert "(wrong)" in r2.completion.choices[0].text  # the scripted server saw the "wrong" prompt


async def test_all_failed(scripted_server):
    scripted_server.set_rules([Rule(mode="error", status=500)])
    ens = TeacherEnsemble([ep("x", url=scripted_server.v1), ep("y", url=scripted_server.v1)])
    async with LLMPool(retry=RetryPolicy(max_retries=0)) as pool:
        with pytest.raises(AllTeachersFailed):
            await ens.generate(pool, "right", "q", "", n=1, max_tokens=8, temperature=0.7)


def test_failures_lower_the_pick_weight_whatever_the_scores_and_answers_win_it_back():
    """Issue #18's case: the live teacher's steps earn negative values, the dead one earns none. A teacher not yet
    judged counts as average (not as 0, which would beat the live one's negative score), and every failure
    halves its weight's health factor 1 - f, down to min_health."""
    ens = TeacherEnsemble(
        [ep("dead"), ep("live")], learning_rate=0.5, explore=0.1, min_health=0.02, cooldown_s=0, seed=0
    )
    for _ in range(3):
        ens.record_reward("live", -1.0)
    assert ens.weights() == pytest.approx({"dead": 0.5, "live": 0.5})
    timeout = LLMError("dead", None, "timed out", kind="timeout")
    seen = []
    for _ in range(8):
        ens.record_failure("dead", timeout)
        seen.append(ens.weights()["dead"])
    # q = 0.5 each, so p_dead = h / (h + 1) with h = 1 - f = 0.5^k, floored at 0.02
    expected = [max(0.5**k, 0.02) / (max(0.5**k, 0.02) + 1) for k in range(1, 9)]
    assert seen == pytest.approx(expected)
    picks = collections.Counter(ens.order()[0] for _ in range(4000))
    assert 0.01 < picks["dead"] / 4000 < 0.035  # still tried now and then, to see it recover
    for _ in range(3):
        ens.record_success("dead")
    assert ens.states["dead"].failure_rate == pytest.approx(0.5**3 * (1 - 0.5**8), abs=1e-9)
    assert ens.weights()["dead"] > 0.45
    snap = ens.snapshot()["dead"]
    assert snap["failures"] == 8 and snap["last_error"] == "timeout" and snap["healthy"]


def test_rests_double_while_a_teacher_keeps_failing():
    ens = TeacherEnsemble([ep("a"), ep("b")], max_consecutive_failures=2, cooldown_s=10, max_cooldown_s=25)
    error = LLMError("a", 503, "overloaded", kind="http_503")
    rests = []
    for _ in range(4):
        ens.record_failure("a", error)
        ens.record_failure("a", error)  # resting now; a failure while resting does not extend the rest
        ens.record_failure("a", error)
        rests.append(ens.snapshot()["a"]["resting_s"])
        ens.states["a"].resting_until = 0.0  # the rest is over; it is asked again and fails again
    assert [round(r) for r in rests] == [10, 20, 25, 25]
    ens.record_success("a")
    ens.record_failure("a", error)
    ens.record_failure("a", error)
    assert round(ens.snapshot()["a"]["resting_s"]) == 10  # an answer in between: back to the first rest
