"""The real trainer service writing the adapter of every version for a student server (TRAINER_ADAPTER_EXPORT_DIR):
where /health and /grpo/step say it is, what a retried step and a checkpoint load write, and that peft reads it
back to the trainer's own log-probs with the real tiny model's weights."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from support.trainer_process import TrainerProcess

pytestmark = pytest.mark.integration

PROMPT = "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"
COMPLETION = " He has 3 + 4 = 7 apples.\n#### 7"


@pytest.fixture(scope="module")
def exporting_trainer(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    env = {"TRAINER_ADAPTER_EXPORT_DIR": str(root / "adapters"), "TRAINER_ADAPTER_EXPORT_KEEP": "2"}
    with TrainerProcess(checkpoint_dir=root / "ckpt", env=env) as trainer:
        yield trainer, root / "adapters"


def post(client: httpx.Client, path: str, body: dict) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def step(client: httpx.Client, key: str) -> dict:
    item = {"prompt": PROMPT, "completion": COMPLETION, "advantage": 1.0}
    return post(client, "/grpo/step", {"items": [item], "loss": {"learning_rate": 1e-3}, "step_key": key})


def test_every_version_is_written_where_the_trainer_says(exporting_trainer, trainer_model_dir):
    trainer, root = exporting_trainer
    with httpx.Client(base_url=trainer.url, timeout=300) as client:
        health = client.get("/health").json()
        assert health["adapter_version"] == 0
        v0 = Path(health["adapter_path"])
        assert v0.parent == root and v0.name.startswith("v000000-") and v0.is_dir()

        first = step(client, "job:1")
        v1 = Path(first["adapter_path"])
        assert first["adapter_version"] == 1 and v1.name.startswith("v000001-") and v1.is_dir()
        assert client.get("/health").json()["adapter_path"] == str(v1)
        retried = step(client, "job:1")  # answered from memory: same version, same directory
        assert retried["duplicate"] and retried["adapter_path"] == str(v1)

        checkpoint = post(client, "/checkpoints", {"name": "at-v1"})
        assert checkpoint["adapter_version"] == 1
        v2 = Path(step(client, "job:2")["adapter_path"])
        assert v2.name.startswith("v000002-")
        assert sorted(p.name for p in root.iterdir()) == sorted([v1.name, v2.name])  # keep 2: v0 deleted

        # Back to version 1: the same weights, so the same directory (a student server may have it loaded).
        post(client, "/checkpoints/load", {"name": "at-v1"})
        health = client.get("/health").json()
        assert health["adapter_version"] == 1 and health["adapter_path"] == str(v1)

        # peft reads version 1 back onto the real base weights: the trainer's own log-probs.
        scored = post(client, "/logprobs", {"items": [{"prompt": PROMPT, "completion": COMPLETION}]})
    trained = scored["results"][0]["token_logprobs"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(trainer_model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(trainer_model_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(v1)).eval()
    context = tokenizer(PROMPT).input_ids
    completion = tokenizer(COMPLETION, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([context + completion])).logits[0].float()
    logp = torch.log_softmax(logits, -1)[len(context) - 1 : -1].gather(-1, torch.tensor(completion)[:, None])
    assert logp.flatten().tolist() == pytest.approx(trained, abs=2e-4)
    with torch.no_grad(), model.disable_adapter():
        plain = torch.log_softmax(model(torch.tensor([context + completion])).logits[0].float(), -1)
    untrained = plain[len(context) - 1 : -1].gather(-1, torch.tensor(completion)[:, None]).flatten()
    assert sum(trained) > float(untrained.sum()) + 0.1  # the step moved the completion up: a real adapter
