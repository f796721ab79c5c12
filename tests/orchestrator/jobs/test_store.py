import pytest

from orchestrator.jobs.store import JobStore


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite")
    yield s
    s.close()


def test_job_roundtrip_and_merged_updates(store):
    store.create_job("train-1", "train", {"num_examples": 2})
    store.update_job("train-1", status="running", progress={"step": 1}, metrics={"kl": 0.1})
    store.update_job("train-1", progress={"total_steps": 3})
    job = store.get_job("train-1")
    assert job.status == "running"
    assert job.request == {"num_examples": 2}
    assert job.progress == {"step": 1, "total_steps": 3}
    assert job.metrics == {"kl": 0.1}
    assert store.get_job("nope") is None
    with pytest.raises(ValueError):
        store.update_job("train-1", status="exploded")
    with pytest.raises(KeyError):
        store.update_job("nope", status="failed")


def test_reopening_marks_running_jobs_interrupted(tmp_path):
    path = tmp_path / "jobs.sqlite"
    first = JobStore(path)
    first.create_job("a", "train", {}, status="running")
    first.create_job("b", "eval", {}, status="completed")
    first.create_job("c", "eval", {}, status="queued")
    first.close()
    second = JobStore(path)
    assert sorted(second.mark_interrupted()) == ["a", "c"]
    assert second.get_job("a").status == "interrupted"
    assert second.get_job("b").status == "completed"
    assert second.count_by_status() == {"interrupted": 2, "completed": 1}
    second.close()


def test_events_replay_after_a_sequence_number(store):
    store.create_job("j", "eval", {})
    seqs = [store.append_event("j", "progress", {"done": i}).seq for i in range(5)]
    assert seqs == sorted(seqs)
    replay = store.events_after("j", seqs[1])
    assert [e.data["done"] for e in replay] == [2, 3, 4]
    assert store.events_after("other") == []


def test_steps_are_recorded_once_and_dropped_past_a_checkpoint(store):
    store.create_job("j", "train", {})
    for step in (1, 2, 3):
        store.record_step("j", step, {"kl": step / 10})
    store.record_step("j", 2, {"kl": 0.25})  # a step run again replaces its record
    assert [(s["step"], s["kl"]) for s in store.steps("j")] == [(1, 0.1), (2, 0.25), (3, 0.3)]
    assert store.drop_steps_after("j", 1) == 2
    assert [s["step"] for s in store.steps("j")] == [1]


def test_list_jobs_newest_first_with_filters(store):
    store.create_job("t", "train", {})
    store.create_job("e", "eval", {}, status="completed")
    assert [j.id for j in store.list_jobs()] == ["e", "t"]
    assert [j.id for j in store.list_jobs(kind="train")] == ["t"]
    assert [j.id for j in store.list_jobs(status="completed")] == ["e"]
