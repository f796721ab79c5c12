"""GPU trainer benchmark: the fast GRPO path against the naive baseline, on random-initialised real architectures.

Run on a CUDA machine from the repository root, e.g.
    python3 bench/gpu_bench.py --models qwen2.5-0.5b,llama-3.2-3b --quant bf16,nf4 --grid 8x512,16x512,8x1024 \
        --naive-grid 8x512 --out /tmp/gpu.json

For each (model config, quantisation) it builds a random model (bench/configs/<name>/config.json, weights saved
once to a scratch directory so that loading follows the product's from_pretrained path), adds LoRA, and times:
- grpo: one GRPO step (reference pass with adapters disabled + policy forward + backward + 8-bit AdamW) per
  batch x length setting; tokens/s counts prompt + completion tokens; peak = torch.cuda.max_memory_allocated;
- logprobs: a no-grad scoring pass (the /logprobs work);
- generate: sampled generation tokens/s (the /v1/completions work);
- naive: the original's way (bench/gpu_naive.py) at the same batch and length.
MFU = 6 * params * tokens / seconds / 989e12 (H100 dense bf16 datasheet), 6N = reference forward + forward +
backward of a LoRA step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_fused import linear_selective_log_softmax  # noqa: E402
from bench.gpu_naive import Sequence, deep_copied_reference, naive_grpo_step, naive_logprobs  # noqa: E402
from services.trainer.grpo import grpo_loss, selective_log_softmax  # noqa: E402

H100_BF16_FLOPS = 989e12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 1024 ** 3


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# ---------------------------------------------------------------- models

def random_model_dir(name: str, scratch: Path, tokenizer_dir: Path | None) -> Path:
    """A HF directory with random bf16 weights for bench/configs/<name> (built once, on the GPU)."""
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
    (target / ".complete").write_text("ok")
    del model
    torch.cuda.empty_cache()
    return target


@dataclass
class Student:
    model: torch.nn.Module       # the peft model
    optimizer: torch.optim.Optimizer
    vocab: int


def load_student(path: Path, quant: str, checkpointing: bool, lora_r: int = 32) -> Student:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0},
                                                attn_implementation="sdpa", **kwargs)
    base.config.use_cache = False
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, LoraConfig(r=lora_r, lora_alpha=lora_r, lora_dropout=0.0,
                                            target_modules=TARGETS, task_type="CAUSAL_LM"),
                           autocast_adapter_dtype=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(trainable, lr=1e-5)
    return Student(model, optimizer, base.config.vocab_size)


def count_params(name: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(REPO / "bench" / "configs" / name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- batches and fast path

def random_batch(batch: int, length: int, vocab: int, seed: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Random token ids (B, L), prompt length P (a quarter of L, like a GSM8K question + chat template), advantages."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(0, min(vocab, 49152), (batch, length), device="cuda", generator=gen)
    adv = torch.randn(batch, device="cuda", generator=gen)
    return ids, length // 4, adv


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.Tensor]:
    causal_lm = model.get_base_model()
    return causal_lm.model, causal_lm.lm_head.weight


def completion_logprobs(model, ids: torch.Tensor, prompt_len: int, head: str) -> torch.Tensor:
    """(B, C) log-probs of the completion tokens ids[:, P:], batched; head = 'fused' or 'logits'."""
    targets = ids[:, prompt_len:]
    if head == "fused":
        decoder, weight = decoder_and_head(model)
        hidden = decoder(input_ids=ids).last_hidden_state[:, prompt_len - 1:-1]
        return linear_selective_log_softmax(hidden, weight, targets)
    logits = model(input_ids=ids, logits_to_keep=ids.shape[1] - prompt_len + 1).logits[:, :-1]
    return selective_log_softmax(logits, targets)


def fast_grpo_step(student: Student, ids: torch.Tensor, prompt_len: int, adv: torch.Tensor, head: str,
                   micro_batch: int) -> dict:
    """Reference pass (adapters disabled, no grad) + policy pass + backward per micro-batch, one optimizer step."""
    model = student.model
    model.train()
    n = ids.shape[0]
    for start in range(0, n, micro_batch):
        mb = ids[start:start + micro_batch]
        with torch.no_grad(), model.disable_adapter():
            ref = completion_logprobs(model, mb, prompt_len, head)
        logp = completion_logprobs(model, mb, prompt_len, head)
        mask = torch.ones_like(logp)
        terms = grpo_loss(logp, mask, adv[start:start + micro_batch], ref_logp=ref, num_sequences=n)
        terms.loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    student.optimizer.step()
    student.optimizer.zero_grad(set_to_none=True)
    return {}


def fast_logprobs(student: Student, ids: torch.Tensor, prompt_len: int, head: str) -> torch.Tensor:
    with torch.no_grad():
        return completion_logprobs(student.model, ids, prompt_len, head)


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


def bench_config(name: str, quant: str, args, scratch: Path, tok_dir: Path | None) -> list[dict]:
    rows = []
    path = random_model_dir(name, scratch, tok_dir)
    params = count_params(name)
    checkpointing = quant == "nf4" or args.checkpointing
    student = load_student(path, quant, checkpointing)
    common = dict(model=name, quant=quant, params=params, checkpointing=checkpointing,
                  device=torch.cuda.get_device_name())
    for shape in args.grid:
        batch, length = map(int, shape.split("x"))
        ids, plen, adv = random_batch(batch, length, student.vocab, seed=batch * 7919 + length)
        tokens = batch * length
        for head in args.heads:
            try:
                sec, peak = timed(lambda: fast_grpo_step(student, ids, plen, adv, head, args.micro_batch or batch),
                                  args.warmup, args.repeat)
                rows.append(row(op="grpo", path=f"fast-{head}", batch=batch, length=length, seconds=sec,
                                tok_s=tokens / sec, peak_gib=peak, mfu=6 * params * tokens / sec / H100_BF16_FLOPS,
                                **common))
            except torch.OutOfMemoryError as exc:
                rows.append(row(op="grpo", path=f"fast-{head}", batch=batch, length=length, error=str(exc)[:200],
                                **common))
            student.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            sec, peak = timed(lambda: fast_logprobs(student, ids, plen, head), args.warmup, args.repeat)
            rows.append(row(op="logprobs", path=f"fast-{head}", batch=batch, length=length, seconds=sec,
                            tok_s=tokens / sec, peak_gib=peak, **common))
    if args.gen_tokens:
        batch = args.gen_batch
        ids, plen, _ = random_batch(batch, 128, student.vocab, seed=1)
        model = student.model
        model.eval()

        def generate():
            with torch.no_grad():
                model.generate(input_ids=ids[:, :plen], attention_mask=torch.ones_like(ids[:, :plen]),
                               max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, do_sample=True,
                               pad_token_id=0, use_cache=True)
        sec, peak = timed(generate, 1, 2)
        rows.append(row(op="generate", path="hf-generate", batch=batch, length=args.gen_tokens, seconds=sec,
                        tok_s=batch * args.gen_tokens / sec, peak_gib=peak, **common))
    for shape in args.naive_grid:
        batch, length = map(int, shape.split("x"))
        ids, plen, adv = random_batch(batch, length, student.vocab, seed=batch * 7919 + length)
        seqs = [Sequence(ids[i], plen, float(adv[i])) for i in range(batch)]
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            reference = deep_copied_reference(student.model)
        except Exception as exc:  # noqa: BLE001 - report why the original's deep copy fails here
            rows.append(row(op="grpo", path="naive", batch=batch, length=length,
                            error=f"deepcopy: {type(exc).__name__}: {exc}"[:300], **common))
            continue
        tokens = batch * length
        sec, peak = timed(lambda: naive_grpo_step(student.model, reference, student.optimizer, seqs),
                          1, max(1, args.repeat - 1))
        rows.append(row(op="grpo", path="naive", batch=batch, length=length, seconds=sec, tok_s=tokens / sec,
                        peak_gib=peak, mfu=6 * params * tokens / sec / H100_BF16_FLOPS, **common))
        del reference
        gc.collect()
        torch.cuda.empty_cache()
        sec, peak = timed(lambda: naive_logprobs(student.model, seqs), 1, max(1, args.repeat - 1))
        rows.append(row(op="logprobs", path="naive", batch=batch, length=length, seconds=sec, tok_s=tokens / sec,
                        peak_gib=peak, **common))
    del student
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen2.5-0.5b,llama-3.2-3b")
    parser.add_argument("--quant", default="bf16,nf4")
    parser.add_argument("--grid", default="8x512,16x512,8x1024")
    parser.add_argument("--naive-grid", default="8x512")
    parser.add_argument("--heads", default="fused,logits", help="fast-path output heads to time")
    parser.add_argument("--micro-batch", type=int, default=0, help="0 = whole batch in one micro-batch")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing for bf16 too")
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scratch", default="/tmp/bench_models")
    parser.add_argument("--tokenizer", default=str(REPO / ".bench_assets" / "tokenizer"))
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    args.grid = [s for s in args.grid.split(",") if s]
    args.naive_grid = [s for s in args.naive_grid.split(",") if s]
    args.heads = [s for s in args.heads.split(",") if s]
    tok_dir = Path(args.tokenizer) if Path(args.tokenizer).is_dir() else None
    scratch = Path(args.scratch)
    rows = []
    for name in args.models.split(","):
        for quant in args.quant.split(","):
            log("config", name, quant)
            rows += bench_config(name, quant, args, scratch, tok_dir)
            if args.out:
                Path(args.out).write_text(json.dumps({"rows": rows, "command": " ".join(sys.argv)}, indent=1))
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print(f"{'model':14} {'q':5} {'op':9} {'path':12} {'BxL':9} {'tok/s':>10} {'GiB':>6} {'mfu':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:14} {r['quant']:5} {r['op']:9} {r['path']:12} {r['batch']}x{r['length']:<6} ERROR")
            continue
        mfu = f"{r['mfu']:.3f}" if "mfu" in r else ""
        print(f"{r['model']:14} {r['quant']:5} {r['op']:9} {r['path']:12} {r['batch']}x{r['length']:<6} "
              f"{r['tok_s']:10.0f} {r['peak_gib']:6.2f} {mfu:>6}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
