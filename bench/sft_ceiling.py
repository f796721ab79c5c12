"""How much can this student learn from gold solutions? The ceiling the learning arms are measured against.

    python bench/sft_ceiling.py --learning-rates 5e-4,2e-3 --steps 32,96 --batch 32

In-process, with the trainer's own Student (the same LoRA, loss code and optimizer as POST /grpo/step): the base
is judged greedily on held-out GSM8K test problems, then for every learning rate a fresh adapter is fine-tuned
on GSM8K train gold solutions (calculator notes removed, "#### N" line kept, an end-of-sequence token after it)
with loss.type "legacy" and advantage 1 (plain supervised fine-tuning), and judged again at each of --steps;
McNemar's exact p against the base. No search, no teacher: it says whether the model and the update can learn
at all, and from how many correct solutions. The model comes from TRAINER_* settings as in the service
(bench/gpu_learning.sh sets them on the GPU machine).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.gsm8k.answers import extract_flexible, extract_strict, same_number
from orchestrator.gsm8k.data import load_gsm8k, question_messages
from orchestrator.gsm8k.stats import compare_paired
from services.trainer.settings import TrainerSettings
from services.protocol import LossSettings as LossConfig
from services.trainer.items import GenerationRequest, GrpoItem
from services.trainer.loading import load_student
from services.trainer.loading import make_optimizer as _make_optimizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learning-rates", default="5e-4,2e-3")
    p.add_argument("--steps", default="32,96", help="judge the adapter after these step counts")
    p.add_argument("--batch", type=int, default=32, help="gold solutions per step")
    p.add_argument("--eval-examples", type=int, default=300)
    p.add_argument("--train-examples", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--gsm8k", default=None, help="folder with {train,test}.jsonl (default: GSM8K_PATH)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)

    settings = TrainerSettings()
    started = time.perf_counter()
    student = load_student(settings)
    tok = student.tokenizer
    print(f"load {time.perf_counter() - started:.1f}s on {student.device}", flush=True)

    def prompt_ids(problem) -> list[int]:
        text = tok.apply_chat_template(question_messages(problem), add_generation_prompt=True, tokenize=False)
        return list(tok(text, add_special_tokens=False).input_ids)

    test = load_gsm8k("test", args.gsm8k, limit=args.eval_examples)
    train = load_gsm8k("train", args.gsm8k, limit=args.train_examples)
    test_ids = [prompt_ids(q) for q in test]
    items = [
        GrpoItem(
            prompt_ids(q),
            list(tok(re.sub(r"<<[^>]*>>", "", q.info["solution"]).strip(), add_special_tokens=False).input_ids)
            + [student.eos_ids[0]],
            advantage=1.0,
        )
        for q in train
    ]

    def judge(use_adapter: bool) -> tuple[list[bool], list[bool]]:
        t = time.perf_counter()
        requests = [GenerationRequest(prompt_ids=x, max_tokens=args.max_tokens, temperature=0.0) for x in test_ids]
        texts = [samples[0].text for samples in student.generate(requests, use_adapter=use_adapter)]
        strict = [same_number(extract_strict(x), q.answer) for x, q in zip(texts, test)]
        flexible = [same_number(extract_flexible(x), q.answer) for x, q in zip(texts, test)]
        print(f"  judged in {time.perf_counter() - t:.1f}s: strict {sum(strict)}/{len(test)}, flexible "
              f"{sum(flexible)}/{len(test)}", flush=True)
        return strict, flexible

    base_strict, base_flexible = judge(False)
    fresh = {k: v.clone() for k, v in student.adapter_state().items()}
    rows = []
    for lr in [float(x) for x in args.learning_rates.split(",")]:
        student.load_adapter_state(fresh)
        student.optimizer = _make_optimizer(student.trainable, settings, student.device)
        done = 0
        for upto in [int(x) for x in args.steps.split(",")]:
            while done < upto:
                batch = [items[(done * args.batch + i) % len(items)] for i in range(args.batch)]
                loss = LossConfig(type="legacy", beta=0.0, micro_batch_size=args.batch, learning_rate=lr)
                student.grpo_step(batch, loss)
                done += 1
            strict, flexible = judge(True)
            s, f = compare_paired(base_strict, strict), compare_paired(base_flexible, flexible)
            row = {
                "learning_rate": lr,
                "steps": done,
                "examples": done * args.batch,
                "base_strict": s["first_acc"],
                "strict": s["second_acc"],
                "p_strict": s["p_value"],
                "base_flexible": f["first_acc"],
                "flexible": f["second_acc"],
                "p_flexible": f["p_value"],
            }
            rows.append(row)
            print("RESULT " + json.dumps(row), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"n": len(test), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
