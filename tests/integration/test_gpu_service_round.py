"""bench/gpu_service.py's round (what bench/gpu_backends.sh runs per backend on the GPU) against the real trainer
app on CPU, with a tiny random Llama and bench/gpu_bench.py's word-level tokenizer: every stage runs and every
check holds, so a failure on the GPU is the backend's, not the script's. One broken route must show up as a failed
stage with its error, and the later stages must still run."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def word_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.gpu_bench import word_level_tokenizer

    target = tmp_path_factory.mktemp("word-model")
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        initializer_range=0.1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    word_level_tokenizer(config).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def client(word_model_dir, tmp_path_factory):
    from fastapi.testclient import TestClient

    from services.trainer.api import create_app
    from services.trainer.settings import TrainerSettings

    settings = TrainerSettings(
        model_source=str(word_model_dir),
        device="cpu",
        learning_rate=1e-3,
        max_context=512,
        checkpoint_dir=tmp_path_factory.mktemp("ckpt"),
        torch_threads=1,
    )
    with TestClient(create_app(settings)) as client:
        yield client


PROMPT = " ".join(f"<t{i}>" for i in range(10, 40))


def test_the_round_passes_on_the_real_service(client, word_model_dir):
    from bench.gpu_service import ServiceRound

    report = ServiceRound(client, PROMPT).run(ready_timeout=120)
    failed = {n: s["error"] for n, s in report["stages"].items() if not s["ok"]}
    assert not failed
    assert list(report["stages"]) == [
        "load",
        "generate",
        "greedy",
        "logprobs",
        "grpo_step",
        "logprobs_after",
        "grpo_step_2",
        "checkpoint_save",
        "grpo_step_3",
        "checkpoint_load",
    ]
    bad = {n: c["value"] for n, c in report["checks"].items() if not c["ok"]}
    assert not bad and report["passed"]
    # Every sampled completion carries the sampler's log-probs into the step, except one that sampled a special
    # token (a random model may): its text skips that token, so the text no longer has one token per log-prob.
    from transformers import AutoTokenizer

    specials = set(AutoTokenizer.from_pretrained(word_model_dir).all_special_tokens)
    choices = report["stages"]["generate"]["choices"]
    plain = sum(not specials & set(choice["tokens"]) for choice in choices)
    clip = next(n for n in report["checks"] if n.startswith("clip fraction"))
    assert plain >= len(choices) // 2 and f"({plain}/{len(choices)} items)" in clip, clip


def test_a_failing_stage_is_reported_and_the_round_goes_on(client):
    from bench.gpu_service import ServiceRound

    class RefusedSave(ServiceRound):
        def save(self, completions):  # a name the service refuses: the save stage fails with its 422
            return {"info": self.post("/checkpoints", {"name": "../escape"})}

    report = RefusedSave(client, PROMPT).run(ready_timeout=120)
    stage = report["stages"]["checkpoint_save"]
    assert not stage["ok"] and "422" in stage["error"] and "Traceback" in stage["traceback"]
    assert report["stages"]["grpo_step_3"]["ok"] and "checkpoint_load" not in report["stages"]
    assert not report["passed"]
