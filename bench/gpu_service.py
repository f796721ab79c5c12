"""The trainer service's whole round on a loaded model, as the orchestrator drives it, with each stage's result.

load -> /v1/completions (sampled, and greedy with log-probs) -> /logprobs (student and base) -> /grpo/step with
beta > 0 and the trainer's own sampling log-probs as old_logprobs -> /logprobs again -> POST /checkpoints ->
another step -> POST /checkpoints/load -> /logprobs. bench/gpu_bench.py --service-check runs it on the GPU for one
backend before timing the same loaded student; every stage runs in its own try, so one failure is reported with
its traceback and the later stages still run where they can.

Checks (each a number and a verdict, so a failure says by how much):
- at adapter version 0 the student scores as the base (LoRA B starts at zero);
- generation agrees with scoring: the greedy completion's sampled-token log-probs against /logprobs of the same
  text, and the step's clip fraction when the old log-probs are the sampler's own (ratio ~ 1 when they agree);
- a step moves the student and leaves the base where it was; the KL to the base is positive once it moved;
- a loaded checkpoint scores exactly as the student did when it was saved.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable
from typing import Any

# Tolerances (bf16 compute over 4-bit weights; the CUDA test of the tiny model holds the same bounds).
SAME_AS_BASE = 0.05  # max |student - base| log-prob at adapter version 0
# mean |generation - scoring| log-prob of the greedy completion: at most this, and at most AGREEMENT_SHARE of what
# dropping the prompt changes (what a decode step that lost its KV cache would see)
AGREEMENT, AGREEMENT_SHARE = 0.5, 0.2
CLIP_FRACTION = 0.05  # of a step whose old log-probs are the sampler's own
UNCHANGED = 1e-3  # base after a step; a loaded checkpoint against the saved student


class ServiceRound:
    """Runs the stages against a client (fastapi.testclient.TestClient or httpx.Client) and keeps the report."""

    def __init__(self, client: Any, prompt: str):
        self.client = client
        self.prompt = prompt
        self.report: dict[str, Any] = {"stages": {}, "checks": {}}

    # ----- plumbing -----
    def stage(self, name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        start = time.time()
        try:
            result = run()
        except Exception as exc:  # every failure is a result; the next stage still runs
            self.report["stages"][name] = {"ok": False, "seconds": round(time.time() - start, 2),
                                           "error": f"{type(exc).__name__}: {exc}"[:2000],
                                           "traceback": traceback.format_exc()[-6000:]}
            return None
        self.report["stages"][name] = {"ok": True, "seconds": round(time.time() - start, 3), **result}
        return result

    def check(self, name: str, value: float, ok: bool) -> None:
        self.report["checks"][name] = {"value": value, "ok": bool(ok)}

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = self.client.post(path, json=body)
        if answer.status_code != 200:
            raise RuntimeError(f"POST {path}: {answer.status_code} {answer.text[:1000]}")
        return answer.json()

    def scores(self, model: str, completions: list[str]) -> list[list[float]]:
        body = {"model": model, "items": [{"prompt": self.prompt, "completion": c} for c in completions]}
        return [r["token_logprobs"] for r in self.post("/logprobs", body)["results"]]

    # ----- the round -----
    def run(self, ready_timeout: float = 600.0) -> dict[str, Any]:
        health = self.stage("load", lambda: self.wait_ready(ready_timeout))
        if health is None:
            return self.finish()
        sampled = self.stage("generate", self.generate)
        self.stage("greedy", self.greedy)
        completions = [c["text"] for c in sampled["choices"]] if sampled else []
        completions = [c for c in completions if c.strip()] or [" 1 2 3 4"]
        before = self.stage("logprobs", lambda: self.logprobs_pair(completions))
        if before:  # no step yet: LoRA B is zero, so the student is the base
            same = max_diff(before["student"], before["base"])
            self.check("student scores as the base before any step (max |d logp|)", same, same < SAME_AS_BASE)
        if before and sampled:
            self.stage("grpo_step", lambda: self.step(completions, sampled["choices"], before["student"]))
        after = self.stage("logprobs_after", lambda: self.logprobs_pair(completions))
        if before and after:
            moved = max_diff(before["student"], after["student"])
            self.check("step moved the student (max |d logp|)", moved, moved > 1e-4)
            base_drift = max_diff(before["base"], after["base"])
            self.check("base unchanged by the step (max |d logp|)", base_drift, base_drift < UNCHANGED)
        self.stage("grpo_step_2", lambda: self.step(completions, None, None, name="second"))
        saved = self.stage("checkpoint_save", lambda: self.save(completions))
        self.stage("grpo_step_3", lambda: self.step(completions, None, None, name="third"))
        if saved:
            self.stage("checkpoint_load", lambda: self.load(completions, saved))
        return self.finish()

    def finish(self) -> dict[str, Any]:
        self.report["passed"] = all(s["ok"] for s in self.report["stages"].values()) and all(
            c["ok"] for c in self.report["checks"].values())
        return self.report

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        start = time.time()
        while time.time() - start < timeout:
            answer = self.client.get("/health")
            body = answer.json()
            if answer.status_code == 200:
                return {"health": body, "load_seconds": round(time.time() - start, 1)}
            if body.get("status") == "error":
                raise RuntimeError(f"the trainer failed to load: {body}")
            time.sleep(1.0)
        raise TimeoutError(f"the trainer did not load within {timeout:.0f} s")

    def generate(self) -> dict[str, Any]:
        start = time.time()
        body = self.post("/v1/completions", {"model": "student", "prompt": self.prompt, "max_tokens": 32, "n": 8,
                                             "temperature": 1.0, "seed": 1, "logprobs": 0})
        seconds = time.time() - start
        choices = [{"text": c["text"], "finish_reason": c["finish_reason"], "tokens": c["logprobs"]["tokens"],
                    "token_logprobs": c["logprobs"]["token_logprobs"]} for c in body["choices"]]
        tokens = body["usage"]["completion_tokens"]
        finite = all(v <= 0.0 for c in choices for v in c["token_logprobs"])
        self.check("sampled log-probs are log-probabilities", float(finite), finite)
        return {"choices": choices, "completion_tokens": tokens, "tok_s": tokens / seconds,
                "adapter_version": body.get("adapter_version")}

    def greedy(self) -> dict[str, Any]:
        out = {}
        for model in ("student", "base"):
            body = self.post("/v1/completions", {"model": model, "prompt": self.prompt, "max_tokens": 24,
                                                 "temperature": 0.0, "logprobs": 0})
            choice = body["choices"][0]
            generated = choice["logprobs"]["token_logprobs"]
            scored = self.scores(model, [choice["text"]])[0]
            without_prompt = ServiceRound(self.client, self.prompt.split()[-1]).scores(model, [choice["text"]])[0]
            n = min(len(generated), len(scored))
            diffs = [abs(a - b) for a, b in zip(generated[:n], scored[:n], strict=True)]
            mean = sum(diffs) / max(n, 1)
            context = sum(abs(a - b) for a, b in zip(scored, without_prompt, strict=True)) / max(len(scored), 1)
            self.check(f"{model}: greedy generation agrees with /logprobs (mean |d logp| over {n} tokens; "
                       f"the prompt changes them by {context:.3f})", mean,
                       n > 0 and len(generated) == len(scored) and mean < AGREEMENT
                       and mean < AGREEMENT_SHARE * context)
            out[model] = {"text": choice["text"][:300], "generated": generated, "scored": scored,
                          "mean_abs_diff": mean, "max_abs_diff": max(diffs, default=0.0), "prompt_effect": context}
        return out

    def logprobs_pair(self, completions: list[str]) -> dict[str, Any]:
        start = time.time()
        student, base = self.scores("student", completions), self.scores("base", completions)
        return {"student": student, "base": base, "tokens": sum(len(r) for r in student),
                "seconds_both": time.time() - start}

    def step(self, completions, choices, scored, name: str = "first") -> dict[str, Any]:
        items = []
        for i, text in enumerate(completions):
            item = {"prompt": self.prompt, "completion": text, "advantage": 1.0 if i % 2 == 0 else -1.0}
            if choices is not None and scored is not None and i < len(choices):
                old = choices[i]["token_logprobs"]
                if len(old) == len(scored[i]):  # the sampler's log-probs, one per scored token
                    item["old_logprobs"] = old
            items.append(item)
        body = self.post("/grpo/step", {"items": items, "loss": {"type": "grpo", "beta": 0.04,
                                                                 "learning_rate": 1e-3}})
        if name == "first":
            with_old = sum("old_logprobs" in it for it in items)
            self.check(f"clip fraction with the sampler's own log-probs ({with_old}/{len(items)} items)",
                       body["clip_fraction"], with_old > 0 and body["clip_fraction"] < CLIP_FRACTION)
        if name == "second":
            self.check("KL to the base is positive once the student moved", body["kl"], body["kl"] > 0.0)
        ok = body["grad_norm"] > 0.0 and math.isfinite(body["loss"])
        self.check(f"{name} step: finite loss and a gradient", body["grad_norm"], ok)
        return {"response": body}

    def save(self, completions: list[str]) -> dict[str, Any]:
        info = self.post("/checkpoints", {"name": "service-round"})
        return {"info": info, "student": self.scores("student", completions)}

    def load(self, completions: list[str], saved: dict[str, Any]) -> dict[str, Any]:
        moved = max_diff(saved["student"], self.scores("student", completions))
        info = self.post("/checkpoints/load", {"name": "service-round"})
        restored = max_diff(saved["student"], self.scores("student", completions))
        self.check("the step after the save moved the student", moved, moved > 1e-4)
        self.check("the loaded checkpoint scores as saved (max |d logp|)", restored, restored < UNCHANGED)
        listed = self.client.get("/checkpoints").json()
        return {"info": info, "checkpoints": [c["name"] for c in listed["checkpoints"]]}


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max((abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)),
               default=0.0)
