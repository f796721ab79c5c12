import asyncio

import pytest

from orchestrator.clients.llm import RetryPolicy
from orchestrator.clients.trainer import TrainerClient, TrainerError
from orchestrator.search.scoring import ScoreBatcher
from support.scripted_server import Rule, token_logprobs


def scoring_items(*completions):
    return [{"messages": [{"role": "user", "content": "q"}], "completion": c} for c in completions]


def mean_logprob(text):  # the scripted server's deterministic score of `text` for model "student"
    lps = token_logprobs(text, "student")
    return sum(lps) / len(lps)


async def test_score_batcher_merges_the_calls_of_one_loop_turn(scripted_server):
    async with TrainerClient(scripted_server.url, retry=RetryPolicy(max_retries=0)) as trainer:
        scorer = ScoreBatcher(trainer, max_items=3)
        calls = [scoring_items("a b", "c"), scoring_items("d e f"), scoring_items("g", "h i")]
        got = await asyncio.gather(*(scorer.score(items) for items in calls))
        # 2 + 1 items fit in one request of at most 3; the third call's 2 items go in a second request
        sent = [len(e["payload"]["items"]) for e in scripted_server.log if e["path"] == "/logprobs"]
        assert sent == [3, 2] and (scorer.calls, scorer.requests) == (3, 2)
        for items, results in zip(calls, got, strict=True):  # every caller gets its own results, in order
            assert [r.mean for r in results] == pytest.approx([mean_logprob(i["completion"]) for i in items])
        alone = await scorer.score(scoring_items("j"))  # a lone call is sent on the next turn
        assert alone[0].mean == pytest.approx(mean_logprob("j")) and scorer.requests == 3


async def test_score_batcher_failure_reaches_every_caller(scripted_server):
    scripted_server.set_rules([Rule(mode="error", status=500, path="/logprobs")])
    async with TrainerClient(scripted_server.url, retry=RetryPolicy(max_retries=0)) as trainer:
        scorer = ScoreBatcher(trainer)
        got = await asyncio.gather(
            scorer.score(scoring_items("a")), scorer.score(scoring_items("b")), return_exceptions=True
        )
    assert all(isinstance(g, TrainerError) and g.status == 500 for g in got)
    assert scripted_server.stats()["requests"]["/logprobs"] == 1


async def test_score_batcher_cancellation(scripted_server):
    scripted_server.set_rules([Rule(mode="ok", path="/logprobs", latency_ms=300)])
    async with TrainerClient(scripted_server.url, retry=RetryPolicy(max_retries=0)) as trainer:
        scorer = ScoreBatcher(trainer)
        first = asyncio.create_task(scorer.score(scoring_items("a")))
        second = asyncio.create_task(scorer.score(scoring_items("b c")))
        await asyncio.sleep(0.05)  # the merged request is in flight
        first.cancel()
        assert (await second)[0].mean == pytest.approx(mean_logprob("b c"))  # the other caller is served
        assert first.cancelled()
        both = [asyncio.create_task(scorer.score(scoring_items(x))) for x in "de"]
        await asyncio.sleep(0.05)
        for task in both:
            task.cancel()
        await asyncio.gather(*both, return_exceptions=True)
        await asyncio.sleep(0.01)
        assert not scorer._tasks  # nobody waits for it any more: the request was cancelled
    assert scorer.requests == 2


def test_score_batcher_after_a_loop_that_ended_before_its_flush(scripted_server):
    trainer = TrainerClient(scripted_server.url, retry=RetryPolicy(max_retries=0))
    scorer = ScoreBatcher(trainer)
    old = asyncio.new_event_loop()
    stale = old.create_task(scorer.score(scoring_items("a")))
    old.call_soon(old.stop)
    old.run_forever()  # one turn: the call is queued and its flush scheduled, then the loop stops
    stale.cancel()
    old.close()

    async def main():
        try:
            return await asyncio.wait_for(scorer.score(scoring_items("b c")), 10)
        finally:
            await trainer.aclose()

    assert asyncio.run(main())[0].mean == pytest.approx(mean_logprob("b c"))
    assert scorer.requests == 1 and scripted_server.stats()["requests"]["/logprobs"] == 1
