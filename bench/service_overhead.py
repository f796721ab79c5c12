"""What the trainer service adds per request (issue #20): the same closed loop against services of several
checkouts, measured in turns in one run, and a py-spy profile of one service under that load.

    python bench/service_overhead.py --checkouts "base=/tmp/svc-base,this=." --in-flight 255 --repeats 3
    python bench/service_overhead.py --profile-s 20 --in-flight 255          # py-spy --gil of this checkout's service
    python bench/service_overhead.py --variants "split:TRAINER_ENGINE_PROCESS=true" --in-flight 32,255

The model is gpu_serving.py's tiny shape (random weights, 2 layers, hidden 64, a made-up tokenizer of one token per
character), whose decode step takes a few ms on a CPU as a 135M model's does on a GPU, so the service's own costs
(HTTP, pydantic, tokenizing, response shaping, the GIL they share with the decode thread) show as they do there.
Each checkout's service (`python -m services.trainer`, its own code on PYTHONPATH) loads first; then for each
repeat every service in turn runs a closed loop of /v1/completions (bench/service_load.py, gpu_serving.py's request:
distinct prompts of 96-224 characters, sampled, seeded, logprobs 0) while the others sit idle. Figures per loop:
tok/s, requests/s, and from /health's counters the decode forward passes: ms per pass and tokens per pass.
--variants adds services of the first checkout with other TRAINER_* settings (name:VAR=value,...;name:...). CPU per
request: the service's main thread (the event loop), its other threads, and its child processes (the engine
process of TRAINER_ENGINE_PROCESS, where the decode thread then runs).

--profile-s: after the loops, `py-spy record --gil --format raw` of the first service during one more loop; the
printed table is each function's share of the GIL-holding samples, inclusive (top 40), and the decode thread's
share against the event loop's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start(name: str, checkout: Path, work: Path, model: Path, rows: int, extra_env: dict[str, str]):
    from orchestrator.local.processes import free_port, trainer_process

    env = {
        "PYTHONPATH": str(checkout),
        "TRAINER_MODEL_SOURCE": str(model),
        "TRAINER_MODEL_CACHE_DIR": str(work / "cache"),
        "TRAINER_DEVICE": "cpu",
        "TRAINER_LOAD_IN_4BIT": "false",
        "TRAINER_MAX_BATCH_SIZE": str(rows),
        "TRAINER_MAX_REQUESTS_IN_FLIGHT": str(4 * rows),
        "TRAINER_COMPILE_LAYERS": "false",
        "TRAINER_GRADIENT_CHECKPOINTING": "false",
        "TRAINER_DECODE_ENGINE": "slots",
        **extra_env,
    }
    return trainer_process(free_port(), work / name, env=env, cwd=checkout).start()


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of the process's main thread (uvicorn's event loop: its thread id is the
    process id) and of all its other threads together (the decode thread, tokenizer and torch pools)."""
    tick = os.sysconf("SC_CLK_TCK")
    main = other = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:  # the thread ended
            continue
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if int(task.name) == pid:
            main += seconds
        else:
            other += seconds
    return main, other


def children_cpu_seconds(pid: int) -> float:
    """CPU seconds of the process's children, all their threads (the engine process of TRAINER_ENGINE_PROCESS, and
    multiprocessing's resource tracker, which does next to nothing)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for child in children:
            total += sum(cpu_seconds(int(child)))
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkouts", default=f"this={ROOT}", help="name=path,... (each a checkout of the project)")
    parser.add_argument("--env", default="", help="TRAINER_*=value,... for every service")
    parser.add_argument("--variants", default="", help="name:TRAINER_*=value,...;... services of the first checkout "
                        "with other settings, e.g. split:TRAINER_ENGINE_PROCESS=true")
    parser.add_argument("--in-flight", default="255", help="levels, e.g. 32,255 (each: every repeat, every service)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup-s", type=float, default=4.0)
    parser.add_argument("--profile-s", type=float, default=0.0)
    parser.add_argument("--profile-out", default=os.path.join(tempfile.gettempdir(), "service_profile.txt"),
                        help="py-spy's raw stacks (collapsed: frames;...;frame count)")
    parser.add_argument("--out", default=None, help="JSON of every loop")
    args = parser.parse_args()

    import httpx

    from bench.gpu_serving import write_model
    from bench.service_load import closed_loop, text_prompt

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="service-overhead-"))
    write_model(work / "model", ROOT / "bench" / "configs" / "smollm2-135m", tiny=True)
    extra_env = dict(a.split("=", 1) for a in args.env.split(",") if a)
    checkouts = dict(c.split("=", 1) for c in args.checkouts.split(","))
    levels = [int(level) for level in args.in_flight.split(",")]
    rows = max(256, *levels)
    from bench.gpu_serving import parse_variants

    first = Path(next(iter(checkouts.values()))).resolve()
    runs = {name: (Path(path).resolve(), {}) for name, path in checkouts.items()}
    runs.update({name: (first, env) for name, env in parse_variants(args.variants).items()})
    services = {
        name: start(name, path, work, work / "model", rows, {**extra_env, **env}) for name, (path, env) in runs.items()
    }
    rng = random.Random(1)
    texts = [text_prompt(rng, rng.randint(96, 224)) for _ in range(256)]

    def body(client: int, k: int) -> dict:
        text = texts[(client * 7 + k) % len(texts)]
        return {"model": "student", "prompt": f"{client} {k} {text}", "max_tokens": args.tokens,
                "temperature": 1.0, "top_p": 1.0, "seed": client * 100_003 + k, "logprobs": 0}

    def loop(process, in_flight: int) -> dict:
        url = process.url
        counters = lambda: httpx.get(url + "/health", timeout=30).json()["batcher"]  # noqa: E731
        pid = process.proc.pid
        before, cpu_before, engine_before = counters(), cpu_seconds(pid), children_cpu_seconds(pid)
        result = asyncio.run(closed_loop(url, in_flight, args.seconds, body))
        cpu_after, engine_after = cpu_seconds(pid), children_cpu_seconds(pid)
        passes = counters()["forward_passes"] - before["forward_passes"]
        requests = max(result["requests"], 1)
        main_ms = 1000 * (cpu_after[0] - cpu_before[0]) / requests
        other_ms = 1000 * (cpu_after[1] - cpu_before[1]) / requests
        return {**result, "forward_passes": passes, "ms_per_pass": 1000 * result["wall_s"] / max(passes, 1),
                "tokens_per_pass": result["tokens"] / max(passes, 1),
                "event_loop_cpu_ms_per_request": main_ms, "other_threads_cpu_ms_per_request": other_ms,
                "child_processes_cpu_ms_per_request": 1000 * (engine_after - engine_before) / requests}

    loops = []
    try:
        for process in services.values():
            process.wait_ready(300)
            asyncio.run(closed_loop(process.url, max(levels), args.warmup_s, body))
        for level, repeat in ((level, repeat) for level in levels for repeat in range(args.repeats)):
            for name, process in services.items():
                result = loop(process, level)
                loops.append({"service": name, "repeat": repeat, "load_avg": os.getloadavg()[0], **result})
                print(f"{name:>10} {level:3d} r{repeat} {result['tok_s']:8.0f} tok/s {result['requests_s']:6.1f} req/s "
                      f"{result['ms_per_pass']:6.2f} ms/pass {result['tokens_per_pass']:6.1f} tok/pass "
                      f"loop CPU {result['event_loop_cpu_ms_per_request']:5.2f} ms/req, other threads "
                      f"{result['other_threads_cpu_ms_per_request']:5.2f}, children "
                      f"{result['child_processes_cpu_ms_per_request']:5.2f} "
                      f"conn_err {result['connection_errors']} http {result['http_errors']} "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
        for level, name in ((level, name) for level in levels for name in services):
            mine = [x for x in loops if x["service"] == name and x["in_flight"] == level]
            tok_s = sum(x["tok_s"] for x in mine) / len(mine)
            cpu = sum(x["event_loop_cpu_ms_per_request"] for x in mine) / len(mine)
            print(f"{name:>10} {level:3d} mean {tok_s:8.0f} tok/s, event-loop CPU {cpu:5.2f} ms/request over "
                  f"{len(mine)} loops", flush=True)
        if args.profile_s > 0:
            name, process = next(iter(services.items()))
            profile(process, args.profile_s, Path(args.profile_out),
                    lambda: asyncio.run(closed_loop(process.url, max(levels), args.profile_s + 2, body)))
    finally:
        for process in services.values():
            process.stop()
    if args.out:
        Path(args.out).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "command": " ".join(sys.argv),
            "machine": f"{platform.processor() or 'cpu'}, {os.cpu_count()} CPU cores", "checkouts": checkouts,
            "loops": loops}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def profile(process, seconds: float, path: Path, load) -> None:
    """py-spy (GIL holders only) of the service's process while `load` runs; prints inclusive shares."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    pid = process.proc.pid
    recorder = subprocess.Popen([spy, "record", "--gil", "--format", "raw", "--rate", "200", "--duration",
                                 str(int(seconds)), "--pid", str(pid), "--output", str(path), "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    load()
    recorder.wait(timeout=seconds + 60)
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        total += n
        threads["decode thread" if any("trainer-batcher" in f or "_work (services/trainer/batching.py" in f
                                       for f in frames) else "event loop / other"] += n
        for frame in set(frames):
            inclusive[frame] += n
        leaf[frames[-1]] += n
    print(f"\npy-spy --gil: {total} samples")
    for name, n in threads.most_common():
        print(f"  {100 * n / max(total, 1):5.1f}%  {name}")
    for frame, n in inclusive.most_common(60):
        print(f"  {100 * n / max(total, 1):5.1f}%  {frame[:150]}")
    print("self (leaf frames):")
    for frame, n in leaf.most_common(30):
        print(f"  {100 * n / max(total, 1):5.1f}%  {frame[:150]}")


if __name__ == "__main__":
    raise SystemExit(main())
