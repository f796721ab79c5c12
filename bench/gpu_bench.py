"""GPU trainer benchmark: the trainer's own engine (services/trainer/student.py) against the naive baseline, and
its two CUDA backends (--backend transformers | unsloth) against each other.

Run on a CUDA machine from the repository root (bitsandbytes and the service's pure-Python needs on PYTHONPATH),
e.g. the headline 4-bit run of bench/RESULTS.md:
    python3 bench/gpu_bench.py --configs llama-3.2-3b:nf4:engine+ckpt+fused+tf32+autocast+compile \
        --grid 8x512,16x512,8x1024 --stage-grid 8x512 --naive-grid 8x512,16x512 --gen-tokens 32 --out gpu.json

For each model:quant[:stages] entry it writes a random bf16 model of bench/configs/<model>/config.json to a
scratch directory (weights on disk, so the engine takes its real from_pretrained path: NF4 via bitsandbytes or
bf16; the tokenizer is --tokenizer's files, or else a word-level one covering the whole vocabulary), loads it with
services.trainer.loading.load_student (LoRA r=32 on all projections, 8-bit AdamW) through --backend, and times:
- naive: the original's way (bench/gpu_naive.py) on the same loaded model, before any change;
- generate: Student.generate (the /v1/completions work), with the engine's sampler and with device sampling;
- then, stage by stage, the proposed changes to the engine (cumulative, see apply_stage; "engine" = the code as
  it is): grpo = Student.grpo_step (reference pass with adapters disabled + policy pass + backward + optimizer
  step), logprobs = Student.logprobs, at each BxL[/micro-batch] of --stage-grid, and of --grid at the last stage.
tokens/s counts prompt + completion tokens (prompt = L/4); peak = torch.cuda.max_memory_allocated over the timed
calls (weights, optimizer state and activations); times are medians of --repeat calls after --warmup.
MFU = 6 * params * tokens / seconds / 989e12 (H100 dense bf16 datasheet); 6N = reference forward + forward +
backward of a LoRA step (activation checkpointing adds a forward that is not counted).

Backends (each in its own process: Unsloth patches transformers on import), e.g. on one machine:
    python3 bench/gpu_bench.py --backend transformers --configs llama-3.2-3b:nf4:engine --grid 8x512,16x512 \
        --naive-grid "" --gen-quants nf4 --gen-tokens 32 --service-check --out transformers.json
    python3 bench/gpu_bench.py --backend unsloth ... --out unsloth.json
Only the engine as the backend loads it is timed under Unsloth (the stages and the naive baseline patch or copy
the model the transformers way). --service-check loads the student through the trainer service instead (the real
app in-process) and first runs bench/gpu_service.py's round on it (generate, /logprobs, /grpo/step, checkpoints),
recorded under "service" in the output. bench/gpu_backends.sh runs both backends on the lent GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_fused import fused_completion_logprobs  # noqa: E402
from bench.gpu_naive import Sequence, deep_copied_reference, naive_grpo_step, naive_logprobs  # noqa: E402

H100_BF16_FLOPS = 989e12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 1024**3


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# ---------------------------------------------------------------- models


def random_model_dir(name: str, scratch: Path, tokenizer_dir: Path | None) -> Path:
    """A HF directory with random bf16 weights for bench/configs/<name> (built once, on the GPU), with the
    tokenizer files of tokenizer_dir, or a word-level tokenizer of the model's whole vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    target = scratch / name
    if (target / ".complete").is_file():
        return target
    config = AutoConfig.from_pretrained(REPO / "bench" / "configs" / name)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target, safe_serialization=True)
    if tokenizer_dir is not None:
        for file in tokenizer_dir.iterdir():
            shutil.copy(file, target / file.name)
    else:
        word_level_tokenizer(config).save_pretrained(target)
    (target / ".complete").write_text("ok")
    del model
    torch.cuda.empty_cache()
    return target


def word_level_tokenizer(config):
    """A tokenizer whose every id is one word "<tN>" (space-separated in text), over the model's whole vocabulary:
    any id a random model samples decodes, and text made of such words encodes back to the same ids. Its pad and
    eos are the config's own ids (Llama 3: 128004 and 128009), so no backend adds a pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    eos = config.eos_token_id[-1] if isinstance(config.eos_token_id, list) else config.eos_token_id
    pad = 128004 if config.vocab_size > 128004 else 0
    words = Tokenizer(models.WordLevel({f"<t{i}>": i for i in range(config.vocab_size)}, unk_token="<t0>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=words,
        bos_token=f"<t{config.bos_token_id}>",
        eos_token=f"<t{eos}>",
        pad_token=f"<t{pad}>",
        unk_token="<t0>",
    )


def prompt_text(length: int, seed: int) -> str:
    """A prompt of `length` word-level tokens (see word_level_tokenizer)."""
    ids = random_batch(1, length, seed)[0][0].tolist()
    return " ".join(f"<t{i}>" for i in ids)


def engine_settings(path: Path, quant: str, scratch: Path, backend: str):
    from services.trainer.settings import TrainerSettings

    return TrainerSettings(
        model_source=str(path),
        device="cuda",
        load_in_4bit=quant == "nf4",
        backend=backend,
        max_context=8192,
        checkpoint_dir=scratch / f"checkpoints-{backend}",
        learning_rate=1e-4,
    )


def load_engine_student(path: Path, quant: str, scratch: Path, backend: str = "transformers"):
    """The product's own engine (services.trainer.loading.load_student), as the trainer service loads it."""
    from services.trainer.loading import load_student

    student = load_student(engine_settings(path, quant, scratch, backend))
    torch.set_num_threads(min(torch.get_num_threads(), 8))
    return student


@contextlib.contextmanager
def service_student(path: Path, quant: str, scratch: Path, backend: str, prompt: str, report: dict):
    """The trainer service (the real app, in-process) on the model: runs bench/gpu_service.py's round, puts its
    report in `report`, and yields the service's own Student (or None when the load failed)."""
    from fastapi.testclient import TestClient

    from bench.gpu_service import ServiceRound
    from services.trainer.api import create_app

    with TestClient(create_app(engine_settings(path, quant, scratch, backend))) as client:
        report.update(ServiceRound(client, prompt).run(ready_timeout=900))
        engine = client.app.state.loader.engine
        torch.set_num_threads(min(torch.get_num_threads(), 8))
        yield engine.core.student if engine is not None else None  # the in-process core (LocalCore)


def count_params(name: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(REPO / "bench" / "configs" / name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- the proposed patches, applied in stages


def apply_stage(student, stage: str) -> None:
    """Add one proposed change to a loaded engine (cumulative); 'engine' = the trainer's code as it is."""
    if stage == "engine":
        return
    if stage == "ckpt":  # activation checkpointing of the decoder layers (recompute in backward)
        student.model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif stage == "fused":  # lm_head fused into a chunked selective log-softmax (bench/gpu_fused.py)
        student._completion_logprobs = types.MethodType(fused_completion_logprobs, student)
    elif stage == "tf32":  # the float32 LoRA matmuls on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif stage == "autocast":  # bf16 autocast: the float32 LoRA weights join the bf16 matmuls (no fp32 casts)
        inner = student._completion_logprobs

        def completion_logprobs_autocast(items):
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                return inner(items)

        student._completion_logprobs = completion_logprobs_autocast
    elif stage == "compile":  # regional torch.compile: each decoder layer, code shared by all layers
        from torch import _dynamo

        _dynamo.config.cache_size_limit = 64
        _dynamo.config.accumulated_cache_size_limit = 4096
        for layer in student.decoder.layers:
            layer.compile()
    else:
        raise ValueError(f"unknown stage {stage!r}")


def split_list(text: str) -> list[str]:
    return [s for s in text.split(",") if s]


def parse_shape(shape: str, default_micro: int) -> tuple[int, int, int]:
    """'BxL' or 'BxL/M' (M sequences per micro-batch; default: --micro-batch, 0 = all B)."""
    dims, _, micro = shape.partition("/")
    batch, length = map(int, dims.split("x"))
    return batch, length, int(micro) if micro else (default_micro or batch)


def profile_step(step, title: str) -> None:
    """One step under torch.profiler: GPU busy time against wall time, and the costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.time()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    wall = time.time() - t0
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events) / 1e6
    log(
        f"profile {title}: wall {wall:.3f} s (profiled), GPU kernels {gpu:.3f} s, "
        f"kernel launches {sum(e.count for e in events if e.device_type.name == 'CUDA')}"
    )
    print(events.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60), flush=True)


def random_batch(batch: int, length: int, seed: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Random token ids (B, L) below 49152 (any tokenizer's range), prompt length P = L/4 (a GSM8K question with
    its chat template is ~100-150 tokens, a solution ~200-400), and advantages."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49152, (batch, length), generator=gen)
    return ids, length // 4, torch.randn(batch, generator=gen)


def grpo_items(ids: torch.Tensor, prompt_len: int, adv: torch.Tensor):
    from services.trainer.items import GrpoItem

    rows = ids.tolist()
    return [
        GrpoItem(context_ids=r[:prompt_len], completion_ids=r[prompt_len:], advantage=float(a))
        for r, a in zip(rows, adv.tolist())
    ]


def score_items(ids: torch.Tensor, prompt_len: int):
    from services.trainer.items import ScoreItem

    return [ScoreItem(context_ids=r[:prompt_len], completion_ids=r[prompt_len:]) for r in ids.tolist()]


# ---------------------------------------------------------------- timing


def timed(fn, warmup: int, repeat: int) -> tuple[float, float]:
    """Median seconds per call and peak GiB over the timed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1000)
    times.sort()
    return times[len(times) // 2], torch.cuda.max_memory_allocated() / GIB


def row(**fields) -> dict:
    log(json.dumps(fields))
    return fields


def bench_config(
    name: str, quant: str, stages: list[str], args, scratch: Path, tok_dir: Path | None, service: dict
) -> list[dict]:
    path = random_model_dir(name, scratch, tok_dir)
    torch.backends.cuda.matmul.allow_tf32 = False
    if not args.service_check:
        return bench_student(
            load_engine_student(path, quant, scratch, args.backend), name, quant, stages, args
        )
    report = service.setdefault(f"{name}:{quant}", {})
    with service_student(path, quant, scratch, args.backend, prompt_text(96, seed=2), report) as student:
        if student is None:
            return []
        return bench_student(student, name, quant, stages, args)


def bench_student(student, name: str, quant: str, stages: list[str], args) -> list[dict]:
    from services.protocol import LossSettings as LossConfig

    rows = []
    params = count_params(name)
    trainable = sum(p.numel() for p in student.trainable)
    common = dict(
        model=name,
        quant=quant,
        params=params,
        device=torch.cuda.get_device_name(),
        backend=student.backend,
        trainable_params=trainable,
    )
    log("loaded", student.backend, "trainable parameters", trainable)

    def flops_share(tokens: int, sec: float) -> float:
        return 6 * params * tokens / sec / H100_BF16_FLOPS

    for shape in args.naive_grid:  # the original's way, on the same loaded model, before any patch
        batch, length, _ = parse_shape(shape, 0)
        ids, plen, adv = random_batch(batch, length, seed=batch * 7919 + length)
        seqs = [Sequence(ids[i].to(student.device), plen, float(adv[i])) for i in range(batch)]
        tokens = batch * length
        gc.collect()
        torch.cuda.empty_cache()
        try:
            reference = deep_copied_reference(student.model)
            sec, peak = timed(
                lambda: naive_grpo_step(student.model, reference, student.optimizer, seqs),
                1,
                args.naive_repeat,
            )
            rows.append(
                row(
                    op="grpo",
                    path="naive",
                    batch=batch,
                    length=length,
                    seconds=sec,
                    tok_s=tokens / sec,
                    peak_gib=peak,
                    mfu=flops_share(tokens, sec),
                    **common,
                )
            )
            del reference
        except Exception as exc:  # noqa: BLE001 - a failure of the baseline is a result too
            rows.append(
                row(
                    op="grpo",
                    path="naive",
                    batch=batch,
                    length=length,
                    error=f"{type(exc).__name__}: {exc}"[:300],
                    **common,
                )
            )
        student.optimizer.zero_grad(set_to_none=True)
        student.model.eval()
        gc.collect()
        torch.cuda.empty_cache()
        sec, peak = timed(lambda: naive_logprobs(student.model, seqs), 1, args.naive_repeat)
        rows.append(
            row(
                op="logprobs",
                path="naive",
                batch=batch,
                length=length,
                seconds=sec,
                tok_s=tokens / sec,
                peak_gib=peak,
                **common,
            )
        )

    want_gen = args.gen_tokens and quant in split_list(args.gen_quants)
    if want_gen:
        rows += time_generation(student, args, common, suffix="")

    applied = []
    for index, stage in enumerate(stages):
        try:
            apply_stage(student, stage)
        except Exception as exc:  # noqa: BLE001
            rows.append(
                row(
                    op="stage",
                    path=stage,
                    batch=0,
                    length=0,
                    error=f"{type(exc).__name__}: {exc}"[:300],
                    **common,
                )
            )
            break
        applied.append(stage)
        label = "+".join(applied)
        grid = args.grid if index == len(stages) - 1 else args.stage_grid
        for shape in grid:
            batch, length, micro = parse_shape(shape, args.micro_batch)
            ids, plen, adv = random_batch(batch, length, seed=batch * 7919 + length)
            items, scored = grpo_items(ids, plen, adv), score_items(ids, plen)
            tokens = batch * length
            loss = LossConfig(micro_batch_size=micro)
            gc.collect()
            torch.cuda.empty_cache()
            try:
                t0 = time.time()
                student.grpo_step(items, loss)  # the first call pays for compilation, if any
                first = time.time() - t0
                sec, peak = timed(lambda: student.grpo_step(items, loss), args.warmup, args.repeat)
                rows.append(
                    row(
                        op="grpo",
                        path=label,
                        batch=batch,
                        length=length,
                        micro_batch=loss.micro_batch_size,
                        seconds=sec,
                        first_call_s=first,
                        tok_s=tokens / sec,
                        peak_gib=peak,
                        mfu=flops_share(tokens, sec),
                        **common,
                    )
                )
                if args.profile and index == len(stages) - 1 and shape == grid[0]:
                    try:
                        profile_step(
                            lambda: student.grpo_step(items, loss), f"{name} {quant} {label} {shape}"
                        )
                    except Exception as exc:  # noqa: BLE001 - the profile is a diagnostic only
                        log("profile failed:", exc)
            except Exception as exc:  # noqa: BLE001 - out of memory or a compile failure: record and go on
                rows.append(
                    row(
                        op="grpo",
                        path=label,
                        batch=batch,
                        length=length,
                        error=f"{type(exc).__name__}: {exc}"[:300],
                        **common,
                    )
                )
            gc.collect()
            torch.cuda.empty_cache()
            try:
                sec, peak = timed(
                    lambda: student.logprobs(scored, batch_size=batch), args.warmup, args.repeat
                )
                rows.append(
                    row(
                        op="logprobs",
                        path=label,
                        batch=batch,
                        length=length,
                        seconds=sec,
                        tok_s=tokens / sec,
                        peak_gib=peak,
                        **common,
                    )
                )
            except Exception as exc:  # noqa: BLE001
                rows.append(
                    row(
                        op="logprobs",
                        path=label,
                        batch=batch,
                        length=length,
                        error=f"{type(exc).__name__}: {exc}"[:300],
                        **common,
                    )
                )
    if want_gen and args.gen_after_stages:
        rows += time_generation(student, args, common, suffix="+" + "+".join(applied))
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def time_generation(student, args, common: dict, suffix: str) -> list[dict]:
    """/v1/completions work: the engine's batched decode loop, n samples of one prompt, no stop strings."""
    from services.trainer.items import GenerationRequest

    rows = []
    prompt = random_batch(1, 128, seed=1)[0][0, :96].tolist()
    requests = [
        GenerationRequest(
            prompt_ids=prompt, n=args.gen_batch, max_tokens=args.gen_tokens, temperature=1.0, seed=3
        )
    ]
    for variant in split_list(args.gen_variants):
        produced = []

        def generate():
            samples = student.generate(requests)
            produced.append(sum(s.num_generated for s in samples[0]))

        try:
            t0 = time.time()
            generate()  # warm-up (and compilation, if any)
            first = time.time() - t0
            sec, peak = timed(generate, 0, 1)
            rows.append(
                row(
                    op="generate",
                    path=variant + suffix,
                    batch=args.gen_batch,
                    length=args.gen_tokens,
                    seconds=sec,
                    first_call_s=first,
                    tok_s=produced[-1] / sec,
                    peak_gib=peak,
                    **common,
                )
            )
        except Exception as exc:  # noqa: BLE001
            rows.append(
                row(
                    op="generate",
                    path=variant + suffix,
                    batch=args.gen_batch,
                    length=args.gen_tokens,
                    error=f"{type(exc).__name__}: {exc}"[:300],
                    **common,
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs",
        default="qwen2.5-0.5b:nf4,llama-3.2-3b:nf4,llama-3.2-3b:bf16",
        help="model:quant[:stage+stage...] entries (quant nf4 or bf16)",
    )
    parser.add_argument("--stages-nf4", default="engine,ckpt,fused,tf32,compile")
    parser.add_argument("--stages-bf16", default="engine,fused,tf32,compile")
    parser.add_argument("--grid", default="8x512,16x512,8x1024", help="BxL settings timed at the last stage")
    parser.add_argument("--stage-grid", default="8x512", help="BxL settings timed at the earlier stages")
    parser.add_argument("--naive-grid", default="8x512")
    parser.add_argument("--micro-batch", type=int, default=0, help="0 = the whole batch in one micro-batch")
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--gen-batch", type=int, default=16)
    # Runs A-E also timed a "device-sampling" variant; that sampler is now the engine's own (sampling.py).
    parser.add_argument("--gen-variants", default="engine", help="a label per timed generation pass")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--naive-repeat", type=int, default=2)
    parser.add_argument("--scratch", default="/tmp/bench_models")
    parser.add_argument("--tokenizer", default=str(REPO / ".bench_assets" / "tokenizer"))
    parser.add_argument("--profile", action="store_true", help="profile one step of the last stage")
    parser.add_argument(
        "--gen-after-stages", action="store_true", help="time generation again after the stages"
    )
    parser.add_argument("--gen-quants", default="nf4,bf16", help="quantisations whose generation is timed")
    parser.add_argument(
        "--backend",
        default="transformers",
        choices=["transformers", "unsloth"],
        help="the trainer's CUDA backend (TRAINER_BACKEND)",
    )
    parser.add_argument(
        "--service-check",
        action="store_true",
        help="load through the trainer service and run bench/gpu_service.py's round first",
    )
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if (
        args.backend == "unsloth"
    ):  # before transformers, as in the trainer service (Unsloth patches it on import)
        import unsloth  # noqa: F401
    split = lambda text: [s for s in text.split(",") if s]  # noqa: E731
    args.grid, args.stage_grid, args.naive_grid = (
        split(args.grid),
        split(args.stage_grid),
        split(args.naive_grid),
    )
    tok_dir = Path(args.tokenizer) if Path(args.tokenizer).is_dir() else None
    scratch = Path(args.scratch)
    rows, service = [], {}
    command = "python3 bench/gpu_bench.py " + " ".join(sys.argv[1:])
    for entry in split(args.configs):
        name, quant, *own = entry.split(":")
        stages = own[0].split("+") if own else split(args.stages_nf4 if quant == "nf4" else args.stages_bf16)
        if args.backend != "transformers" and (stages != ["engine"] or args.naive_grid):
            parser.error(
                "under --backend unsloth only the engine is timed: give model:quant:engine and "
                "--naive-grid ''"
            )
        log("config", name, quant, stages, "backend", args.backend)
        try:
            rows += bench_config(name, quant, stages, args, scratch, tok_dir, service)
        except Exception as exc:  # a load that fails is a result; the file still gets written
            rows.append(
                row(
                    op="load",
                    path=args.backend,
                    batch=0,
                    length=0,
                    model=name,
                    quant=quant,
                    backend=args.backend,
                    error=f"{type(exc).__name__}: {exc}"[:2000],
                )
            )
        if args.out:
            result = {
                "rows": rows,
                "command": command,
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            if args.service_check:
                result["service"] = service
            Path(args.out).write_text(json.dumps(result, indent=1))
    print_table(rows)
    for key, report in service.items():
        failed = [n for n, c in report.get("checks", {}).items() if not c["ok"]]
        broken = [n for n, st in report.get("stages", {}).items() if not st["ok"]]
        log("service", key, "passed" if report.get("passed") else f"FAILED stages {broken} checks {failed}")


def print_table(rows: list[dict]) -> None:
    print(
        f"{'model':13} {'q':4} {'backend':12} {'op':8} {'path':28} {'BxL':8} {'tok/s':>8} {'GiB':>6} {'mfu':>6}"
    )
    for r in rows:
        head = (
            f"{r['model']:13} {r['quant']:4} {r.get('backend', 'transformers'):12} {r['op']:8} {r['path']:28} "
            f"{str(r['batch']) + 'x' + str(r['length']):8}"
        )
        if "error" in r:
            print(head, "ERROR", r["error"][:60])
            continue
        mfu = f"{r['mfu']:.3f}" if "mfu" in r else ""
        print(f"{head} {r['tok_s']:8.0f} {r['peak_gib']:6.2f} {mfu:>6}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
