"""Atomic checkpoint files: round trip, replacement, and refusal of partial or corrupt ones."""

import json

import pytest

torch = pytest.importorskip("torch")

from services.trainer import checkpoints as ckpt


def sample_state():
    adapter = {"layer.lora_A.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 3)}},
        "param_groups": [{"lr": 1e-5, "params": [0]}],
    }
    return adapter, optimizer


def test_round_trip_and_listing(tmp_path):
    adapter, optimizer = sample_state()
    path = ckpt.save_checkpoint(
        tmp_path, "c1", adapter, optimizer, {"step": 3, "adapter_version": 3, "step_key": "k3"}
    )
    assert path == tmp_path / "c1"
    loaded = ckpt.load_checkpoint(tmp_path, "c1")
    assert torch.equal(loaded.adapter["layer.lora_A.weight"], adapter["layer.lora_A.weight"])
    assert torch.equal(loaded.optimizer["state"][0]["exp_avg"], optimizer["state"][0]["exp_avg"])
    assert (
        loaded.meta["step"] == 3 and loaded.meta["adapter_version"] == 3 and loaded.meta["step_key"] == "k3"
    )
    assert [c["name"] for c in ckpt.list_checkpoints(tmp_path)] == ["c1"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_saving_again_replaces_the_whole_checkpoint(tmp_path):
    adapter, optimizer = sample_state()
    ckpt.save_checkpoint(tmp_path, "c", adapter, optimizer, {"step": 1, "adapter_version": 1})
    ckpt.save_checkpoint(tmp_path, "c", {"x": torch.zeros(1)}, optimizer, {"step": 2, "adapter_version": 2})
    loaded = ckpt.load_checkpoint(tmp_path, "c")
    assert set(loaded.adapter) == {"x"} and loaded.meta["step"] == 2


@pytest.mark.parametrize(
    "damage", ["truncate_adapter", "flip_optimizer", "drop_meta", "garbage_meta", "drop_adapter"]
)
def test_damaged_checkpoints_are_refused_with_a_clear_error(tmp_path, damage):
    adapter, optimizer = sample_state()
    path = ckpt.save_checkpoint(tmp_path, "c", adapter, optimizer, {"step": 1, "adapter_version": 1})
    if damage == "truncate_adapter":
        data = (path / "adapter.safetensors").read_bytes()
        (path / "adapter.safetensors").write_bytes(data[:-10])
    elif damage == "flip_optimizer":
        data = bytearray((path / "optimizer.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (path / "optimizer.pt").write_bytes(bytes(data))
    elif damage == "drop_meta":
        (path / "meta.json").unlink()
    elif damage == "garbage_meta":
        (path / "meta.json").write_text("{not json")
    else:
        (path / "adapter.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointCorrupt, match="checkpoint c"):
        ckpt.load_checkpoint(tmp_path, "c")
    if damage in ("drop_meta", "garbage_meta"):
        assert ckpt.list_checkpoints(tmp_path) == []


def test_missing_checkpoint_and_bad_names(tmp_path):
    with pytest.raises(ckpt.CheckpointNotFound):
        ckpt.load_checkpoint(tmp_path, "nothing")
    for name in ["../up", "", ".hidden", "a/b"]:
        with pytest.raises(ValueError, match="name"):
            ckpt.check_name(name)


def test_meta_records_sizes_and_hashes(tmp_path):
    adapter, optimizer = sample_state()
    path = ckpt.save_checkpoint(tmp_path, "c", adapter, optimizer, {"step": 0, "adapter_version": 0})
    meta = json.loads((path / "meta.json").read_text())
    assert meta["files"]["adapter.safetensors"]["bytes"] == (path / "adapter.safetensors").stat().st_size
    assert len(meta["files"]["optimizer.pt"]["sha256"]) == 64


# --- crashes and full disks during a save -------------------------------------------------------------------
CRASH_POINTS = [
    ("write_synced", 0, "half"),  # killed halfway through writing the adapter file
    ("write_synced", 1, "after"),  # adapter written
    ("write_synced", 2, "after"),  # optimizer written
    ("write_synced", 3, "after"),  # meta written, temporary directory not yet synced
    ("fsync_dir", 1, "after"),  # temporary directory synced, not yet renamed
    ("replace", 1, "after"),  # the old checkpoint moved aside, the new one not yet in place
    ("replace", 2, "after"),  # the new one in place, the old copy not yet removed
]


def _save_and_die(root, where: str, nth: int, how: str) -> None:
    """In a forked child: save checkpoint "c" (step 2) over the existing one and SIGKILL ourselves at a point."""
    import os
    import signal

    calls = 0
    target = ckpt.os if where == "replace" else ckpt
    original = getattr(target, where)

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def wrapped(*args, **kwargs):
        nonlocal calls
        calls += 1
        if how == "half" and calls == 1:
            path, data = args
            with open(path, "wb") as handle:
                handle.write(data[: len(data) // 2])
            die()
        result = original(*args, **kwargs)
        if calls == nth:
            die()
        return result

    setattr(target, where, wrapped)
    ckpt._PROCESS_TOKEN = "deadbeef"  # a process of its own (a forked child inherits the parent's token)
    adapter, optimizer = sample_state()
    adapter = {k: v + 1 for k, v in adapter.items()}
    ckpt.save_checkpoint(root, "c", adapter, optimizer, {"step": 2, "adapter_version": 2})
    os._exit(3)  # not reached when the kill came


@pytest.mark.parametrize("where,nth,how", CRASH_POINTS)
def test_a_save_killed_at_any_point_leaves_a_loadable_checkpoint(tmp_path, where, nth, how):
    import hashlib
    import multiprocessing

    adapter, optimizer = sample_state()
    ckpt.save_checkpoint(tmp_path, "c", adapter, optimizer, {"step": 1, "adapter_version": 1})
    child = multiprocessing.get_context("fork").Process(
        target=_save_and_die, args=(tmp_path, where, nth, how)
    )
    child.start()
    child.join(60)
    assert child.exitcode == -9  # SIGKILL at the chosen point, as kill -9 would

    assert [c["name"] for c in ckpt.list_checkpoints(tmp_path)] == ["c"]  # recovered if it was moved aside
    loaded = ckpt.load_checkpoint(tmp_path, "c")
    new = where == "replace" and nth == 2  # only a crash after the final rename may show the new one
    assert loaded.meta["step"] == (2 if new else 1)
    expected = adapter["layer.lora_A.weight"] + (1 if new else 0)
    assert torch.equal(loaded.adapter["layer.lora_A.weight"], expected)
    for file, record in loaded.meta["files"].items():
        assert hashlib.sha256((tmp_path / "c" / file).read_bytes()).hexdigest() == record["sha256"]
    assert not [
        p.name for p in tmp_path.iterdir() if p.name.startswith(".")
    ]  # aside and temporary dirs removed


def test_a_write_error_names_the_cause_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    adapter, optimizer = sample_state()
    ckpt.save_checkpoint(tmp_path, "c", adapter, optimizer, {"step": 1, "adapter_version": 1})

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "write_synced", full)
    with pytest.raises(ckpt.CheckpointWriteError, match="checkpoint c: no space left") as raised:
        ckpt.save_checkpoint(
            tmp_path, "c", {"x": torch.zeros(1)}, optimizer, {"step": 2, "adapter_version": 2}
        )
    assert raised.value.out_of_space
    monkeypatch.undo()
    assert ckpt.load_checkpoint(tmp_path, "c").meta["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary directory is removed


def test_retention_on_disk_keeps_the_last_k_refuses_past_the_budget_and_deletes(tmp_path):
    from services.trainer.checkpoint_retention import CheckpointRoomError, RetentionPolicy

    adapter, optimizer = sample_state()
    size = None
    policy = RetentionPolicy(keep_last=2, max_bytes=None, min_free_bytes=0)
    for step in range(5):
        saved = ckpt.save_retained(
            tmp_path, f"job-step{step:06d}", adapter, optimizer, {"step": step}, policy
        )
        size = saved.bytes
        assert saved.pruned == ([f"job-step{step - 2:06d}"] if step >= 2 else [])
    assert [c["name"] for c in ckpt.list_checkpoints(tmp_path)] == ["job-step000003", "job-step000004"]
    assert ckpt.load_checkpoint(tmp_path, "job-step000004").meta["step"] == 4
    # A budget of three checkpoints: one named fits, the second is refused before anything is written.
    assert size is not None
    policy = RetentionPolicy(keep_last=2, max_bytes=3 * size + 512, min_free_bytes=0)
    ckpt.save_retained(tmp_path, "best", adapter, optimizer, {"step": 4}, policy)
    with pytest.raises(CheckpointRoomError) as refused:
        ckpt.save_retained(tmp_path, "second", adapter, optimizer, {"step": 4}, policy)
    assert refused.value.status == 507 and "DELETE /checkpoints" in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "job-step000003", "job-step000004"]
    # The job's series still rolls on inside the budget; deleting a named one makes room for another.
    ckpt.save_retained(tmp_path, "job-step000005", adapter, optimizer, {"step": 5}, policy)
    assert abs(ckpt.delete_checkpoint(tmp_path, "best") - size) < 64  # the meta records differ a little
    ckpt.save_retained(tmp_path, "second", adapter, optimizer, {"step": 5}, policy)
    assert [c["name"] for c in ckpt.list_checkpoints(tmp_path)] == [
        "job-step000004",
        "job-step000005",
        "second",
    ]
    assert all(abs(c["bytes"] - size) < 64 for c in ckpt.list_checkpoints(tmp_path))
    with pytest.raises(ckpt.CheckpointNotFound):
        ckpt.delete_checkpoint(tmp_path, "best")
    # A deletion a crash cut short (renamed aside, not yet removed) is neither listed nor left behind.
    aside = tmp_path / ".second.del-crashed"
    aside.mkdir()
    (tmp_path / "second").rename(aside / "second")
    assert [c["name"] for c in ckpt.list_checkpoints(tmp_path)] == ["job-step000004", "job-step000005"]
    assert not aside.exists()
