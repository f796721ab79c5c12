"""The adapter of each version as a PEFT directory (adapter_export.py), on a tiny randomly initialised student."""

import copy
import errno
import json

import pytest

torch = pytest.importorskip("torch")

from services.protocol import LossSettings
from services.trainer import adapter_export
from services.trainer.adapter_export import AdapterExporter, AdapterExportError
from services.trainer.items import GrpoItem, ScoreItem
from support.tiny_student import make_student


@pytest.fixture
def trained(tiny_random_model_dir, tmp_path):
    """A student one step away from its fresh adapter (so the export is not all zeros)."""
    student = make_student(tiny_random_model_dir, tmp_path)
    student.grpo_step([GrpoItem([5, 6, 7], [8, 9, 10], advantage=1.0)], LossSettings(learning_rate=1e-2))
    return student


def test_the_export_loads_in_peft_and_gives_the_trainers_own_log_probs(trained, tmp_path):
    from peft import PeftModel

    exporter = AdapterExporter(tmp_path / "adapters", keep=2)
    path = exporter.export(trained.adapter_version, trained.adapter_state(), trained.adapter_config())
    assert path.name.startswith("v000001-") and path.parent == tmp_path / "adapters"
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert config["inference_mode"] is True

    # The same base weights with the adapter read back from disk, and nothing else of the trainer.
    base = copy.deepcopy(trained.model).unload()
    loaded = PeftModel.from_pretrained(base, str(path)).eval()
    context, completion = [5, 6, 7, 11], [8, 9, 10, 12]
    with torch.no_grad():
        logits = loaded(torch.tensor([context + completion])).logits[0].float()
    logp = torch.log_softmax(logits, -1)[len(context) - 1 : -1].gather(-1, torch.tensor(completion)[:, None])
    own = trained.logprobs([ScoreItem(context, completion)])[0]
    assert logp.flatten().tolist() == pytest.approx(own, abs=1e-5)
    base_only = trained.logprobs([ScoreItem(context, completion)], use_adapter=False)[0]
    assert max(abs(a - b) for a, b in zip(own, base_only, strict=True)) > 1e-4  # the adapter matters here


def test_versions_are_kept_newest_first_and_a_path_never_names_two_adapters(trained, tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    (root / ".export-tmp-dead").mkdir()  # what a process killed while writing leaves
    exporter = AdapterExporter(root, keep=3)
    assert not list(root.iterdir())
    state, config = trained.adapter_state(), trained.adapter_config()
    paths = []
    for version in range(5):
        state = {k: v + 0.01 for k, v in state.items()}  # every version its own weights
        paths.append(exporter.export(version, state, config))
    assert [p.name[:7] for p in exporter.exported()] == ["v000002", "v000003", "v000004"]
    assert not paths[0].exists() and not paths[1].exists()

    # The same version number with other weights (after a checkpoint load): another directory.
    other = exporter.export(4, {k: v + 0.5 for k, v in state.items()}, config)
    assert other != paths[4] and other.name.startswith("v000004-")
    # The same weights again: the same directory, now the newest, so it is kept.
    again = exporter.export(4, state, config)
    assert again == paths[4]
    assert exporter.exported()[-1] == again and len(exporter.exported()) == 3


def test_a_write_error_names_the_cause_and_leaves_the_exported_versions(trained, tmp_path, monkeypatch):
    exporter = AdapterExporter(tmp_path, keep=2)
    first = exporter.export(0, trained.adapter_state(), trained.adapter_config())

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapter_export.os, "replace", full)
    with pytest.raises(AdapterExportError, match=r"adapter version 1: .*no space left") as raised:
        exporter.export(1, {k: v + 1 for k, v in trained.adapter_state().items()}, trained.adapter_config())
    assert raised.value.status == 507
    monkeypatch.undo()
    assert exporter.exported() == [first]
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary directory left
