"""The trainer's decode paths side by side on one GPU, in-process (issue #20, phase 1), in one command:

    python bench/gpu_serving.py --out $OUT/gpu_serving.json        # lent H200: 5-7 minutes, nothing carried

Candidates, each at 1, 32, 128 and 256 rows, greedy and sampled (T=1.0, top_p=1.0 as the learning runs sample,
seeded, log-probs of the sampled token), 128 new tokens per row:
- loop:        Student's transformers DynamicCache loop (TRAINER_DECODE_ENGINE=loop), the path before the engine;
- slots:       services/trainer/decode (fixed KV slots, CUDA graphs), what TRAINER_DECODE_ENGINE=slots runs;
- slots_eager: the same engine with graphs off (256 rows), to show what the graphs buy;
- slots_sync:  the same engine with its steps in order, not overlapped (256 rows), to show what the overlap buys;
- slots_compiled: the same engine with its decode step torch.compiled inside the graphs (TRAINER_DECODE_COMPILE=true;
                its first call's compile time is reported as first_call_s);
- hf_static:   transformers generate with its static cache, compiled (torch.compile mode="reduce-overhead");
- hf_cb:       transformers generate_batch (continuous batching, paged attention "paged|sdpa": no flash-attn here).
Then two workloads on loop and slots: "search" (32 prompts x n=8 sharing a long prefix, stop "\\n", 64 tokens:
a node's samples) and "mixed" (128 student rows + 128 base rows: one call on slots, two calls on loop).

Model: random weights of SmolLM2-135M's shape (bench/configs/smollm2-135m), saved once as bf16 and loaded through
load_student (bf16 on CUDA, LoRA r=32 on the 7 projections with random B so the merged student differs from base).
Random weights never stop early, so every row runs to its max_tokens. The tokenizer is made up here (49,152
byte-level entries: the lent machine has no tokenizer files and no internet); prompts are random ids, 96-224 long.

Figures per row: tok/s = generated tokens / wall time of the generate call; ms/pass = wall / forward passes (the
prefill counts as one); ms/step = (wall(128 tokens) - wall(1 token)) / 127, the decode step alone. Greedy tokens of
each candidate are compared with loop's: bf16 with random weights gives near-flat logits, so kernels that round
differently pick different argmaxes within a few tokens; `greedy_same` is the share of rows equal to loop's and
`greedy_prefix` the mean share of tokens before the first difference. The run stops a candidate when --budget-s
is spent and says so. Writes --out (JSON) and prints a table.

CPU check of this script (tiny shape, a few tokens): python bench/gpu_serving.py --smoke --out /tmp/gs.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
        seed: int = 0

    module = types.ModuleType("services.trainer.settings")
    module.TrainerSettings = TrainerSettings
    sys.modules["services.trainer.settings"] = module
    protocol = types.ModuleType("services.protocol")
    protocol.LossSettings = type("LossSettings", (), {"__doc__": "stand-in: this bench runs no GRPO step"})
    sys.modules["services.protocol"] = protocol


def write_model(target: Path, config_dir: Path, smoke: bool) -> None:
    """config.json (bf16 random weights, saved) and a made-up byte-level tokenizer of the config's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    config = AutoConfig.from_pretrained(config_dir)
    if smoke:
        config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16))
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
    def __init__(self, args):
        self.args = args
        self.rows_out: list[dict] = []
        self.deadline = time.monotonic() + args.budget_s
        self.greedy_ref: dict[tuple, list[list[int]]] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, **row) -> None:
        self.rows_out.append(row)
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
        print("ROW", json.dumps(shown), flush=True)
        # The rows so far, in case the run is cut short (the final report rewrites the file whole).
        Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.out).write_text(json.dumps({"partial": True, "rows": self.rows_out}, indent=1))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compare(reference: list[list[int]] | None, got: list[list[int]]) -> dict:
    if reference is None:
        return {}
    same = sum(a == b for a, b in zip(reference, got)) / len(got)
    prefix = []
    for a, b in zip(reference, got):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(a), 1))
    return {"greedy_same": same, "greedy_prefix": sum(prefix) / len(prefix)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_serving.json"))
    parser.add_argument("--rows", default="1,32,128,256")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--candidates",
                        default="loop,slots,slots_compiled,slots_eager,slots_sync,search,mixed,hf_static,hf_cb")
    parser.add_argument("--budget-s", type=float, default=330.0, help="stop starting new measurements after this")
    parser.add_argument("--hf-budget-s", type=float, default=75.0,
                        help="each transformers candidate starts no new size after this many seconds")
    parser.add_argument("--config", default=str(ROOT / "bench" / "configs" / "smollm2-135m"))
    parser.add_argument("--smoke", action="store_true", help="a tiny shape and few tokens (CPU check of the script)")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.tokens = "1,4", 6
    started = time.time()
    install_pydantic_stand_ins()
    from services.trainer.items import GenerationRequest
    from services.trainer.loading import load_student
    from services.trainer.settings import TrainerSettings

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows_list = [int(r) for r in args.rows.split(",")]
    max_rows = max(rows_list)
    bench = Bench(args)
    work = Path(tempfile.mkdtemp(prefix="gpu-serving-"))
    t0 = time.perf_counter()
    write_model(work / "model", Path(args.config), args.smoke)
    settings = TrainerSettings(model_source=str(work / "model"), device=device, load_in_4bit=False,
                               max_batch_size=max_rows, compile_layers=False, gradient_checkpointing=False,
                               model_cache_dir=work / "cache")
    student = load_student(settings)
    with torch.no_grad():  # a non-zero adapter: the merged student and base are different models
        for name, param in student.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    student.merged_decoder.invalidate()
    engine = student.slot_decoder  # the slot engine as the service runs it (services/trainer/slot_generation.py)
    setup_s = time.perf_counter() - t0
    print(f"setup {setup_s:.1f}s device={device} dtype={student.merged_decoder.student.dtype} "
          f"torch={torch.__version__}", flush=True)
    vocab = student.lm_head.weight.shape[0]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(96, 224) if not args.smoke else 12)]
               for _ in range(max_rows)]
    wanted = set(args.candidates.split(","))

    def requests(rows, mode, tokens):
        sampled = mode == "sampled"
        return [GenerationRequest(prompts[i], max_tokens=tokens, temperature=1.0 if sampled else 0.0,
                                  top_p=1.0, seed=i if sampled else None,
                                  logprobs=0 if sampled else None) for i in range(rows)]

    engines = {"loop": None, "slots": engine, "slots_eager": engine, "slots_sync": engine}

    def student_run(name, rows, mode, tokens, use_engine, *, use_adapter=True, job=None, gpu_times=None):
        chosen = engines.get(name, engine) if use_engine else None
        student.slot_decoder = chosen
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
        student.slot_decoder = engine
        if chosen is not None:
            for lane in chosen.engine.lanes.values():
                lane.graphs.timings = None
        generated = sum(s.num_generated for r in out for s in r)
        return out, wall, generated, student.forward_passes - passes

    def time_student(name, use_engine, rows, mode):
        t = time.perf_counter()
        student_run(name, rows, mode, args.tokens, use_engine)  # warm-up: graphs, compilation, cuBLAS plans
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

    def guarded(label, fn):
        if bench.left() <= 0:
            bench.record(candidate=label, skipped="budget spent")
            return
        try:
            fn()
        except Exception as exc:
            traceback.print_exc()
            bench.record(candidate=label, error=f"{type(exc).__name__}: {exc}"[:500])

    if "slots_compiled" in wanted and engine is not None:
        from services.trainer.decode import DecodeConfig
        from services.trainer.slot_generation import SlotGeneration

        engines["slots_compiled"] = SlotGeneration(
            student, DecodeConfig.for_device(student.device, slots=max_rows, compile=True)
        )
    for name, use_engine in (("loop", False), ("slots", True), ("slots_compiled", True)):
        if name in wanted and name in engines:
            for rows in rows_list:
                for mode in ("greedy", "sampled"):
                    guarded(name, lambda: time_student(name, use_engine, rows, mode))
    if "slots_eager" in wanted and engine is not None:
        def eager():
            for lane in engine.engine.lanes.values():
                lane.graphs.enabled = False
            try:
                time_student("slots_eager", True, max_rows, "greedy")
            finally:
                for lane in engine.engine.lanes.values():
                    lane.graphs.enabled = device == "cuda"
        guarded("slots_eager", eager)
    if "slots_sync" in wanted and engine is not None:
        def in_order():
            engine.engine.config.overlap = False
            try:
                for mode in ("greedy", "sampled"):
                    time_student("slots_sync", True, max_rows, mode)
            finally:
                engine.engine.config.overlap = device == "cuda"
        guarded("slots_sync", in_order)
    for name in ("slots", "slots_compiled"):
        if engines.get(name) is not None:
            lanes = engines[name].engine.lanes.values()
            bench.record(candidate=name, graphs_captured=sum(lane.graphs.captures for lane in lanes),
                         graphs_enabled=[lane.graphs.enabled for lane in lanes],
                         graphs_failure=[lane.graphs.failure for lane in lanes if lane.graphs.failure])

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
        guarded("search", search)

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
        guarded("mixed", mixed)

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
        guarded("hf_static", hf_static)

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
        guarded("hf_cb", hf_cb)

    report(bench, args, device, setup_s, started)
    return 0


def trim(tokens: list[int], eos_ids: list[int]) -> list[int]:
    ends = [i for i, t in enumerate(tokens) if t in eos_ids]
    return tokens[: ends[0]] if ends else tokens


def report(bench: Bench, args, device: str, setup_s: float, started: float) -> None:
    import peft
    import transformers

    rows = bench.rows_out
    timed = [r for r in rows if "tok_s" in r]
    best_256 = [r for r in timed if r.get("candidate") == "slots" and r.get("rows") == 256
                and r.get("mode") == "greedy"]
    loop_256 = [r for r in timed if r.get("candidate") == "loop" and r.get("rows") == 256
                and r.get("mode") == "greedy"]
    result = {
        "inprocess_tok_s_256": best_256[0]["tok_s"] if best_256 else None,
        "ms_per_pass_256": best_256[0]["ms_per_pass"] if best_256 else None,
        "ms_per_step_256": best_256[0]["ms_per_step"] if best_256 else None,
        "loop_tok_s_256": loop_256[0]["tok_s"] if loop_256 else None,
        "rows": rows,
        "machine": (torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu")
                   + f", {os.cpu_count()} CPU cores",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "command": "python " + " ".join(sys.argv),
        "setup_s": setup_s,
        "total_s": time.time() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{'candidate':<14} {'mode':<8} {'rows':>5} {'tok/s':>10} {'ms/pass':>8} {'ms/step':>8} "
          f"{'gpu decode/sample ms':>21} {'greedy same/prefix':>19} {'first call s':>12}")
    for r in rows:
        if "tok_s" not in r:
            note = r.get("error") or r.get("skipped") or ""
            if "graphs_captured" in r:
                note = (f"graphs captured {r['graphs_captured']}, enabled per lane {r['graphs_enabled']} "
                        f"{r['graphs_failure'] or ''}")
            print(f"{r.get('candidate', ''):<14} {r.get('mode', ''):<8} {r.get('rows', ''):>5} {note}"[:400])
            continue
        same = f"{r['greedy_same']:.2f}/{r['greedy_prefix']:.2f}" if "greedy_same" in r else ""
        gpu = f"{r['gpu_decode_ms']:.2f}/{r.get('gpu_sample_ms', float('nan')):.2f}" if "gpu_decode_ms" in r else ""
        print(f"{r['candidate']:<14} {r['mode']:<8} {r['rows']:>5} {r['tok_s']:>10.0f} "
              f"{r.get('ms_per_pass', float('nan')):>8.2f} {r.get('ms_per_step', float('nan')):>8.2f} {gpu:>21} "
              f"{same:>19} "
              f"{r.get('first_call_s', float('nan')):>12.1f}")
    print(f"\nwrote {args.out}; total {result['total_s']:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
