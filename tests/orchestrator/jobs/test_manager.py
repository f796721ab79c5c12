"""The job state machine with small in-process runners (the real loops run in the integration tests)."""

import asyncio

import pytest

from orchestrator.jobs.manager import JobManager, JobStateError
from orchestrator.jobs.store import JobStore
from orchestrator.settings import Settings


async def finishing(ctx):
    await ctx.set_progress(done=1)
    return {"answer": 42}


async def failing(ctx):
    raise RuntimeError("boom")


async def waiting_forever(ctx):
    await ctx.emit("started")
    await asyncio.Event().wait()


@pytest.fixture
async def make_manager(tmp_path):
    managers = []

    async def make(runner, **settings):
        manager = JobManager(
            Settings(data_dir=tmp_path, **settings), runners={"train": runner, "eval": runner}
        )
        await manager.start()
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        if not manager._closing:
            await manager.close()


async def statuses(manager, job_id):
    return [
        e.data["status"] async for e in manager.hub.follow(job_id) if e is not None and e.type == "status"
    ]


async def test_completed_job_keeps_its_result_and_events(make_manager):
    manager = await make_manager(finishing)
    job = await manager.submit("eval", {"n": 1})
    job = await manager.wait(job.id)
    assert job.status == "completed" and job.result == {"answer": 42} and job.progress == {"done": 1}
    assert await statuses(manager, job.id) == ["queued", "running", "completed"]
    with pytest.raises(JobStateError):
        await manager.resume(job.id)


async def test_failed_job_records_the_error_and_can_be_resumed(make_manager):
    manager = await make_manager(failing)
    job = await manager.wait((await manager.submit("train", {})).id)
    assert job.status == "failed" and "boom" in job.error
    manager._runners = {"train": finishing}
    job = await manager.wait((await manager.resume(job.id)).id)
    assert job.status == "completed" and job.error is None


async def test_cancel_a_running_job(make_manager):
    manager = await make_manager(waiting_forever)
    job = await manager.submit("train", {})
    async for event in manager.hub.follow(job.id):
        if event is not None and event.type == "started":
            break
    job = await manager.cancel(job.id)
    assert job.status == "cancelled"
    with pytest.raises(JobStateError):
        await manager.cancel(job.id)


async def test_jobs_beyond_the_limit_wait_queued(make_manager):
    manager = await make_manager(waiting_forever, max_concurrent_jobs=1)
    first = await manager.submit("train", {})
    second = await manager.submit("train", {})
    async for event in manager.hub.follow(first.id):
        if event is not None and event.type == "started":
            break
    assert (await manager.get(second.id)).status == "queued"
    await manager.cancel(first.id)
    async for event in manager.hub.follow(second.id):
        if event is not None and event.type == "started":
            break
    assert (await manager.get(second.id)).status == "running"


async def test_shutdown_interrupts_and_a_new_manager_resumes(make_manager, tmp_path):
    manager = await make_manager(waiting_forever)
    job = await manager.submit("train", {})
    async for event in manager.hub.follow(job.id):
        if event is not None and event.type == "started":
            break
    await manager.close()
    store = JobStore(tmp_path / "jobs.sqlite")
    assert store.get_job(job.id).status == "interrupted"
    store.close()
    again = await make_manager(finishing)
    job = await again.wait((await again.resume(job.id)).id)
    assert job.status == "completed"
    assert (await statuses(again, job.id))[-4:] == ["interrupted", "queued", "running", "completed"]


async def test_concurrent_submits_past_running_plus_queued_limit_raise_jobs_busy(make_manager):
    from orchestrator.jobs.manager import JobsBusy

    manager = await make_manager(waiting_forever, max_concurrent_jobs=1, max_queued_jobs=2)
    outcomes = await asyncio.gather(*(manager.submit("eval", {}) for _ in range(6)), return_exceptions=True)
    accepted = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(accepted) == 3 and all(isinstance(o, JobsBusy) for o in outcomes if o not in accepted)
    assert len(await manager.list()) == 3
    await manager.cancel(accepted[0].id)
    assert (await manager.submit("eval", {})).status == "queued"  # a freed place is taken again


async def test_train_jobs_run_one_at_a_time_while_evals_run_beside_them(make_manager):
    """MAX_CONCURRENT_JOBS=3: of two train jobs and one eval, the eval runs beside the first train job and the
    second train job waits queued until the first ends (two would rewind one trainer under each other)."""
    running: set[str] = set()
    seen_together: list[set[str]] = []
    release = asyncio.Event()

    async def recording(ctx):
        running.add(ctx.job_id)
        seen_together.append(set(running))
        await ctx.emit("started")
        await release.wait()
        running.discard(ctx.job_id)
        return {}

    manager = await make_manager(recording, max_concurrent_jobs=3)
    first = await manager.submit("train", {})
    second = await manager.submit("train", {})
    evaluation = await manager.submit("eval", {})
    for job_id in (first.id, evaluation.id):
        async for event in manager.hub.follow(job_id):
            if event is not None and event.type == "started":
                break
    assert (await manager.get(second.id)).status == "queued"
    assert running == {first.id, evaluation.id}
    release.set()
    assert [(await manager.wait(j.id)).status for j in (first, second, evaluation)] == ["completed"] * 3
    assert all(
        {first.id, second.id} - together for together in seen_together
    )  # never both train jobs at once


async def writing_a_file(ctx):
    ctx.path("trees", "000000.json").write_text("{}")
    return {"ok": True}


async def test_retention_deletes_finished_jobs_past_the_count_with_their_files(make_manager, tmp_path):
    manager = await make_manager(writing_a_file, job_retention_count=2)
    ids = []
    for _ in range(4):
        ids.append((await manager.submit("eval", {})).id)
        await manager.wait(ids[-1])
    manager._runners = {"eval": failing, "train": waiting_forever}
    failed = (await manager.submit("eval", {})).id
    await manager.wait(failed)
    running = (await manager.submit("train", {})).id
    kept = {job.id for job in await manager.list()}
    # the newest two finished (the failed one among them) stay, and the running one; the rest went with their files
    assert kept == {ids[-1], failed, running}, kept
    assert not manager.job_dir(ids[0]).exists() and manager.job_dir(ids[-1]).is_dir()
    assert await manager.store.events_after(ids[0]) == [] and await manager.store.steps(ids[0]) == []
    await manager.cancel(running)
    assert {job.id for job in await manager.list()} == {failed, running}


async def test_retention_by_age_runs_at_start_up(tmp_path):
    settings = Settings(data_dir=tmp_path, job_retention_count=0, job_retention_days=1)
    store = JobStore(settings.resolved_db_path)
    store.create_job("eval-old", "eval", {}, status="completed")
    store.create_job("eval-new", "eval", {}, status="failed")
    store.create_job("train-stopped", "train", {}, status="interrupted")
    store._db.execute("UPDATE jobs SET updated = updated - 2 * 86400 WHERE id != 'eval-new'")
    (settings.data_dir / "jobs" / "eval-old").mkdir(parents=True)
    manager = JobManager(settings, store=store, runners={})
    await manager.start()
    try:
        assert {job.id for job in await manager.list()} == {"eval-new", "train-stopped"}
        assert not (settings.data_dir / "jobs" / "eval-old").exists()
    finally:
        await manager.close()
