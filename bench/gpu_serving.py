"""The trainer's serving on one GPU in one command (issue #20): the decode in-process, then the real service over HTTP.

    python3 bench/gpu_serving.py --out $OUT/gpu_serving.json     # lent H200: ~3.5-4 minutes; carry .whl

1. In-process (Student.generate, no HTTP), 128 new tokens per row, sampled (T=1.0, top_p=1.0 as the learning runs
   sample, seeded, log-probs of the sampled token) at 1, 32, 128 and 256 rows, greedy at 256 as well:
   - loop:        Student's transformers DynamicCache loop (TRAINER_DECODE_ENGINE=loop), the path before the engine;
   - slots:       services/trainer/decode (fixed KV slots, CUDA graphs), what TRAINER_DECODE_ENGINE=slots runs;
   - slots_eager: the same engine with graphs off, at 256 rows: what the graphs buy.
2. Through the service: a real `python -m services.trainer` on 127.0.0.1 (same model directory, bf16, no 4-bit,
   TRAINER_MAX_BATCH_SIZE 256), started at the beginning so it loads while part 1 runs. Closed loops of
   /v1/completions (distinct prompts of 96-224 tokens, 128 tokens, sampled as above) with 1, 32, 128 and 255
   requests in flight, each for --service-seconds; tokens, requests, latencies, connection errors and HTTP
   errors are counted (bench/service_load.py). Then two request shapes at the same rows in flight (32 clients x
   8 samples): "sampling" (n=8 whole answers of a fresh prompt, a GRPO arm) and "search" (n=8 steps of 32
   tokens from a node, then 8 n=1 continuations from node + child: what the fork search sends). Last, services
   with other settings (--variants; by default the GIL switch interval at Python's 5 ms, and requests admitted
   at every decode step), started beside the first, each measured at 255 in flight; e.g. --variants
   "split:TRAINER_ENGINE_PROCESS=true" measures the model in the service's own engine process.
   The service needs fastapi/uvicorn/pydantic: where they are missing, the wheels in .whl (see
   bench/gpu_learning.sh) are installed into /tmp/site for the service's process (and its engine process, which
   inherits its environment) only.
Optional candidates (--candidates; phase 1's comparison, each minutes on a GPU): slots_compiled (the step
torch.compiled inside the graphs), slots_sync (steps in order), search / mixed (in-process workloads), hf_static
(transformers static cache + torch.compile) and hf_cb (transformers continuous batching).

Model: random weights of SmolLM2-135M's shape (bench/configs/smollm2-135m), saved once as bf16 and loaded through
load_student (bf16 on CUDA, LoRA r=32 on the 7 projections; in-process with random B so the merged student
differs from base). Random weights seldom stop early, so rows run to their max_tokens. The tokenizer is made up
here (49,152 byte-level entries, no merges: one token per character of text; the lent machine has no tokenizer
files and no internet); in-process prompts are random ids, 96-224 long.

Figures per row: tok/s = generated tokens / wall time; ms/pass = wall / forward passes (the prefill counts as
one; through the service from /health's forward_passes counter); ms/step = (wall(128 tokens) - wall(1 token)) /
127, the decode step alone. Greedy tokens are compared with loop's (`greedy_same`: share of rows equal,
`greedy_prefix`: mean share of tokens before the first difference; bf16 random weights give near-flat logits, so
kernels that round differently part within a few tokens). Every part has a hard budget (--budget-s in-process,
--service-budget-s for the service) and the JSON, headline figures included, is rewritten after every row, so a
cut run keeps what it measured.

CPU check of the whole command (tiny shape, a few tokens, the service too): python bench/gpu_serving.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# As the service does (services/trainer/__main__.py): spinning OpenMP threads starve each other on shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402


def install_pydantic_stand_ins() -> None:
    """The lent GPU machine has no pydantic. Two modules the Student imports need it: services.trainer.settings
    (given here a plain class with the fields and defaults load_student and Student read) and services.protocol
    (whose LossSettings only a GRPO step uses; this bench runs none). Wherever pydantic is installed the real
    modules are used."""
    try:
        import pydantic_settings  # noqa: F401

        return
    except ImportError:
        pass

    @dataclasses.dataclass
    class TrainerSettings:
        model_source: str | None = None
        model_cache_dir: Path = Path(tempfile.gettempdir()) / "gpu-serving-cache"
        backend: str = "transformers"
        device: str | None = None
        load_in_4bit: bool = False
        lora_r: int = 32
        lora_alpha: int = 32
        lora_dropout: float = 0.0
        lora_target_modules: list = dataclasses.field(
            default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        )
        learning_rate: float = 1e-5
        weight_decay: float = 0.0
        gradient_checkpointing: bool = False
        compile_layers: bool = False
        max_batch_size: int = 256
        admit_every_steps: int = 4
        max_context: int = 2048
        decode_engine: str = "slots"
        cuda_graphs: bool = True
        decode_compile: bool = False
        torch_threads: int | None = None
        micro_batch_tokens: int | None = None
        decode_dtype: str = "model"
        decode_packed: bool = True  # read by Student; CPU only, so a no-op on the GPU
        seed: int = 0

    module = types.ModuleType("services.trainer.settings")
    module.TrainerSettings = TrainerSettings
    sys.modules["services.trainer.settings"] = module
    protocol = types.ModuleType("services.protocol")
    protocol.LossSettings = type("LossSettings", (), {"__doc__": "stand-in: this bench runs no GRPO step"})
    sys.modules["services.protocol"] = protocol


def write_model(target: Path, config_dir: Path, tiny: bool) -> None:
    """config.json (bf16 random weights, saved) and a made-up byte-level tokenizer of the config's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    config = AutoConfig.from_pretrained(config_dir)
    if tiny:  # a step of a few ms on a CPU, as a graph replay takes on a GPU: what the host adds shows
        config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=512))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: SmolLM2's pad/bos/eos ids
    vocab = {token: i for i, token in enumerate(specials)}
    for char in alphabet:
        vocab[char] = len(vocab)
    pairs = (a + b for a in alphabet for b in alphabet)
    while len(vocab) < config.vocab_size:
        vocab.setdefault(next(pairs), len(vocab))
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=specials[1], eos_token=specials[2],
                                        pad_token=specials[0])
    tokenizer.save_pretrained(target)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(target, safe_serialization=True)


class Bench:
    """The rows measured so far and the headline figures from them, written to --out after every row."""

    def __init__(self, args, started: float):
        self.args = args
        self.started = started
        self.rows_out: list[dict] = []
        self.deadline = time.monotonic() + args.budget_s
        self.greedy_ref: dict[tuple, list[list[int]]] = {}
        self.info: dict = {}  # setup time, device, versions: filled in as they become known

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, **row) -> None:
        self.rows_out.append(row)
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
        print("ROW", json.dumps(shown), flush=True)
        self.write(partial=True)

    def find(self, candidate: str, mode: str, **match) -> dict | None:
        for row in self.rows_out:
            if (row.get("candidate") == candidate and row.get("mode") == mode and "tok_s" in row
                    and all(row.get(k) == v for k, v in match.items())):
                return row
        return None

    def summary(self) -> dict:
        rows = max(int(r) for r in self.args.rows.split(","))
        in_flight = [int(f) for f in self.args.in_flight.split(",")]
        slots = self.find("slots", "sampled", rows=rows) or {}
        greedy = self.find("slots", "greedy", rows=rows) or {}
        loop = self.find("loop", "sampled", rows=rows) or {}
        eager = self.find("slots_eager", "sampled", rows=rows) or {}
        # at the top level, the loop with the most client processes (--client-processes): the least client-bound
        processes = max(int(p) for p in str(self.args.client_processes).split(","))
        service = {str(f): (self.find("service", "sampled", in_flight=f) or {}).get("tok_s") for f in in_flight}
        top = self.find("service", "sampled", in_flight=in_flight[-1], client_processes=processes) or {}
        service[str(in_flight[-1])] = top.get("tok_s")
        sampling = self.find("service", "workload_sampling") or {}
        search = self.find("service", "workload_search") or {}
        ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731
        return {
            # the headline figures are the sampled ones: the service's requests sample too
            f"inprocess_tok_s_{rows}": slots.get("tok_s"),
            f"ms_per_pass_{rows}": slots.get("ms_per_pass"),
            f"ms_per_step_{rows}": slots.get("ms_per_step"),
            f"inprocess_greedy_tok_s_{rows}": greedy.get("tok_s"),
            f"loop_tok_s_{rows}": loop.get("tok_s"),
            f"eager_tok_s_{rows}": eager.get("tok_s"),
            "service_tok_s": service,
            f"service_vs_inprocess_{in_flight[-1]}": ratio(top.get("tok_s"), slots.get("tok_s")),
            f"connection_errors_{in_flight[-1]}": top.get("connection_errors"),
            f"http_errors_{in_flight[-1]}": top.get("http_errors"),
            f"client_processes_{in_flight[-1]}": processes,
            # the same loop by number of client processes
            f"service_tok_s_{in_flight[-1]}_by_client_processes": {
                str(row["client_processes"]): row["tok_s"] for row in self.rows_out
                if row.get("candidate") == "service" and row.get("mode") == "sampled"
                and row.get("in_flight") == in_flight[-1] and "tok_s" in row},
            "search_tok_s": search.get("tok_s"),
            "sampling_tok_s": sampling.get("tok_s"),
            "search_vs_sampling_ratio": ratio(search.get("tok_s"), sampling.get("tok_s")),
            # the same closed loop at the highest level on services with other settings (--variants)
            f"service_variants_tok_s_{in_flight[-1]}": {
                row["mode"].removeprefix("variant_"): row["tok_s"] for row in self.rows_out
                if row.get("candidate") == "service" and row.get("mode", "").startswith("variant_")
                and "tok_s" in row
            },
        }

    def write(self, partial: bool) -> dict:
        result = {"partial": partial, **self.summary(), **self.info,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.started)),
                  "command": "python " + " ".join(sys.argv), "total_s": time.time() - self.started,
                  "rows": self.rows_out}
        Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.out).write_text(json.dumps(result, indent=1))
        return result

    def guarded(self, label: str, fn, *, budget: bool = True) -> None:
        """fn(), recorded as skipped when the in-process budget is spent, or as an error (the run goes on)."""
        if budget and self.left() <= 0:
            self.record(candidate=label, skipped="budget spent")
            return
        try:
            fn()
        except Exception as exc:
            traceback.print_exc()
            self.record(candidate=label, error=f"{type(exc).__name__}: {exc}"[:500])


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compare(reference: list[list[int]] | None, got: list[list[int]]) -> dict:
    if reference is None:
        return {}
    same = sum(a == b for a, b in zip(reference, got, strict=False)) / len(got)
    prefix = []
    for a, b in zip(reference, got, strict=False):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(a), 1))
    return {"greedy_same": same, "greedy_prefix": sum(prefix) / len(prefix)}


# ----- the service -------------------------------------------------------------------------------------------------
@functools.cache  # once: after main() puts /tmp/site on its own path, fastapi would seem installed
def service_pythonpath() -> str:
    """PYTHONPATH for the service's process: this checkout, and /tmp/site with the .whl wheels installed where
    fastapi, uvicorn or pydantic-settings is missing (the lent GPU machine has none of them)."""
    here = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    if all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "pydantic_settings")):
        return os.pathsep.join(here)
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        raise RuntimeError("the service needs fastapi, uvicorn and pydantic-settings, and .whl holds no wheels "
                           "(carry .whl: see bench/gpu_learning.sh)")
    site = Path(tempfile.gettempdir()) / "site"
    installed = site / ".wheels"  # the wheel names installed there: a warm machine reinstalls when .whl changed
    names = "\n".join(wheel.name for wheel in wheels)
    if not (site / "fastapi").is_dir() or not installed.is_file() or installed.read_text() != names:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
        installed.write_text(names)
    return os.pathsep.join([str(site), *here])


def http_parser(env: dict[str, str]) -> str:
    """The HTTP parser of the service's process: TRAINER_HTTP_PARSER where it names one, else (auto) httptools (C)
    where it is installed there, else h11."""
    return _auto_choice(env, "TRAINER_HTTP_PARSER", "httptools", "h11")


def event_loop(env: dict[str, str]) -> str:
    """The service's event loop: TRAINER_EVENT_LOOP where it names one, else (auto) uvloop where installed."""
    return _auto_choice(env, "TRAINER_EVENT_LOOP", "uvloop", "asyncio")


def _auto_choice(env: dict[str, str], variable: str, module: str, otherwise: str) -> str:
    chosen = env.get(variable, "auto")
    if chosen != "auto":
        return chosen
    probe = f"import importlib.util as u; print('{module}' if u.find_spec('{module}') else '{otherwise}')"
    found = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": env["PYTHONPATH"]},
                           capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def parse_variants(text: str) -> dict[str, dict[str, str]]:
    """"name:VAR=value,VAR=value;name2:..." -> {name: {VAR: value}}."""
    variants = {}
    for part in filter(None, text.split(";")):
        name, _, assignments = part.partition(":")
        variants[name.strip()] = dict(a.strip().split("=", 1) for a in assignments.split(",") if a.strip())
    return variants


def start_service(args, work: Path, device: str, extra_env: dict[str, str]):
    """`python -m services.trainer` on a free port of 127.0.0.1 over the bench's model directory, as users run it
    (log level info); returns the process (not yet ready: it loads while the in-process part runs)."""
    from orchestrator.local.processes import free_port, trainer_process

    rows = max(256, max(int(f) for f in args.in_flight.split(",")))
    env = {
        "PYTHONPATH": service_pythonpath(),
        "TRAINER_MODEL_SOURCE": str(work.parent / "model"),
        "TRAINER_MODEL_CACHE_DIR": str(work / "cache"),
        "TRAINER_DEVICE": device,
        "TRAINER_LOAD_IN_4BIT": "false",
        "TRAINER_MAX_BATCH_SIZE": str(rows),
        "TRAINER_MAX_REQUESTS_IN_FLIGHT": str(4 * rows),
        "TRAINER_COMPILE_LAYERS": "false",
        "TRAINER_GRADIENT_CHECKPOINTING": "false",
        "TRAINER_DECODE_ENGINE": "slots",
        "TRAINER_DECODE_COMPILE": "false",
        **extra_env,
    }
    if args.py_spy:  # py-spy, started beside the service rather than above it, may then read its processes
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench" / "ptrace_any"), env["PYTHONPATH"]])
    process = trainer_process(free_port(), work, env=env, cwd=ROOT)
    return process.start()


def py_spy_profiles(args, service_pid: int) -> list[subprocess.Popen]:
    """py-spy record (raw stacks, per thread, idle frames too) on the service's HTTP process and its engine
    process, and on the engine again counting only samples that hold the GIL; files beside --out."""
    binary = shutil.which("py-spy") or next(
        (str(Path(p) / "bin" / "py-spy") for p in service_pythonpath().split(os.pathsep)
         if (Path(p) / "bin" / "py-spy").is_file()), None)
    if binary is None:
        print("--py-spy: no py-spy (carry its wheel in .whl)", flush=True)
        return []
    children = Path(f"/proc/{service_pid}/task/{service_pid}/children").read_text().split()
    engine = next((int(c) for c in children
                   if "resource_tracker" not in Path(f"/proc/{c}/cmdline").read_text(errors="replace")), None)
    targets = [("http", service_pid, [])]
    if engine is not None:
        targets += [("engine", engine, []), ("engine_gil", engine, ["--gil"])]
    out = Path(args.out).parent
    return [subprocess.Popen([binary, "record", "--pid", str(pid), "--duration", str(int(args.py_spy)),
                              "--rate", "250", "--nonblocking", "--threads", "--idle", "--format", "raw",
                              "--output", str(out / f"py_spy_{name}.txt"), *extra],
                             stdout=open(out / f"py_spy_{name}.log", "w"), stderr=subprocess.STDOUT)
            for name, pid, extra in targets]


# where a request's time goes: waiting to join, prefills, how full the decode steps are, who waited for whom
WAIT_COUNTERS = ("queue_wait_s", "prefill_passes", "decode_steps", "decoded_rows", "place_wait_s", "read_wait_s",
                 "idle_launches")


def measure_service(bench: Bench, args, services: dict, texts: list[str]) -> None:
    """Closed loops at each in-flight level, the sampling and search workloads, then each variant at the highest
    level, within --service-budget-s."""
    import httpx

    from bench.service_load import (
        CompletionBody,
        closed_loop,
        closed_loop_processes,
        run_client_loop,
        sampling_workload,
        search_workload,
    )

    deadline = time.monotonic() + args.service_budget_s
    levels = [int(f) for f in args.in_flight.split(",")]
    bench.info["service"] = {}

    body = CompletionBody(tuple(texts), args.tokens)
    client_processes = [int(p) for p in str(args.client_processes).split(",")]

    def prompt(client: int, k: int) -> str:
        return f"q{client}.{k} {texts[(client * 13 + k) % len(texts)]}"

    def ready(name: str, process) -> str:
        """Wait for the service, then load it untimed (graphs of the common shapes are captured here)."""
        t = time.perf_counter()
        health = process.wait_ready(max(deadline - time.monotonic(), 1.0))
        info = {"ready_wait_s": time.perf_counter() - t, "device": health["device"],
                "env": {k: v for k, v in process.env.items() if k.startswith("TRAINER_")},
                "http_parser": http_parser(process.env), "event_loop": event_loop(process.env)}
        t = time.perf_counter()
        warm = run_client_loop(closed_loop(process.url, levels[-1], args.warmup_s, body))
        run_client_loop(closed_loop(process.url, 1, min(args.warmup_s, 2.0), body))
        info.update(warmup_s=time.perf_counter() - t, warmup_connection_errors=warm["connection_errors"])
        bench.info["service"][name] = info
        return process.url

    def timed(url: str, mode: str, seconds: float, run, **extra) -> None:
        if deadline - time.monotonic() < seconds + 3:
            bench.record(candidate="service", mode=mode, skipped="service budget spent", **extra)
            return
        health = lambda: httpx.get(url + "/health", timeout=30).json()  # noqa: E731
        health_before = health()
        profilers: list[subprocess.Popen] = []
        if args.py_spy and extra.get("in_flight") == levels[-1] and not bench.info.get("py_spy"):
            # started once the client processes are up and the loop is steady (they take seconds to start)
            delay = min(args.py_spy_at, max(seconds - args.py_spy, 0.0))
            start = threading.Timer(delay, lambda: profilers.extend(py_spy_profiles(args, services["default"].proc.pid)))
            start.start()
            bench.info["py_spy"] = {"seconds": args.py_spy, "delay_s": delay}
        result = run()
        if bench.info.get("py_spy") and "exit_codes" not in bench.info["py_spy"]:
            start.join()
            bench.info["py_spy"]["exit_codes"] = [profiler.wait() for profiler in profilers]
        health_after = health()
        before, after = health_before["batcher"], health_after["batcher"]
        # The HTTP side's share of a request's time (/health's `service`, where the service reports it): mean
        # seconds per request in the handlers and per generation with the engine, beside the client's latency.
        http = {}
        if health_after.get("service") and health_before.get("service"):
            delta = {k: health_after["service"][k] - health_before["service"][k] for k in health_after["service"]
                     if k != "engine_hops"}
            http = {"server_s_per_request": delta["request_seconds"] / max(delta["requests"], 1),
                    "engine_s_per_generation": delta["generation_seconds"] / max(delta["generations"], 1)}
            # garbage collections in the window: the HTTP process's and the engine process's
            http.update(http_gc_collections=delta.get("gc_collections"), http_gc_s=delta.get("gc_s"),
                        http_gc_longest_s=health_after["service"].get("gc_longest_s"),
                        engine_gc_collections=after.get("gc_collections", 0) - before.get("gc_collections", 0),
                        engine_gc_s=after.get("gc_s", 0.0) - before.get("gc_s", 0.0),
                        engine_gc_longest_s=after.get("gc_longest_s"))
            hops_after, hops_before = health_after["service"].get("engine_hops"), health_before["service"].get(
                "engine_hops")
            if hops_after and hops_before:  # the engine process's hops, mean seconds per generation
                replies = max(hops_after["replies"] - hops_before["replies"], 1)
                http["hops_s_per_generation"] = {k: (hops_after[k] - hops_before[k]) / replies
                                                 for k in hops_after if k != "replies"}
        passes = after["forward_passes"] - before["forward_passes"]
        bench.record(candidate="service", mode=mode, **{**extra, **result}, forward_passes=passes,
                     ms_per_pass=1000 * result["wall_s"] / max(passes, 1),
                     tokens_per_pass=result["tokens"] / max(passes, 1),
                     forward_batches=after["forward_batches"] - before["forward_batches"],
                     admitted_requests=after["admitted_requests"] - before["admitted_requests"],
                     **{key: after[key] - before[key] for key in WAIT_COUNTERS if key in after}, **http)

    url = ready("default", services["default"])
    for level in levels:
        for processes in client_processes if level == levels[-1] else client_processes[:1]:
            timed(url, "sampled", args.service_seconds,
                  lambda f=level, p=processes: closed_loop_processes(url, f, args.service_seconds, body, p),
                  in_flight=level, client_processes=processes)
    clients, seconds = args.workload_clients, args.workload_seconds
    timed(url, "workload_sampling", seconds,
          lambda: run_client_loop(sampling_workload(url, clients, seconds, prompt, max_tokens=args.tokens)))
    timed(url, "workload_search", seconds,
          lambda: run_client_loop(search_workload(url, clients, seconds, prompt, step_tokens=args.step_tokens)))
    for name, process in services.items():
        if name == "default":
            continue
        if deadline - time.monotonic() < args.service_seconds + args.warmup_s + 5:
            bench.record(candidate="service", mode=f"variant_{name}", skipped="service budget spent")
            continue
        variant_url = ready(name, process)
        timed(variant_url, f"variant_{name}", args.service_seconds,
              lambda u=variant_url: closed_loop_processes(u, levels[-1], args.service_seconds, body,
                                                          client_processes[-1]),
              in_flight=levels[-1], client_processes=client_processes[-1],
              env=parse_variants(args.variants)[name])


# ----- in-process --------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_serving.json"))
    parser.add_argument("--rows", default="1,32,128,256")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--candidates", default="loop,slots,slots_eager,service",
                        help="also: slots_unfused, kernels, continuous, prefill_kernels, slots_compiled, slots_sync, "
                             "search, mixed, hf_static, hf_cb")
    parser.add_argument("--budget-s", type=float, default=70.0,
                        help="in-process: no new measurement starts after this many seconds")
    parser.add_argument("--hf-budget-s", type=float, default=75.0,
                        help="each transformers candidate starts no new size after this many seconds")
    parser.add_argument("--in-flight", default="1,32,128,255", help="service: requests in flight per closed loop")
    parser.add_argument("--service-seconds", type=float, default=12.0, help="service: length of each closed loop")
    parser.add_argument("--workload-seconds", type=float, default=10.0, help="service: sampling / search, each")
    parser.add_argument("--workload-clients", type=int, default=32, help="service: clients of 8 samples each")
    parser.add_argument("--admit-every", default="4",
                        help="continuous: steps between admissions, one loop each (the service's "
                             "TRAINER_ADMIT_EVERY_STEPS)")
    parser.add_argument("--prefill-modes", default="varlen,layout",
                        help="continuous, prefill_kernels: one loop each of varlen (packed, flash varlen attention), "
                             "layout (packed, attention through the padded layout), padded (no packing)")
    parser.add_argument("--prefill-prompts", type=int, default=9,
                        help="prefill_kernels: prompts of the profiled admission")
    parser.add_argument("--step-tokens", type=int, default=32, help="service: tokens of a search step")
    parser.add_argument("--client-processes", default="1",
                        help="service: client processes of the closed loops (comma-separated: the highest in-flight "
                        "level is measured with each, the others and the variants with the first / last)")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="service: untimed load before the loops")
    parser.add_argument("--service-budget-s", type=float, default=130.0,
                        help="service: from the end of the in-process part, ready wait included")
    parser.add_argument("--variants", default="gil5ms:TRAINER_GIL_SWITCH_INTERVAL_MS=5;"
                        "admit1:TRAINER_ADMIT_EVERY_STEPS=1",
                        help="service: more services with other TRAINER_* settings, each measured at the highest "
                        "in-flight level (name:VAR=value,VAR=value;name2:...; empty: none)")
    parser.add_argument("--py-spy", type=float, default=0.0, metavar="SECONDS",
                        help="service: profile its processes with py-spy (a carried wheel) for this long during the "
                        "first closed loop at the highest in-flight level: raw stacks beside --out")
    parser.add_argument("--py-spy-at", type=float, default=8.0, metavar="SECONDS",
                        help="service: when the profile starts, seconds into that loop")
    parser.add_argument("--config", default=str(ROOT / "bench" / "configs" / "smollm2-135m"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model shape (2 layers, hidden 64, 512 tokens): on a CPU, "
                        "the engine's and the service's own costs stand out as they do beside a GPU's fast steps")
    parser.add_argument("--smoke", action="store_true",
                        help="--tiny, few tokens, short loops (CPU check of the whole command)")
    args = parser.parse_args()
    args.tiny = args.tiny or args.smoke
    if args.smoke:
        args.rows, args.tokens, args.in_flight = "1,4", 6, "1,4"
        args.service_seconds, args.workload_seconds, args.workload_clients = 2.0, 2.0, 2
        args.step_tokens, args.warmup_s = 4, 1.0
        if args.out == os.path.join(os.environ.get("OUT", "."), "gpu_serving.json"):
            args.out = os.path.join(tempfile.gettempdir(), "gpu_serving_smoke.json")
    started = time.time()
    try:  # the carried wheels (.whl) importable here too where they are missing: liger-kernel for the decode copies
        for entry in service_pythonpath().split(os.pathsep):
            if entry not in sys.path:
                sys.path.append(entry)
    except RuntimeError as exc:
        print(f"no carried wheels: {exc}", flush=True)
    install_pydantic_stand_ins()
    from services.trainer.items import GenerationRequest
    from services.trainer.loading import load_student
    from services.trainer.settings import TrainerSettings

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows_list = [int(r) for r in args.rows.split(",")]
    max_rows = max(rows_list)
    wanted = set(args.candidates.split(","))
    bench = Bench(args, started)
    work = Path(tempfile.mkdtemp(prefix="gpu-serving-"))
    t0 = time.perf_counter()
    write_model(work / "model", Path(args.config), args.tiny)
    services = {}
    if "service" in wanted:
        try:  # they load while the in-process part runs
            variants = {"default": {}, **parse_variants(args.variants)}
            for name, extra_env in variants.items():
                services[name] = start_service(args, work / f"service-{name}", device, extra_env)
        except Exception as exc:
            traceback.print_exc()
            bench.record(candidate="service", error=f"start: {type(exc).__name__}: {exc}"[:500])
    try:
        settings = TrainerSettings(model_source=str(work / "model"), device=device, load_in_4bit=False,
                                   max_batch_size=max_rows, compile_layers=False, gradient_checkpointing=False,
                                   model_cache_dir=work / "cache")
        student = load_student(settings)
        with torch.no_grad():  # a non-zero adapter: the merged student and base are different models
            for name, param in student.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.02)
        student.merged_decoder.invalidate()
        setup_s = time.perf_counter() - t0
        bench.info.update(machine=(torch.cuda.get_device_name() if device == "cuda"
                                   else platform.processor() or "cpu") + f", {os.cpu_count()} CPU cores",
                          versions=versions(), setup_s=setup_s)
        print(f"setup {setup_s:.1f}s device={device} dtype={student.merged_decoder.student.dtype} "
              f"torch={torch.__version__}", flush=True)
        bench.deadline = time.monotonic() + args.budget_s
        inprocess(bench, args, student, GenerationRequest, device, wanted)
        if "default" in services:
            rng = random.Random(1)
            from bench.service_load import text_prompt

            texts = [text_prompt(rng, rng.randint(96, 224) if not args.smoke else 12) for _ in range(256)]
            bench.guarded("service", lambda: measure_service(bench, args, services, texts), budget=False)
    finally:
        for name, process in services.items():
            process.stop()
            log = Path(args.out).with_name(f"{Path(args.out).stem}_trainer_{name}.log")
            log.write_text(process.log_tail(100_000))
    result = bench.write(partial=False)
    print_table(bench.rows_out)
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "info")}, indent=1, default=str))
    print(f"\nwrote {args.out}; total {result['total_s']:.0f}s")
    return 0


def versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}


def inprocess(bench: Bench, args, student, GenerationRequest, device: str, wanted: set[str]) -> None:
    engine = student.slot_decoder  # the slot engine as the service runs it (services/trainer/slot_generation.py)
    rows_list = [int(r) for r in args.rows.split(",")]
    max_rows = max(rows_list)
    vocab = student.lm_head.weight.shape[0]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(96, 224) if not args.smoke else 12)]
               for _ in range(max_rows)]

    def requests(rows, mode, tokens):
        sampled = mode == "sampled"
        return [GenerationRequest(prompts[i], max_tokens=tokens, temperature=1.0 if sampled else 0.0,
                                  top_p=1.0, seed=i if sampled else None,
                                  logprobs=0 if sampled else None) for i in range(rows)]

    engines = {"loop": None, "slots": engine, "slots_eager": engine, "slots_sync": engine}
    # Decode copies without the fused layers (services/trainer/fused_layers.py): the same engine over
    # transformers' own projections and norms, for the side-by-side comparison.
    merged = student.merged_decoder
    decoders = {}
    if wanted & {"slots_unfused", "kernels"} and engine is not None:
        from services.trainer.decode import DecodeConfig
        from services.trainer.decode_weights import MergedDecoder
        from services.trainer.slot_generation import SlotGeneration

        decoders["slots_unfused"] = MergedDecoder(student.model, fuse=False)
        engines["slots_unfused"] = SlotGeneration(student, DecodeConfig.for_device(student.device, slots=max_rows))

    def student_run(name, rows, mode, tokens, use_engine, *, use_adapter=True, job=None, gpu_times=None):
        chosen = engines.get(name, engine) if use_engine else None
        student.slot_decoder = chosen
        student.merged_decoder = decoders.get(name, merged)
        if chosen is not None:
            for lane in chosen.engine.lanes.values():
                lane.index.clear()  # no prefix cached from an earlier run: every run prefills its prompts
                lane.graphs.timings = gpu_times  # None: not timed
        reqs = job or requests(rows, mode, tokens)
        sync()
        passes = student.forward_passes
        t = time.perf_counter()
        out = student.generate(reqs, use_adapter=use_adapter)
        sync()
        wall = time.perf_counter() - t
        student.slot_decoder, student.merged_decoder = engine, merged
        if chosen is not None:
            for lane in chosen.engine.lanes.values():
                lane.graphs.timings = None
        generated = sum(s.num_generated for r in out for s in r)
        return out, wall, generated, student.forward_passes - passes

    def time_student(name, use_engine, rows, mode):
        t = time.perf_counter()
        # warm-up: the engine's graphs of every window the timed run reaches; cuBLAS plans for the loop
        student_run(name, rows, mode, args.tokens if use_engine else min(args.tokens, 8), use_engine)
        first = time.perf_counter() - t
        if use_engine:  # the engine captures a prefill shape the second time it comes: not in the timed run
            student_run(name, rows, mode, 2, use_engine)
        gpu_times: list = []
        out, wall, generated, passes = student_run(name, rows, mode, args.tokens, use_engine, gpu_times=gpu_times)
        _, wall_one, _, _ = student_run(name, rows, mode, 1, use_engine)
        # GPU time of the decode and sampling steps (CUDA events around each graph replay): what the host adds
        # per step is ms_per_step minus these two.
        gpu = {}
        for kind in ("decode", "sample"):
            spans = [start.elapsed_time(end) for key, start, end in gpu_times if key[0] == kind]
            if spans:
                gpu[f"gpu_{kind}_ms"] = sum(spans) / len(spans)
        got = [s[0].token_ids for s in out]
        if mode == "greedy" and name == "loop":
            bench.greedy_ref[(rows,)] = got
        check = compare(bench.greedy_ref.get((rows,)), got) if mode == "greedy" and name != "loop" else {}
        bench.record(candidate=name, mode=mode, rows=rows, tokens=generated, wall_s=wall,
                     tok_s=generated / wall, ms_per_pass=1000 * wall / max(passes, 1),
                     ms_per_step=1000 * (wall - wall_one) / max(args.tokens - 1, 1), passes=passes,
                     first_call_s=first, **gpu, **check)

    if "slots_compiled" in wanted and engine is not None:
        from services.trainer.decode import DecodeConfig
        from services.trainer.slot_generation import SlotGeneration

        engines["slots_compiled"] = SlotGeneration(
            student, DecodeConfig.for_device(student.device, slots=max_rows, compile=True)
        )
    # sampled at every size (what the service serves), greedy at the largest (checked against the loop)
    sizes = [(rows, "sampled") for rows in rows_list] + [(max_rows, "greedy")]
    for name, use_engine in (("loop", False), ("slots", True), ("slots_unfused", True), ("slots_compiled", True)):
        if name in wanted and name in engines:
            for rows, mode in sizes:
                bench.guarded(name, lambda n=name, e=use_engine, r=rows, m=mode: time_student(n, e, r, m))
    if "kernels" in wanted and engine is not None:
        def kernels():
            """Kernels and their GPU time per decode step, fused and unfused, from a profile of eager runs of 2
            and 6 tokens (the difference is 4 decode steps; the prefill and first step cancel out)."""
            ids = torch.tensor([prompts[0][:64]], device=student.device)
            with torch.no_grad():
                logits = {name: decoder.base(input_ids=ids).logits.float()
                          for name, decoder in (("fused", merged), ("unfused", decoders["slots_unfused"]))}
            bench.record(candidate="slots", mode="fused_vs_unfused_logits",
                         fused_layers=sorted({type(m).__name__ for m in merged.base.modules()
                                              if type(m).__name__.startswith(("Fused", "Sibling"))}),
                         max_abs_diff=(logits["fused"] - logits["unfused"]).abs().max().item(),
                         max_abs_logit=logits["unfused"].abs().max().item(),
                         argmax_same=(logits["fused"].argmax(-1) == logits["unfused"].argmax(-1)).float().mean().item())
            for name in ("slots", "slots_unfused"):
                lanes = engines[name].engine.lanes
                student_run(name, max_rows, "sampled", 2, True)  # lanes and weights ready
                for lane in lanes.values():
                    lane.graphs.enabled = False
                try:
                    counts = {}
                    for tokens in (2, 6):
                        activities = [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else \
                            [torch.profiler.ProfilerActivity.CPU]
                        with torch.profiler.profile(activities=activities) as prof:
                            student_run(name, max_rows, "sampled", tokens, True)
                        if device == "cuda":
                            events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                            busy = sum(e.device_time for e in events) / 1000
                        else:
                            events = [e for e in prof.events() if e.name.startswith("aten::")]
                            busy = 0.0
                        counts[tokens] = (len(events), busy)
                    bench.record(candidate=name, mode="kernels", rows=max_rows,
                                 kernels_per_step=(counts[6][0] - counts[2][0]) / 4,
                                 kernel_ms_per_step=(counts[6][1] - counts[2][1]) / 4)
                finally:
                    for lane in lanes.values():
                        lane.graphs.enabled = device == "cuda"
        bench.guarded("kernels", kernels)
    if "slots_eager" in wanted and engine is not None:
        def eager():
            for lane in engine.engine.lanes.values():
                lane.graphs.enabled = False
            try:
                time_student("slots_eager", True, max_rows, "sampled")
            finally:
                for lane in engine.engine.lanes.values():
                    lane.graphs.enabled = device == "cuda"
        bench.guarded("slots_eager", eager)
    if "slots_sync" in wanted and engine is not None:
        def in_order():
            engine.engine.config.overlap = False
            try:
                for mode in ("greedy", "sampled"):
                    time_student("slots_sync", True, max_rows, mode)
            finally:
                engine.engine.config.overlap = device == "cuda"
        bench.guarded("slots_sync", in_order)
    for name in ("slots", "slots_compiled"):
        if engines.get(name) is not None:
            lanes = engines[name].engine.lanes.values()
            bench.record(candidate=name, graphs_captured=sum(lane.graphs.captures for lane in lanes),
                         graphs_enabled=[lane.graphs.enabled for lane in lanes],
                         graphs_failure=[lane.graphs.failure for lane in lanes if lane.graphs.failure])

    def prefill_mode(mode: str) -> None:
        """varlen: packed prompts, flash varlen attention where it serves (the default); layout: packed, attention
        through the padded layout; padded: every prompt padded to the longest (the layout before packing)."""
        config = engine.engine.config
        config.pack_prefill, config.varlen_prefill = {"varlen": (True, True), "layout": (True, False),
                                                      "padded": (False, False)}[mode]

    if "continuous" in wanted and engine is not None:
        def continuous():
            """The service's traffic without HTTP: max_rows requests in flight in one generate call, each finished
            request replaced by a new one at the next admission (every `admit_every` steps, as the service's
            batcher admits), for --service-seconds at most 15 s. What the engine's continuous batching keeps of the
            in-process figure, apart from what the HTTP side costs. Per --admit-every, each of --prefill-modes
            side by side, each run twice in turn: the second round replays the graphs the first captured, as a
            long-running service does."""
            try:
                for round_ in (1, 2):
                    for every in (int(e) for e in args.admit_every.split(",")):
                        for mode in args.prefill_modes.split(","):
                            prefill_mode(mode)
                            closed_loop_in_process(every, mode, round_)
            finally:
                prefill_mode("varlen")

        def closed_loop_in_process(admit_every: int, mode: str, round_: int) -> None:
            deadline = time.monotonic() + min(args.service_seconds, 15.0)
            finished, calls, served = [0], [0], [0]
            counter = iter(range(10**9))

            def fresh_prompt() -> list[int]:
                """A prompt no earlier request shares a prefix with (its first two tokens are the request's
                number), as the service's closed loop sends: every admitted request prefills its whole prompt."""
                n = next(counter)
                return [3 + n % 4096, 3 + n // 4096 % 4096, *prompts[n % len(prompts)]]

            def admit(free, every=admit_every):
                calls[0] += 1
                if calls[0] % every or time.monotonic() > deadline:
                    return []
                take = min(free, finished[0] - served[0])
                served[0] += take
                return [GenerationRequest(fresh_prompt(), max_tokens=args.tokens, temperature=1.0, top_p=1.0,
                                          seed=7, logprobs=0) for _ in range(take)]

            answered = [0]  # tokens of the requests reported through on_done (generate keeps none of them)

            def on_done(index, samples):
                finished[0] += 1
                answered[0] += sum(s.num_generated for s in samples)

            lanes = engine.engine.lanes.values()
            gpu_times: list = []
            for lane in lanes:
                lane.index.clear()
                lane.graphs.timings = gpu_times
            before = (engine.engine.forward_passes, engine.engine.prefill_passes, engine.engine.prefill_seconds,
                      sum(lane.graphs.captures for lane in lanes), engine.engine.read_wait_seconds,
                      engine.engine.idle_launches, engine.engine.decode_steps)
            sync()
            t = time.perf_counter()
            # A closed loop's steady state from the start: rows at every stage of their answers (rows that
            # all start together would all finish together, and admit nothing until the run is over).
            first = [GenerationRequest(fresh_prompt(), max_tokens=1 + i * (args.tokens - 1) // max(max_rows - 1, 1),
                                       temperature=1.0, top_p=1.0, seed=i, logprobs=0) for i in range(max_rows)]
            try:
                out = engine.generate(first, admit=admit, on_done=on_done)
                sync()
            finally:
                for lane in lanes:
                    lane.graphs.timings = None
            wall = time.perf_counter() - t
            generated = answered[0]
            passes = engine.engine.forward_passes - before[0]
            # GPU time of the graph replays by kind (prefills run eagerly the first time a shape comes: those are
            # in prefill_s, not here)
            gpu = {}
            for kind in ("decode", "sample", "prefill"):
                spans = [start.elapsed_time(end) for key, start, end in gpu_times if key[0] == kind]
                gpu[f"gpu_{kind}_replays"] = len(spans)
                gpu[f"gpu_{kind}_s"] = sum(spans) / 1000
            bench.record(candidate="slots", mode=f"continuous_admit{admit_every}", rows=max_rows,
                         prefill=mode, round=round_, fresh_prompts=True,
                         tokens=generated, wall_s=wall, tok_s=generated / wall,
                         ms_per_pass=1000 * wall / max(passes, 1), passes=passes,
                         prefill_passes=engine.engine.prefill_passes - before[1],
                         prefill_s=engine.engine.prefill_seconds - before[2],
                         graphs_captured=sum(lane.graphs.captures for lane in lanes) - before[3],
                         read_wait_s=engine.engine.read_wait_seconds - before[4],
                         idle_launches=engine.engine.idle_launches - before[5],
                         decode_steps=engine.engine.decode_steps - before[6],
                         requests=len(out), **gpu)
        bench.guarded("continuous", continuous)
    if "prefill_kernels" in wanted and engine is not None:
        def prefill_kernels():
            """One admission's prefill alone (Lane.place of --prefill-prompts fresh prompts, as a service admission
            every 4 steps brings at 255 in flight), in each of --prefill-modes: its kernels and their GPU time from a
            profile of an eager run, then the GPU time of its graph's replay."""
            from services.trainer.decode.lane import Row

            student_run("slots", 2, "sampled", 2, True)  # the lane exists, its weights are ready
            lane = engine.engine.lane("student")
            count = args.prefill_prompts
            serial = iter(range(10**9))

            def place_once() -> None:
                n = next(serial)
                rows = [Row(GenerationRequest([3 + n % 4096, 3 + i, *prompts[i % len(prompts)]], max_tokens=args.tokens,
                                              temperature=1.0, top_p=1.0, seed=i, logprobs=0),
                            index=i, sample=0, seed=i, stops=()) for i in range(count)]
                with torch.inference_mode():  # as the engine's generate runs
                    placed, _ = lane.place(rows)
                sync()
                for row in placed:
                    lane.release(row.slot, keep_prefix=False)

            try:
                for mode in args.prefill_modes.split(","):
                    prefill_mode(mode)
                    lane.graphs.enabled = False
                    place_once()  # warm-up at this shape
                    activities = [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else \
                        [torch.profiler.ProfilerActivity.CPU]
                    with torch.profiler.profile(activities=activities) as prof:
                        place_once()
                    if device == "cuda":
                        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                    else:
                        events = [e for e in prof.events() if e.name.startswith("aten::")]
                    by_name: dict[str, list[float]] = {}
                    for e in events:
                        entry = by_name.setdefault(e.name[:90], [0, 0.0])
                        entry[0] += 1
                        entry[1] += e.device_time / 1000
                    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:15]
                    lane.graphs.enabled = device == "cuda"
                    gpu_times: list = []
                    for _ in range(3):  # eager, captured, replayed
                        lane.graphs.timings = gpu_times
                        place_once()
                    lane.graphs.timings = None
                    spans = [start.elapsed_time(end) for key, start, end in gpu_times if key[0] == "prefill"]
                    prompt_tokens = sum(len(prompts[i % len(prompts)]) + 2 for i in range(count))
                    bench.record(candidate="slots", mode="prefill_kernels", prefill=mode, prompts=count,
                                 prompt_tokens=prompt_tokens, kernels=len(events),
                                 kernel_ms=sum(v[1] for v in by_name.values()),
                                 graph_replay_ms=spans[-1] if spans else None,
                                 top=[[name, n, round(ms, 3)] for name, (n, ms) in top])
            finally:
                prefill_mode("varlen")
                lane.graphs.enabled = device == "cuda"
                lane.graphs.timings = None
        bench.guarded("prefill_kernels", prefill_kernels)
    if "search" in wanted:
        def search():
            node = prompts[0][:160] if not args.smoke else prompts[0]
            tokens = 64 if not args.smoke else args.tokens
            count = max(max_rows // 8, 1)
            job = [GenerationRequest(node + prompts[i][:8], n=8, max_tokens=tokens, temperature=1.0, seed=i,
                                     stop=["\n"], logprobs=0) for i in range(count)]
            for name, use_engine in (("loop", False), ("slots", True)):
                student_run(name, 0, "", 0, use_engine, job=job)
                lanes = list(engine.engine.lanes.values()) if use_engine else []
                prefilled = [sum(lane.prefill_tokens for lane in lanes), sum(lane.reused_tokens for lane in lanes)]
                _, wall, generated, passes = student_run(name, 0, "", 0, use_engine, job=job)
                reuse = {}
                if use_engine:  # prompt tokens computed vs copied from a shared prefill or a slot's prefix
                    reuse = {"prompt_tokens_computed": sum(lane.prefill_tokens for lane in lanes) - prefilled[0],
                             "prompt_tokens_reused": sum(lane.reused_tokens for lane in lanes) - prefilled[1]}
                bench.record(candidate=name, mode="search", rows=8 * count, tokens=generated, wall_s=wall,
                             tok_s=generated / wall, ms_per_pass=1000 * wall / max(passes, 1), passes=passes,
                             **reuse)
        bench.guarded("search", search)

    if "mixed" in wanted and engine is not None:
        def mixed():
            half = max(max_rows // 2, 1)
            job = requests(half, "greedy", args.tokens)
            loop_out = []
            sync()
            t = time.perf_counter()
            for use_adapter in (True, False):
                out, _, _, _ = student_run("loop", 0, "", 0, False, use_adapter=use_adapter, job=job)
                loop_out += [s[0].token_ids for s in out]
            sync()
            loop_wall = time.perf_counter() - t
            generated = 2 * half * args.tokens
            bench.record(candidate="loop", mode="mixed", rows=2 * half, tokens=generated, wall_s=loop_wall,
                         tok_s=generated / loop_wall)
            jobs = [("student", r) for r in job] + [("base", r) for r in job]
            for _ in range(2):  # the first run captures the graphs
                for lane in engine.engine.lanes.values():
                    lane.index.clear()
                passes = student.forward_passes
                sync()
                t = time.perf_counter()
                out = engine.generate_lanes(jobs)
                sync()
                wall = time.perf_counter() - t
            got = [s[0].token_ids for s in out]
            bench.record(candidate="slots", mode="mixed", rows=2 * half, tokens=generated, wall_s=wall,
                         tok_s=generated / wall, ms_per_pass=1000 * wall / max(student.forward_passes - passes, 1),
                         **compare(loop_out, got))
        bench.guarded("mixed", mixed)

    if "hf_static" in wanted or "hf_cb" in wanted:
        transformers_candidates(bench, args, student, prompts, rows_list, wanted, device)


def transformers_candidates(bench: Bench, args, student, prompts, rows_list, wanted: set[str], device: str) -> None:
    """hf_static and hf_cb: transformers' own fast paths on the merged student's weights."""
    max_rows = max(rows_list)
    plain = student.merged_decoder.student  # the merged student's weights for the transformers candidates
    ids_of = {tuple(p): i for i, p in enumerate(prompts)}

    def hf_model():
        import copy

        model = copy.deepcopy(plain)
        model.set_attn_implementation("sdpa")
        model.generation_config.pad_token_id = student.pad_id
        return model.eval()

    if "hf_static" in wanted:
        def hf_static():
            from transformers import GenerationConfig
            from transformers.generation.configuration_utils import CompileConfig

            model = hf_model()
            stop_at = time.monotonic() + args.hf_budget_s
            for rows in sorted(rows_list, reverse=True):
                for mode in ("greedy", "sampled"):
                    if bench.left() <= 0 or time.monotonic() > stop_at:
                        bench.record(candidate="hf_static", rows=rows, mode=mode, skipped="budget spent")
                        continue
                    width = max(len(p) for p in prompts[:rows])
                    ids = torch.full((rows, width), student.pad_id, dtype=torch.long)
                    mask = torch.zeros((rows, width), dtype=torch.long)
                    for i, p in enumerate(prompts[:rows]):
                        ids[i, width - len(p):] = torch.tensor(p)
                        mask[i, width - len(p):] = 1
                    ids, mask = ids.to(device), mask.to(device)
                    config = GenerationConfig(
                        max_new_tokens=args.tokens, do_sample=mode == "sampled", temperature=1.0,
                        top_p=1.0, pad_token_id=student.pad_id,
                        eos_token_id=student.eos_ids, cache_implementation="static",
                        compile_config=CompileConfig(mode="reduce-overhead"),
                    )
                    walls = []
                    for _ in range(2):  # the first call compiles
                        sync()
                        t = time.perf_counter()
                        with torch.inference_mode():
                            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                        sync()
                        walls.append(time.perf_counter() - t)
                    got = [trim(row, student.eos_ids) for row in out[:, width:].tolist()]
                    generated = sum(len(g) for g in got)
                    check = compare(bench.greedy_ref.get((rows,)), got) if mode == "greedy" else {}
                    bench.record(candidate="hf_static", mode=mode, rows=rows, tokens=generated, wall_s=walls[1],
                                 tok_s=generated / walls[1], ms_per_pass=1000 * walls[1] / args.tokens,
                                 first_call_s=walls[0], **check)
            del model
        bench.guarded("hf_static", hf_static)

    if "hf_cb" in wanted:
        def hf_cb():
            from transformers import GenerationConfig
            from transformers.generation.configuration_utils import ContinuousBatchingConfig

            model = hf_model()
            blocks = 2 * max_rows * (-(-(224 + args.tokens) // 256)) + 16
            cb_config = ContinuousBatchingConfig(num_blocks=blocks)
            stop_at = time.monotonic() + args.hf_budget_s
            for rows in sorted(rows_list, reverse=True):
                for mode in ("greedy", "sampled"):
                    if bench.left() <= 0 or time.monotonic() > stop_at:
                        bench.record(candidate="hf_cb", rows=rows, mode=mode, skipped="budget spent")
                        continue
                    config = GenerationConfig(max_new_tokens=args.tokens, do_sample=mode == "sampled",
                                              temperature=1.0, top_p=1.0,
                                              pad_token_id=student.pad_id, eos_token_id=student.eos_ids[0])
                    walls = []
                    for _ in range(2):
                        sync()
                        t = time.perf_counter()
                        # no inference_mode here: the manager's thread would then meet inference tensors
                        out = model.generate_batch(inputs=prompts[:rows], generation_config=config,
                                                   continuous_batching_config=cb_config)
                        sync()
                        walls.append(time.perf_counter() - t)
                    errors = [o.error for o in out.values() if o.error]
                    if errors or len(out) != rows:
                        raise RuntimeError(f"{len(out)} outputs for {rows} prompts; errors: {errors[:2]}")
                    by_prompt = {ids_of[tuple(o.prompt_ids)]: trim(list(o.generated_tokens), student.eos_ids)
                                 for o in out.values()}
                    got = [by_prompt[i] for i in range(rows)]
                    generated = sum(len(g) for g in got)
                    check = compare(bench.greedy_ref.get((rows,)), got) if mode == "greedy" else {}
                    bench.record(candidate="hf_cb", mode=mode, rows=rows, tokens=generated, wall_s=walls[1],
                                 tok_s=generated / walls[1], ms_per_pass=1000 * walls[1] / args.tokens,
                                 first_call_s=walls[0], **check)
            del model
        bench.guarded("hf_cb", hf_cb)


def trim(tokens: list[int], eos_ids: list[int]) -> list[int]:
    ends = [i for i, t in enumerate(tokens) if t in eos_ids]
    return tokens[: ends[0]] if ends else tokens


def print_table(rows: list[dict]) -> None:
    print(f"\n{'candidate':<14} {'mode':<18} {'rows':>5} {'tok/s':>10} {'ms/pass':>8} {'ms/step':>8} "
          f"{'gpu decode/sample ms':>21} {'greedy same/prefix':>19} {'first call s':>12}")
    for r in rows:
        size = r.get("rows", "") if r.get("candidate") != "service" else r.get("in_flight", "")
        if "tok_s" not in r:
            note = r.get("error") or r.get("skipped") or ""
            if "kernels_per_step" in r:
                note = f"{r['kernels_per_step']:.0f} kernels per decode step, {r['kernel_ms_per_step']:.2f} ms busy"
            if "graphs_captured" in r:
                note = (f"graphs captured {r['graphs_captured']}, enabled per lane {r['graphs_enabled']} "
                        f"{r['graphs_failure'] or ''}")
            print(f"{r.get('candidate', ''):<14} {r.get('mode', ''):<18} {size:>5} {note}"[:400])
            continue
        same = f"{r['greedy_same']:.2f}/{r['greedy_prefix']:.2f}" if "greedy_same" in r else ""
        gpu = f"{r['gpu_decode_ms']:.2f}/{r.get('gpu_sample_ms', float('nan')):.2f}" if "gpu_decode_ms" in r else ""
        extra = ""
        if r.get("candidate") == "service":
            extra = (f"  {r['requests']} requests, p50 {r['latency_p50_s']:.2f}s p99 {r['latency_p99_s']:.2f}s, "
                     f"conn errors {r['connection_errors']} {r['transport_errors'] or ''}, "
                     f"http errors {r['http_errors'] or 0}, {r['tokens_per_pass']:.0f} tok/pass")
        print(f"{r['candidate']:<14} {r['mode']:<18} {size:>5} {r['tok_s']:>10.0f} "
              f"{r.get('ms_per_pass', float('nan')):>8.2f} {r.get('ms_per_step', float('nan')):>8.2f} {gpu:>21} "
              f"{same:>19} {r.get('first_call_s', float('nan')):>12.1f}{extra}")


if __name__ == "__main__":
    sys.exit(main())
