"""Loading (loading.py): the settings reach the backend, on a tiny randomly initialised model."""

import pytest

torch = pytest.importorskip("torch")


def test_lora_settings_reach_the_adapter(student):
    config = student.model.peft_config["default"]
    assert (config.r, config.lora_alpha) == (4, 8)
    assert set(config.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert student.trainable and all(
        "lora_" in n for n, p in student.model.named_parameters() if p.requires_grad
    )
