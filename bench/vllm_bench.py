"""vLLM-CPU teacher tokens/s beside the trainer's own /v1/completions, on the same prompts.

Each server runs alone (the other is stopped), serves the same tiny model (SmolLM2-135M-Instruct, from the shipped
GGUF converted to an HF directory), and gets the same GSM8K prompts through POST /v1/completions, greedy, with a
fixed max_tokens: once one request at a time ("single"), once all requests in flight together ("concurrent").
tokens/s = completion tokens (the server's own usage count) / wall time of the batch.

    .venv/bin/python bench/vllm_bench.py --prompts 16 --max-tokens 64
writes bench/results/vllm_teacher.json (vllm_tok_s and trainer_tok_s are the concurrent figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from orchestrator.gsm8k.data import load_gsm8k  # noqa: E402
from support.trainer_process import TrainerProcess  # noqa: E402
from support.vllm_server import VLLMServer, vllm_python  # noqa: E402


def prompts(gsm8k: str | None, count: int) -> list[str]:
    return [f"Question: {p.prompt}\nAnswer: Let's think step by step.\n"
            for p in load_gsm8k("test", path=gsm8k, limit=count)]


async def measure(base_url: str, model: str, texts: list[str], max_tokens: int, concurrent: bool) -> dict:
    async with httpx.AsyncClient(base_url=base_url, timeout=1800) as client:
        async def one(text: str) -> int:
            response = await client.post("/completions", json={"model": model, "prompt": text, "temperature": 0.0,
                                                                "max_tokens": max_tokens})
            response.raise_for_status()
            return int(response.json()["usage"]["completion_tokens"])

        await one(texts[0])  # warm-up, not counted
        started = time.perf_counter()
        if concurrent:
            tokens = sum(await asyncio.gather(*(one(t) for t in texts)))
        else:
            tokens = 0
            for text in texts:
                tokens += await one(text)
        seconds = time.perf_counter() - started
    return {"requests": len(texts), "completion_tokens": tokens, "seconds": round(seconds, 2),
            "tok_s": round(tokens / seconds, 2)}


def bench_server(base_url: str, model: str, texts: list[str], max_tokens: int) -> dict:
    return {"single": asyncio.run(measure(base_url, model, texts, max_tokens, concurrent=False)),
            "concurrent": asyncio.run(measure(base_url, model, texts, max_tokens, concurrent=True))}


def model_dir() -> Path:
    from services.trainer.model_source import resolve_model
    from services.trainer.settings import TrainerSettings

    return Path(resolve_model(None, TrainerSettings().model_cache_dir).path)


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem_kb = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal")))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1), "gpu": None,
            "os": platform.platform(), "python": platform.python_version()}


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--gsm8k", default=None, help="folder with test.jsonl (default: GSM8K_PATH, the hub, the shipped copy)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_teacher.json"))
    args = parser.parse_args()

    texts = prompts(args.gsm8k, args.prompts)
    model = model_dir()
    python = vllm_python()
    load_before = load()
    with VLLMServer(model, ["teacher"], python=python) as server:
        vllm = bench_server(server.base_url, "teacher", texts, args.max_tokens)
    print("vllm", json.dumps(vllm), flush=True)
    with TrainerProcess() as trainer:
        health = httpx.get(trainer.url + "/health").json()
        trainer_result = bench_server(trainer.base_url, "base", texts, args.max_tokens)
    print("trainer", json.dumps(trainer_result), flush=True)

    vllm_version = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                                  text=True).stdout.strip().splitlines()[-1]
    result = {
        "vllm_tok_s": vllm["concurrent"]["tok_s"],
        "trainer_tok_s": trainer_result["concurrent"]["tok_s"],
        "vllm": {**vllm, "version": vllm_version, "dtype": "bfloat16", "kv_cache_gib": 1, "enforce_eager": True},
        "trainer": {**trainer_result, "backend": health.get("backend"), "device": health.get("device")},
        "workload": {"model": "SmolLM2-135M-Instruct (shipped Q4_1 GGUF -> HF)", "prompts": args.prompts,
                     "max_tokens": args.max_tokens, "temperature": 0.0, "route": "POST /v1/completions",
                     "prompt_source": "GSM8K test, first N questions"},
        "machine": machine(),
        "load": {"before": load_before, "after": load()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([".venv/bin/python", "bench/vllm_bench.py", *sys.argv[1:]]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
