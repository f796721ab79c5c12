"""The trainer service's CUDA path: 4-bit NF4 base + LoRA, bf16 compute, 8-bit AdamW, through either backend.

CUDA_TEST_BACKEND picks the backend the module runs (one per process: Unsloth patches transformers on import):
transformers (transformers + peft + bitsandbytes, the default) or unsloth. Runs only on a machine with a CUDA GPU
(the lent H100/H200: bench/RESULTS.md, bench/gpu_backends.sh runs it with both); skipped elsewhere. The model is a
tiny random Llama with a byte-level BPE tokenizer trained here, so nothing is downloaded; the routes are exercised
in-process through the real FastAPI app.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
BACKEND = os.environ.get("CUDA_TEST_BACKEND", "transformers")
assert BACKEND in ("transformers", "unsloth"), f"CUDA_TEST_BACKEND={BACKEND!r}: transformers or unsloth"

CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? #### 72",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "Solve step by step. End with a line '#### <number>'. The answer is 10.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_random_model(target: Path) -> Path:
    """A 2-layer random Llama (bf16 safetensors) with a 512-entry byte-level BPE tokenizer, saved to `target`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        CORPUS * 4,
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        # Larger than the usual 0.02, so the next-token distribution depends clearly on the context: a decode step
        # that lost its KV cache then shows in the log-probs (test_generation_agrees_with_scoring).
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def cuda_client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from services.trainer.api import create_app
    from services.trainer.settings import TrainerSettings

    if BACKEND == "unsloth":  # first, as in the service, where nothing imports transformers before the load
        import unsloth  # noqa: F401

    root = tmp_path_factory.mktemp("cuda_trainer")
    model_dir = write_tiny_random_model(root / "model")
    settings = TrainerSettings(
        model_source=str(model_dir),
        device="cuda",
        load_in_4bit=True,
        backend=BACKEND,
        learning_rate=1e-3,
        max_context=512,
        checkpoint_dir=root / "checkpoints",
        # in this process, so test_generation_agrees_with_scoring can reach the Student behind the app (the
        # engine process's CUDA path is what bench/gpu_serving.py serves)
        engine_process=False,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        deadline = time.time() + 300
        while time.time() < deadline:
            health = client.get("/health")
            if health.status_code == 200:
                break
            assert health.json().get("status") == "loading", health.text  # "error": the load failed
            time.sleep(0.5)
        else:
            pytest.fail("the trainer did not load within 300 s")
        yield client, app


ITEMS = [
    {
        "messages": [{"role": "user", "content": "How many clips did Natalia sell?"}],
        "completion": "She sold 48 + 24 = 72 clips.\n#### 72",
    },
    {"prompt": "Weng earns $12 an hour. ", "context": "She worked 50 minutes. ", "completion": "#### 10"},
]


def test_health_reports_the_cuda_backend(cuda_client):
    client, _ = cuda_client
    health = client.get("/health").json()
    assert health["status"] == "ok"
    assert health["device"].startswith("cuda")
    assert health["backend"] == BACKEND
    assert health["decode_dtype"] == "bfloat16"  # TRAINER_DECODE_DTYPE=auto on CUDA: the model's own, no cast


def test_student_is_4bit_nf4_with_bf16_compute_and_8bit_adamw(cuda_client):
    bnb = pytest.importorskip("bitsandbytes", reason="the 4-bit path needs bitsandbytes (carry its wheel)")
    _, app = cuda_client
    student = app.state.loader.engine.core.student
    quantised = [m for m in student.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised, "no bitsandbytes Linear4bit layer: the base is not 4-bit"
    assert all(m.weight.quant_state.quant_type == "nf4" for m in quantised)
    assert all(m.compute_dtype == torch.bfloat16 for m in quantised)
    assert any("lora_A" in name for name, p in student.model.named_parameters() if p.requires_grad)
    assert isinstance(student.optimizer, bnb.optim.AdamW8bit)
    assert all(p.device.type == "cuda" for p in student.trainable)


def test_completions_generate_on_cuda(cuda_client):
    client, _ = cuda_client
    response = client.post(
        "/v1/completions",
        json={
            "model": "student",
            "prompt": "Natalia sold",
            "max_tokens": 8,
            "n": 3,
            "temperature": 1.0,
            "seed": 7,
            "logprobs": 0,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["choices"]) == 3
    for choice in body["choices"]:
        assert choice["finish_reason"] in ("stop", "length")
        assert all(v <= 0.0 and math.isfinite(v) for v in choice["logprobs"]["token_logprobs"])
    assert body["usage"]["completion_tokens"] >= 3


def test_logprobs_then_grpo_step_moves_the_student_away_from_base(cuda_client):
    client, _ = cuda_client
    before = client.post("/logprobs", json={"model": "student", "items": ITEMS}).json()
    base = client.post("/logprobs", json={"model": "base", "items": ITEMS}).json()
    for got, ref in zip(before["results"], base["results"], strict=True):
        assert got["num_tokens"] == len(got["token_logprobs"]) > 0
        assert all(v <= 0.0 and math.isfinite(v) for v in got["token_logprobs"])
        if before["adapter_version"] == 0:  # LoRA B starts at zero: the student is the base
            assert got["token_logprobs"] == pytest.approx(ref["token_logprobs"], abs=2e-2)

    items = [{**item, "advantage": adv} for item, adv in zip(ITEMS, (1.0, -1.0), strict=True)]
    step = client.post(
        "/grpo/step", json={"items": items, "loss": {"type": "grpo", "beta": 0.04, "learning_rate": 1e-2}}
    )
    assert step.status_code == 200, step.text
    result = step.json()
    assert result["adapter_version"] == before["adapter_version"] + 1
    assert math.isfinite(result["loss"]) and result["grad_norm"] > 0.0
    assert result["tokens"] == sum(r["num_tokens"] for r in before["results"])

    after = client.post("/logprobs", json={"model": "student", "items": ITEMS}).json()
    moved = max(
        abs(a - b)
        for r0, r1 in zip(before["results"], after["results"], strict=True)
        for a, b in zip(r0["token_logprobs"], r1["token_logprobs"], strict=True)
    )
    assert moved > 1e-4
    still_base = client.post("/logprobs", json={"model": "base", "items": ITEMS}).json()
    assert still_base["results"][0]["token_logprobs"] == pytest.approx(
        base["results"][0]["token_logprobs"], abs=1e-3
    )


def test_a_grpo_step_over_very_different_lengths_has_a_finite_gradient(cuda_client):
    """Regression (H100, bf16): left-padded scoring rows whose pads fell inside the completion window made the
    gradient NaN, so a step over one short and one long item failed."""
    client, _ = cuda_client
    items = [
        {"prompt": "Hi. ", "completion": "72", "advantage": 1.0},
        {
            "prompt": "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. ",
            "completion": "In May she sold 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 clips.\n#### 72",
            "advantage": -1.0,
        },
    ]
    step = client.post(
        "/grpo/step", json={"items": items, "loss": {"type": "legacy", "beta": 0.0, "micro_batch_size": 2}}
    )
    assert step.status_code == 200, step.text
    assert math.isfinite(step.json()["grad_norm"]) and step.json()["grad_norm"] > 0.0


def test_generation_agrees_with_scoring(cuda_client):
    """The log-probs the decode loop reports for its greedy tokens are what /logprobs gives the same ids, for the
    student and the base, and much closer to them than to scores without the prompt (what a decode step that lost
    its KV cache would see)."""
    from services.trainer.items import GenerationRequest, ScoreItem

    _, app = cuda_client
    student = app.state.loader.engine.core.student
    prompt = student.tokenizer(
        "Natalia sold clips to 48 of her friends in April, and then", add_special_tokens=False
    ).input_ids
    for use_adapter in (True, False):
        (sample,) = student.generate(
            [GenerationRequest(prompt, max_tokens=12, temperature=0, logprobs=0)], use_adapter=use_adapter
        )[0]
        ids = sample.token_ids
        assert ids and sample.token_logprobs is not None
        generated = sample.token_logprobs[: len(ids)]
        (full,) = student.logprobs([ScoreItem(prompt, ids)], use_adapter=use_adapter)
        (cut,) = student.logprobs([ScoreItem(prompt[-1:], ids)], use_adapter=use_adapter)
        error = sum(abs(a - b) for a, b in zip(generated, full, strict=True)) / len(ids)
        context = sum(abs(a - b) for a, b in zip(full, cut, strict=True)) / len(ids)
        assert error < 0.3 and error < 0.2 * context, (use_adapter, error, context)


def test_a_checkpoint_brings_the_student_back(cuda_client):
    client, _ = cuda_client
    saved = client.post("/checkpoints", json={"name": "cuda-round"})
    assert saved.status_code == 200, saved.text
    at_save = client.post("/logprobs", json={"model": "student", "items": ITEMS}).json()
    items = [{**item, "advantage": adv} for item, adv in zip(ITEMS, (-1.0, 1.0), strict=True)]
    step = client.post("/grpo/step", json={"items": items, "loss": {"type": "grpo", "learning_rate": 1e-2}})
    assert step.status_code == 200, step.text
    moved = client.post("/logprobs", json={"model": "student", "items": ITEMS}).json()
    assert moved["results"][0]["token_logprobs"] != pytest.approx(
        at_save["results"][0]["token_logprobs"], abs=1e-4
    )
    loaded = client.post("/checkpoints/load", json={"name": "cuda-round"})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["adapter_version"] == saved.json()["adapter_version"]
    back = client.post("/logprobs", json={"model": "student", "items": ITEMS}).json()
    for got, want in zip(back["results"], at_save["results"], strict=True):
        assert got["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-3)
