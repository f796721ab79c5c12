"""A storm of concurrent completions against a real trainer with TRAINER_MAX_REQUESTS_IN_FLIGHT=2: the ones past the
limit get 429 with Retry-After at once (nothing waits without bound), /health answers throughout, and the count is
given back after every answer, errors included, so the limit never leaks."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest

from support.trainer_process import TrainerProcess

pytestmark = pytest.mark.integration

LIMIT = 2
STORM = 12
# 4 samples of 16 tokens: about a second or more on 2 cores, while the whole storm arrives within milliseconds.
BODY = {"model": "student", "prompt": "Question: what is 2 + 3?\nAnswer:", "n": 4, "max_tokens": 16}


@pytest.fixture(scope="module")
def trainer(trainer_model_dir, tmp_path_factory):
    env = {"TRAINER_MAX_REQUESTS_IN_FLIGHT": str(LIMIT)}
    with TrainerProcess(checkpoint_dir=tmp_path_factory.mktemp("load-ckpt"), env=env) as process:
        yield process


async def concurrent(url: str, bodies: list[dict]) -> tuple[list[httpx.Response], int]:
    """POST every body at once; meanwhile /health is asked once (it is never limited)."""
    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)
    ) as client:
        posts = [client.post("/v1/completions", json=b) for b in bodies]
        *responses, health = await asyncio.gather(*posts, client.get("/health"))
    return responses, health.status_code


def test_completions_past_the_in_flight_limit_get_429_and_the_limit_never_leaks(trainer):
    responses, health = asyncio.run(concurrent(trainer.url, [BODY] * STORM))
    codes = Counter(r.status_code for r in responses)
    assert set(codes) <= {200, 429} and codes[429] >= 1 and codes[200] >= LIMIT, codes
    assert health == 200
    for response in responses:
        if response.status_code == 429:
            assert response.headers["Retry-After"] == "1"
            assert "TRAINER_MAX_REQUESTS_IN_FLIGHT" in response.json()["error"]["message"]
        else:
            assert len(response.json()["choices"]) == 4

    # Refused, failed and invalid requests all give their place back: LIMIT requests at once are then all served.
    invalid = [{**BODY, "n": 0}, {**BODY, "model": "gpt"}, {**BODY, "max_tokens": 100000}]
    assert {r.status_code for r in asyncio.run(concurrent(trainer.url, invalid * 3))[0]} <= {400, 422, 429}
    served, _ = asyncio.run(concurrent(trainer.url, [BODY] * LIMIT))
    assert [r.status_code for r in served] == [200] * LIMIT
