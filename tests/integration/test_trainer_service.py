"""The real trainer service (uvicorn subprocess, tiny model) against transformers run in this process."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.integration

CHAT = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"}]


@pytest.fixture(scope="module")
def reference(trainer_model_dir):
    """The same converted weights loaded directly with transformers (no adapter: equal to a fresh LoRA)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(trainer_model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(trainer_model_dir, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="module", params=[False, True], ids=["one-process", "engine-process"])
def trainer_service(trainer_model_dir, tmp_path_factory, request):
    """The real service, with the model in its own process (TRAINER_ENGINE_PROCESS) and without: every test here
    runs against both."""
    from support.trainer_process import TrainerProcess

    # float32 decoding: these tests hold generation to transformers' float32 generate and scoring (on a CPU with
    # bf16 instructions the default decodes through a bf16 copy; tests/trainer/test_decode_weights.py covers it)
    env = {"TRAINER_ENGINE_PROCESS": str(request.param).lower(), "TRAINER_DECODE_DTYPE": "model"}
    with TrainerProcess(checkpoint_dir=tmp_path_factory.mktemp("trainer-ckpt"), env=env) as trainer:
        yield trainer


@pytest.fixture(scope="module")
def client(trainer_service):
    with httpx.Client(base_url=trainer_service.url, timeout=300) as http:
        yield http


def post(client, path, body):
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def direct_logprobs(reference, prompt: str, completion: str) -> list[float]:
    model, tokenizer = reference
    context = tokenizer(prompt).input_ids
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([context + completion_ids])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return [logp[len(context) - 1 + i, t].item() for i, t in enumerate(completion_ids)]


def test_health_and_models(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["backend"] == "transformers" and health["device"] == "cpu"
    assert health["adapter_version"] == 0 and health["step"] == 0
    assert health["decode_dtype"] == "float32"  # TRAINER_DECODE_DTYPE=model on the float32 CPU model
    assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {"student", "base"}


def test_greedy_is_deterministic_and_equals_transformers_generate(client, reference):
    model, tokenizer = reference
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    body = {"model": "student", "prompt": prompt, "max_tokens": 12, "temperature": 0}
    first, second = post(client, "/v1/completions", body), post(client, "/v1/completions", body)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12)
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert first["choices"][0]["text"] == second["choices"][0]["text"] == expected
    assert first["choices"][0]["finish_reason"] == "length" and first["choices"][0]["stop_reason"] is None
    assert first["usage"] == {
        "prompt_tokens": ids.shape[1],
        "completion_tokens": 12,
        "total_tokens": ids.shape[1] + 12,
    }
    base = post(client, "/v1/completions", {**body, "model": "base"})
    assert base["choices"][0]["text"] == expected  # a fresh adapter changes nothing


def test_stop_strings_are_honoured_and_not_returned(client, reference):
    _, tokenizer = reference
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    full = post(
        client, "/v1/completions", {"model": "base", "prompt": prompt, "max_tokens": 12, "temperature": 0}
    )["choices"][0]["text"]
    stop = full.split()[2]  # a word the greedy text reaches after a few tokens
    cut = post(
        client,
        "/v1/completions",
        {
            "model": "base",
            "prompt": prompt,
            "max_tokens": 12,
            "temperature": 0,
            "stop": [stop],
            "logprobs": 0,
        },
    )
    choice = cut["choices"][0]
    assert choice["text"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == stop  # as vLLM says it: which stop string ended the text
    assert "".join(choice["logprobs"]["tokens"]).startswith(choice["text"])
    assert cut["usage"]["completion_tokens"] < 12


def test_seeded_sampling_is_reproducible_and_n_samples_differ(client):
    body = {
        "model": "student",
        "prompt": "Once upon a time",
        "max_tokens": 8,
        "temperature": 1.0,
        "top_p": 0.95,
        "n": 4,
        "seed": 7,
    }
    first, second = post(client, "/v1/completions", body), post(client, "/v1/completions", body)
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in second["choices"]]
    assert len(set(texts)) > 1 and [c["index"] for c in first["choices"]] == [0, 1, 2, 3]


def test_logprobs_match_a_direct_forward_pass(client, reference):
    prompt, completion = "The capital of France is", " Paris, a city on the Seine."
    got = post(
        client,
        "/logprobs",
        {
            "model": "student",
            "items": [
                {"prompt": prompt, "completion": completion},
                {"prompt": "2 + 2 =", "completion": " 4"},
            ],
        },
    )
    expected = direct_logprobs(reference, prompt, completion)
    result = got["results"][0]
    assert result["num_tokens"] == len(expected)
    assert max(abs(a - b) for a, b in zip(result["token_logprobs"], expected, strict=True)) < 1e-4
    assert result["sum"] == pytest.approx(sum(expected), abs=1e-3)
    assert got["results"][1]["token_logprobs"] == pytest.approx(
        direct_logprobs(reference, "2 + 2 =", " 4"), abs=1e-4
    )

    # Token ids as a sampler produced them, here split where the tokenizer would not split the text: those ids
    # are scored (a direct forward pass over the same ids), not the text's own tokenisation.
    _, tokenizer = reference
    ids = (
        tokenizer(" Par", add_special_tokens=False).input_ids
        + tokenizer("is", add_special_tokens=False).input_ids
    )
    assert ids != tokenizer(" Paris", add_special_tokens=False).input_ids
    by_ids = post(
        client, "/logprobs", {"items": [{"prompt": prompt, "completion": " Paris", "completion_ids": ids}]}
    )["results"][0]
    model, _ = reference
    context = tokenizer(prompt).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([context + ids])).logits[0].float(), dim=-1)
    assert by_ids["token_logprobs"] == pytest.approx(
        [logp[len(context) - 1 + i, t].item() for i, t in enumerate(ids)], abs=1e-4
    )


def test_concurrent_requests_share_forward_batches(trainer_service):
    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=trainer_service.url, timeout=300) as http:
            bodies = [
                {"model": "student", "prompt": f"Fact number {i}:", "max_tokens": 4, "temperature": 0}
                for i in range(8)
            ]
            return [
                r.json()
                for r in await asyncio.gather(*(http.post("/v1/completions", json=b) for b in bodies))
            ]

    health_before = httpx.get(trainer_service.url + "/health").json()
    results = asyncio.run(run())
    health_after = httpx.get(trainer_service.url + "/health").json()
    before, after = health_before["batcher"], health_after["batcher"]
    assert all(len(r["choices"]) == 1 for r in results)
    assert after["requests"] - before["requests"] == 8
    assert after["forward_batches"] - before["forward_batches"] < 8
    assert after["max_batch_rows"] > 1
    # the slot engine's share of the passes: prefills of the joining rows, and decode steps of several rows each
    delta = {key: after[key] - before[key] for key in ("prefill_passes", "decode_steps", "decoded_rows")}
    assert delta["prefill_passes"] >= 1 and delta["decode_steps"] >= 3  # 4 tokens: 3 steps after the prefill
    assert delta["decoded_rows"] > delta["decode_steps"]  # some step decoded more than one row
    assert (
        after["forward_passes"] - before["forward_passes"] == delta["prefill_passes"] + delta["decode_steps"]
    )
    assert after["queue_wait_s"] >= before["queue_wait_s"] >= 0
    assert after["place_wait_s"] > before["place_wait_s"] >= 0  # 8 rows placed, each after some wait
    # the HTTP side: 8 requests answered (the /health calls are not counted), each one generation, whose time with
    # the engine lies within the requests' own
    hops_before, hops_after = (
        health_before["service"].pop("engine_hops"),
        health_after["service"].pop("engine_hops"),
    )
    http = {
        key: health_after["service"][key] - health_before["service"][key] for key in health_after["service"]
    }
    assert http["requests"] == 8 and http["generations"] == 8
    assert 0 < http["generation_seconds"] <= http["request_seconds"]
    # with the engine in its own process, the generations' time split into its hops: each one a real interval (one
    # clock for both processes), together the generations' time with the engine
    assert (hops_after is None) == (trainer_service.service.env["TRAINER_ENGINE_PROCESS"] == "false")
    if hops_after is not None:
        hops = {key: hops_after[key] - hops_before[key] for key in hops_after}
        assert hops["replies"] == 8
        assert all(seconds >= 0 for seconds in hops.values())
        assert hops["in_engine_s"] > 0
        total = sum(seconds for key, seconds in hops.items() if key != "replies")
        assert total == pytest.approx(http["generation_seconds"], abs=0.05 * 8)
        assert total <= http["generation_seconds"]


@pytest.mark.parametrize(
    "path, body, status, field",
    [
        ("/v1/completions", {"model": "student", "prompt": ""}, 422, "prompt"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 422, "model"),
        ("/v1/completions", {"model": "student", "prompt": "hi", "n": 65}, 422, "n"),
        ("/v1/completions", {"model": "student", "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
        ("/v1/chat/completions", {"model": "student", "messages": []}, 422, "messages"),
        ("/logprobs", {"items": [{"completion": "x"}]}, 422, "items"),
        (
            "/grpo/step",
            {
                "items": [
                    {"prompt": "a", "completion": " b", "advantage": 1.0, "old_logprobs": [-1.0, -2.0, -3.0]}
                ]
            },
            400,
            "items[0].old_logprobs",
        ),
        ("/grpo/step", {"items": []}, 422, "items"),
        (
            "/logprobs",
            {"items": [{"prompt": "a", "completion": "b", "completion_ids": [-1]}]},
            422,
            "completion_ids",
        ),
        (
            "/logprobs",
            {"items": [{"prompt": "a", "completion": "b", "completion_ids": [10**9]}]},
            400,
            "items[0].completion_ids",
        ),
    ],
)
def test_bad_input_names_the_field(client, path, body, status, field):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert field in response.json()["error"]["message"]


def test_non_finite_advantage_is_refused_and_nothing_is_applied(client):
    version = client.get("/health").json()["adapter_version"]
    raw = json.dumps({"items": [{"prompt": "a", "completion": " b", "advantage": float("nan")}]})
    response = client.post("/grpo/step", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422 and "advantage" in response.json()["error"]["message"]
    assert client.get("/health").json()["adapter_version"] == version


def test_openai_client_calls_completions_and_chat_unchanged(trainer_service):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=trainer_service.base_url, api_key="unused", timeout=300)
    completion = api.completions.create(
        model="student", prompt="1, 2, 3,", max_tokens=4, temperature=0, logprobs=2, n=2, seed=1, stop=["\n"]
    )
    assert len(completion.choices) == 2 and completion.choices[0].text
    assert completion.choices[0].logprobs.token_logprobs and completion.usage.completion_tokens > 0
    chat = api.chat.completions.create(
        model="base", messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    assert chat.choices[0].message.content and chat.choices[0].finish_reason in ("stop", "length")
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 2
    assert chat.model_extra["adapter_version"] >= 0


def test_chat_continue_final_message(client):
    body = {
        "model": "student",
        "messages": [*CHAT, {"role": "assistant", "content": "Tom has 3 + 4 ="}],
        "continue_final_message": True,
        "add_generation_prompt": False,
        "max_tokens": 6,
        "temperature": 0,
        "stop": ["\n"],
    }
    choice = post(client, "/v1/chat/completions", body)["choices"][0]
    assert "\n" not in choice["message"]["content"] and choice["message"]["content"].strip()


# ----- learning and checkpoints: these change the served adapter, so they run last, in this order -----
GOOD, BAD = " 3 + 4 = 7 apples.", " 3 + 4 = 9 apples."


def scores(client, model="student") -> list[float]:
    items = [{"messages": CHAT, "completion": GOOD}, {"messages": CHAT, "completion": BAD}]
    return [r["sum"] for r in post(client, "/logprobs", {"model": model, "items": items})["results"]]


def test_grpo_step_moves_log_probs_with_the_advantage_and_kl_grows(client):
    good_before, bad_before = scores(client)
    items = [
        {"messages": CHAT, "completion": GOOD, "advantage": 1.0},
        {"messages": CHAT, "completion": BAD, "advantage": -1.0},
    ]
    loss = {"type": "grpo", "beta": 0.04, "learning_rate": 1e-4, "micro_batch_size": 1}
    first = post(client, "/grpo/step", {"items": items, "loss": loss, "step_key": "s1"})
    assert (
        first["kl"] == pytest.approx(0.0, abs=1e-7)
        and first["adapter_version"] == 1
        and not first["duplicate"]
    )
    assert first["tokens"] > 0 and first["grad_norm"] > 0
    good_after, bad_after = scores(client)
    assert good_after > good_before and bad_after < bad_before
    assert scores(client, "base") == pytest.approx([good_before, bad_before], abs=1e-4)  # base is untouched
    retry = post(client, "/grpo/step", {"items": items, "loss": loss, "step_key": "s1"})
    assert retry["duplicate"] and retry["adapter_version"] == 1
    second = post(client, "/grpo/step", {"items": items, "loss": loss, "step_key": "s2"})
    assert second["kl"] > 0 and second["adapter_version"] == 2
    generated = post(client, "/v1/completions", {"model": "student", "prompt": "Hi", "max_tokens": 2})
    assert generated["adapter_version"] == 2


def test_checkpoint_survives_a_restart(trainer_service, client):
    saved = post(client, "/checkpoints", {"name": "after-two-steps"})
    assert saved["adapter_version"] == 2 and saved["step"] == 2 and saved["step_key"] == "s2"
    expected = scores(client)
    trainer_service.restart()
    assert client.get("/health").json()["adapter_version"] == 0
    assert scores(client) != pytest.approx(expected, abs=1e-4)
    names = [c["name"] for c in client.get("/checkpoints").json()["checkpoints"]]
    assert "after-two-steps" in names
    loaded = post(client, "/checkpoints/load", {"name": "after-two-steps"})
    assert loaded["adapter_version"] == 2 and loaded["step_key"] == "s2"
    assert client.get("/health").json()["adapter_version"] == 2
    assert scores(client) == pytest.approx(expected, abs=1e-6)


def test_corrupt_or_missing_checkpoint_is_refused_and_the_model_still_serves(trainer_service, client):
    before, version = scores(client), client.get("/health").json()["adapter_version"]
    post(client, "/checkpoints", {"name": "to-truncate"})
    adapter = trainer_service.checkpoint_dir / "to-truncate" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    response = client.post("/checkpoints/load", json={"name": "to-truncate"})
    assert response.status_code == 409 and "adapter.safetensors" in response.json()["error"]["message"]
    assert client.post("/checkpoints/load", json={"name": "never-saved"}).status_code == 404
    assert client.post("/checkpoints/load", json={"name": "../etc"}).status_code == 422
    assert client.get("/health").json()["adapter_version"] == version
    assert scores(client) == pytest.approx(before, abs=1e-6)


@pytest.mark.skipif(
    not Path("/proc/self/maps").is_file(), reason="reads the process's mapped libraries (Linux)"
)
def test_the_http_process_leaves_torch_to_the_engine(trainer_service, client):
    """With the engine in its own process, the HTTP process never loads torch (only the engine runs the model):
    ~120 MB resident against ~300 MB with it, measured on the CI machine. In one process it is there."""
    assert (
        client.post("/v1/completions", json={"model": "student", "prompt": "Hi", "max_tokens": 2}).status_code
        == 200
    )
    maps = Path(f"/proc/{trainer_service.service.proc.pid}/maps").read_text()
    in_own_process = trainer_service.service.env["TRAINER_ENGINE_PROCESS"] == "true"
    assert ("libtorch" in maps) != in_own_process
