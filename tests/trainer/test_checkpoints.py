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
