"""A storm of concurrent POST /train and POST /eval against a real orchestrator (over the scripted server).

With MAX_CONCURRENT_JOBS=1 and MAX_QUEUED_JOBS=4 and one long job running, exactly four of the storm's requests are
queued and every other one gets 429 with Retry-After; nothing is stored for a refused request; a second storm
leaves the orchestrator's resident memory where the first left it (a refused request costs nothing that stays);
the accepted jobs can be cancelled and the freed places are given again. Bounded: 2 x 60 requests on loopback.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest

from orchestrator.local.processes import free_port, orchestrator_process
from support.scripted_server import ScriptedServer, ServerConfig

pytestmark = pytest.mark.integration

QUEUED = 4
STORM = 60  # requests per storm, all in flight at once
LONG_EVAL = {"num_examples": 40, "concurrency": 1, "max_tokens": 32}  # 80 answers at >= 300 ms each


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def mixed(count: int) -> list[tuple[str, dict]]:
    """Half /train, half /eval (they only queue behind the running job, so how long they would take is moot)."""
    train = ("/train", {"num_examples": 1, "search": {"iterations": 2}})
    return [train if i % 2 else ("/eval", {"num_examples": 2}) for i in range(count)]


async def storm(url: str, bodies: list[tuple[str, dict]]) -> list[httpx.Response]:
    count = len(bodies)
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post(route, json=body) for route, body in bodies))


@pytest.fixture(scope="module")
def scripted():
    with ScriptedServer(ServerConfig(answer="42", answer_depth=1, latency_ms=300)) as server:
        yield server


def test_a_storm_beyond_the_queue_limit_is_refused_with_429_and_leaves_nothing_behind(scripted, tmp_path):
    env = {"MAX_CONCURRENT_JOBS": "1", "MAX_QUEUED_JOBS": str(QUEUED)}
    with orchestrator_process(free_port(), scripted.url, tmp_path, env=env) as proc:
        proc.wait_ready(timeout_s=60)
        http = httpx.Client(base_url=proc.url, timeout=60)
        running = http.post("/eval", json=LONG_EVAL)
        assert running.status_code == 202
        running_id = running.json()["job_id"]
        while http.get(f"/jobs/{running_id}").json()["status"] != "running":
            time.sleep(0.1)

        first = asyncio.run(storm(proc.url, mixed(STORM)))
        codes = Counter(r.status_code for r in first)
        assert codes == {202: QUEUED, 429: STORM - QUEUED}, codes
        assert all(r.headers["Retry-After"].isdigit() for r in first if r.status_code == 429)
        accepted = [r.json()["job_id"] for r in first if r.status_code == 202]
        jobs = http.get("/jobs").json()["jobs"]
        assert sorted(j["id"] for j in jobs) == sorted(
            [running_id, *accepted]
        )  # nothing stored for the refused
        assert all(j["status"] == "queued" for j in jobs if j["id"] != running_id)

        rss_after_first = rss_bytes(proc.proc.pid)
        second = asyncio.run(storm(proc.url, mixed(STORM)))
        assert Counter(r.status_code for r in second) == {429: STORM}
        growth = rss_bytes(proc.proc.pid) - rss_after_first
        assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over {STORM} refused requests"
        assert http.get(f"/jobs/{running_id}").json()["status"] == "running"  # the running job went on

        for job_id in [*accepted, running_id]:  # every accepted job can be cancelled, queued or running
            cancelled = http.post(f"/jobs/{job_id}/cancel")
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        # Long jobs only, so none can finish (and free a place) while the storm is in flight: one runs, four queue.
        again = asyncio.run(storm(proc.url, [("/eval", LONG_EVAL)] * (QUEUED + 3)))
        assert Counter(r.status_code for r in again) == {202: QUEUED + 1, 429: 2}
        for response in again:
            if response.status_code == 202:
                assert http.post(f"/jobs/{response.json()['job_id']}/cancel").status_code in (200, 409)
        http.close()


def test_event_streams_past_the_limit_get_429_and_ended_ones_free_their_place(scripted, tmp_path):
    """MAX_EVENT_STREAMS=3: a fourth stream gets 429 while three follow a running job; once the job ends and the
    streams with it, their places are given again (twice over, so the count does not leak).

    The streams end with the job rather than by the client hanging up (that is the next test's subject)."""
    from contextlib import ExitStack

    env = {"MAX_EVENT_STREAMS": "3"}
    with orchestrator_process(free_port(), scripted.url, tmp_path, env=env) as proc:
        proc.wait_ready(timeout_s=60)
        http = httpx.Client(base_url=proc.url, timeout=60)
        for _ in range(2):
            job_id = http.post("/eval", json=LONG_EVAL).json()["job_id"]
            with ExitStack() as open_streams:
                streams = [
                    open_streams.enter_context(http.stream("GET", f"/jobs/{job_id}/events")) for _ in range(3)
                ]
                assert [s.status_code for s in streams] == [200] * 3
                refused = http.get(f"/jobs/{job_id}/events")
                assert refused.status_code == 429 and refused.headers["Retry-After"].isdigit()
                assert "MAX_EVENT_STREAMS" in refused.json()["detail"]
                assert http.get(f"/jobs/{job_id}").status_code == 200  # other routes are not limited
                assert http.post(f"/jobs/{job_id}/cancel").status_code == 200
                for stream in streams:  # each stream ends by itself with the job's final status
                    assert "cancelled" in stream.read().decode().split("event: status")[-1]
        # A Last-Event-ID that is not a plain number (a latin-1 digit, 5000 digits) replays from the start; these were
        # 500s (int() refuses both).
        for value in (b"\xb2", b"7" * 5000):
            replay = http.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": value})
            assert replay.status_code == 200 and replay.text.count("event: status") >= 3
        http.close()


def test_clients_hanging_up_on_event_streams_never_block_the_job(scripted, tmp_path):
    """Fifteen streams opened and dropped while their followers wait for news; the job still answers a cancel
    at once and ends. With followers waiting on an asyncio.Condition under wait_for, a cancelled follower could
    leave the condition's lock held, and every later status change of the job then blocked (5 of 18 runs hung)."""
    from contextlib import ExitStack

    with orchestrator_process(free_port(), scripted.url, tmp_path, env={}) as proc:
        proc.wait_ready(timeout_s=60)
        http = httpx.Client(base_url=proc.url, timeout=20)
        for _ in range(3):
            job_id = http.post("/eval", json=LONG_EVAL).json()["job_id"]
            for _ in range(5):
                with ExitStack() as open_streams:
                    for _ in range(3):
                        open_streams.enter_context(http.stream("GET", f"/jobs/{job_id}/events"))
                    time.sleep(0.3)  # let the followers reach their wait before the hang-up
            assert http.post(f"/jobs/{job_id}/cancel").status_code == 200
            deadline = time.monotonic() + 20
            while http.get(f"/jobs/{job_id}").json()["status"] != "cancelled":
                assert time.monotonic() < deadline, "the job's status never changed after the streams hung up"
                time.sleep(0.1)
        http.close()
