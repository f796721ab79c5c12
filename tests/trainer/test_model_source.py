"""Model preparation on local files: the shipped GGUF (converted once), HF directories, config-only
directories (random weights), and clear errors for missing or corrupt sources."""

import json
import shutil

import pytest

pytest.importorskip("transformers")

from services.trainer.loading import load_student
from services.trainer.model_source import ModelSourceError, convert_gguf, default_gguf, resolve_model
from services.trainer.settings import TrainerSettings


def test_default_gguf_is_converted_once_into_a_plain_hf_directory(trainer_model_dir):
    gguf = default_gguf()
    assert gguf.suffix == ".gguf"
    again = resolve_model(None, TrainerSettings().model_cache_dir)
    assert again.kind == "hf_dir" and again.path == str(trainer_model_dir)
    config = json.loads((trainer_model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (trainer_model_dir / "model.safetensors").is_file() and (
        trainer_model_dir / "tokenizer.json"
    ).is_file()
    # The cache is keyed by the file, and a complete entry is reused as it is.
    assert convert_gguf(gguf, trainer_model_dir.parent) == trainer_model_dir


def test_hf_directory_resolves_to_itself(trainer_model_dir):
    resolved = resolve_model(str(trainer_model_dir), trainer_model_dir.parent)
    assert (resolved.kind, resolved.path) == ("hf_dir", str(trainer_model_dir))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "absent.gguf", "GGUF file not found"),
        (lambda tmp: tmp / "no" / "such" / "dir", "not found"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "without config.json"),
    ],
)
def test_missing_sources_give_clear_errors(tmp_path, make, message):
    with pytest.raises(ModelSourceError, match=message):
        resolve_model(str(make(tmp_path)), tmp_path / "cache")


def test_corrupt_gguf_gives_a_clear_error_and_leaves_no_cache_entry(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelSourceError, match="cannot read GGUF"):
        resolve_model(str(bad), tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())


def test_corrupt_weights_in_an_hf_directory_give_a_clear_error(tmp_path, trainer_model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(trainer_model_dir, broken, ignore=shutil.ignore_patterns("model.safetensors"))
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelSourceError, match="cannot load"):
        load_student(TrainerSettings(model_source=str(broken), checkpoint_dir=tmp_path / "ckpt"))


def test_config_only_directory_gives_a_random_model(tiny_random_model_dir):
    assert resolve_model(str(tiny_random_model_dir), tiny_random_model_dir / "cache").kind == "random"
