"""The project as a Prime Intellect verifiers environment, id `alphazero-llm-trainer` (verifiers >=0.4,<0.5).

verifiers 0.4 (`verifiers.v1`) replaced `load_environment(**kwargs) -> Environment` with plugins found by
module name: `vf-eval alphazero-llm-trainer` imports the module `alphazero_llm_trainer` ('-' -> '_') and takes
the `Taskset`, `Harness` and `Env` subclasses it exports in `__all__`. That module is a one-line re-export of
this one. What each piece is:

- `ProblemTaskset` (the data): GSM8K problems from `orchestrator.gsm8k.data` with the project's chat prompt;
  each task carries `prompt`, `answer` (the gold number) and `info` (split, index, gold solution).
- `ProblemTask` (the scoring): rewards `correct` (HRE), `perplexity` (PRE, with `use_student_model` or a
  `trainer_url`; it asks the trainer's /logprobs) and `format`, computed by `orchestrator.search.rewards` and the
  terminal checker's rules. Default weights are the search's (`RewardWeights`: 1.0 HRE, 0 PRE since issue #19's
  recipe, correctness first; format 0);
  change them with verifiers' own `rewards.<name>.weight` overrides (`load_environment(hre_weight=...)` sets
  the same).
- `AnswerHarness` (the program): one non-streaming chat completion through verifiers' interception endpoint,
  in process. verifiers' built-in chat loops (`null`, `bash`) run `uv` scripts and ask with `stream: true`,
  which the trainer service refuses; this one needs neither `uv` nor a container.
- `ProblemEnv` (the episode): one agent, local subprocess runtime by default (verifiers' default is a remote
  Prime sandbox).
"""

from __future__ import annotations

from typing import Any, Literal, cast

import httpx
import verifiers.v1 as vf
from pydantic import Field

from orchestrator.clients.trainer import TrainerClient
from orchestrator.gsm8k.answers import extract_answer
from orchestrator.gsm8k.data import Problem, load_gsm8k, question_messages
from orchestrator.search.rewards import hre, step_pre
from orchestrator.search.terminal import rule_verdict
from orchestrator.settings import EndpointSpec, RewardWeights, Settings, TeacherTier

ENV_ID = "alphazero-llm-trainer"


# --- data ------------------------------------------------------------------------------------------------
class ProblemData(vf.TaskData):
    """One GSM8K problem in verifiers' record schema: prompt (chat messages), answer, info."""

    answer: str  # the gold final number, canonical ("1000")
    info: dict[str, Any] = Field(default_factory=dict)  # split, index, solution


# --- scoring ---------------------------------------------------------------------------------------------
DEFAULT_WEIGHTS = RewardWeights()  # the search's own defaults (1.0 HRE, 0 PRE; the original's were 0.4 / 0.6)


class ScoringConfig(vf.TaskConfig):
    """Per-task scoring knobs (`--env.taskset.task.*`). Reward weights use verifiers' own overrides:
    `--env.taskset.task.rewards.perplexity.weight 0.6` (`load_environment(pre_weight=...)` sets the same)."""

    use_student_model: bool = False  # PRE from the student's log-probs; also on when trainer_url is set
    trainer_url: str | None = None  # None: the orchestrator settings' TRAINER_URL (default 127.0.0.1:8001)
    pre_model: Literal["student", "base"] = "student"

    @property
    def pre_enabled(self) -> bool:
        return self.use_student_model or self.trainer_url is not None


class ProblemTask(vf.Task[ProblemData, vf.State, ScoringConfig]):
    @property
    def key(self) -> str:
        return self.data.id or self.hash  # "test-17": stable across runs, unlike the positional idx

    def prompt_messages(self) -> list[dict]:
        """The chat prompt the model saw, as wire dicts (`orchestrator.gsm8k.data.question_messages`)."""
        prompt = self.data.prompt
        assert isinstance(prompt, list), "problem_data() writes chat messages"
        return [{"role": m.role, "content": m.content} for m in prompt]

    @property
    def scoring(self) -> ScoringConfig:
        """This task's config (verifiers types `self.config` as its base TaskConfig)."""
        return cast(ScoringConfig, self.config)

    @vf.stop
    async def single_turn(self, trace: vf.Trace) -> bool:
        return trace.num_turns >= 1  # a solution is one reply; a second request would be refused

    @vf.reward(weight=DEFAULT_WEIGHTS.hre)
    async def correct(self, trace: vf.Trace) -> float:
        """HRE: 1.0 when the reply's final answer (strict `####`, else the last number) is the gold one."""
        return hre(trace.last_reply, self.data.answer)

    @vf.reward(weight=DEFAULT_WEIGHTS.pre)
    async def perplexity(self, trace: vf.Trace) -> float:
        """PRE of the whole reply as one step: the student's mean token log-prob of the reply minus its mean
        token log-prob of the gold solution under the same prompt (`rewards.step_pre`), both from the
        trainer's /logprobs (completion tokens only). > 0: the student finds the reply more natural than the
        reference solution."""
        reply = trace.last_reply
        if not reply:
            return step_pre(None, 0.0)
        items = [
            {"messages": self.prompt_messages(), "completion": text}
            for text in (reply, self.data.info["solution"])
        ]
        async with TrainerClient(self.scoring.trainer_url or Settings().trainer_url) as trainer:
            scored = await trainer.logprobs(items, model=self.scoring.pre_model)
        reply_mean, gold_mean = (r.mean for r in scored.results)
        return step_pre(reply_mean, gold_mean)

    @vf.reward(weight=0.0)
    async def format(self, trace: vf.Trace) -> float:
        """1.0 when the terminal checker's rules find the `#### <number>` line the prompt asks for."""
        return float(rule_verdict(trace.last_reply).reason == "answer_line")

    @vf.metric
    async def answer_found(self, trace: vf.Trace) -> float:
        """1.0 when the reply has a number to grade (strict or flexible extraction)."""
        return float(extract_answer(trace.last_reply) is not None)

    def hooks(self, attr: str):
        fns = super().hooks(attr)
        if attr == "reward" and not self.scoring.pre_enabled:
            fns = [fn for fn in fns if fn.__name__ != "perplexity"]  # PRE off: not recorded at all
        return fns


class ProblemTasksetConfig(vf.TasksetConfig):
    """Which problems load (`--env.taskset.*`), plus the original's teacher settings."""

    split: Literal["train", "test"] = "test"
    path: str | None = None  # folder with {split}.jsonl; None: GSM8K_PATH, the hub, the shipped copy
    limit: int | None = Field(default=None, ge=0)
    offset: int = Field(default=0, ge=0)
    tier: TeacherTier = "free"  # the search's teacher tier (TEACHER_TIER), as in the original
    teachers: list[EndpointSpec] | None = None  # the endpoints of tier "custom" (TEACHERS)
    task: ScoringConfig = ScoringConfig()

    def search_settings(self) -> Settings:
        """The orchestrator settings a search for these tasks runs with: this tier's teachers, this trainer.
        Single-turn scoring needs no teachers; a trainer or search driven from verifiers reads them here."""
        trainer: dict[str, Any] = {"trainer_url": self.task.trainer_url} if self.task.trainer_url else {}
        return Settings(teacher_tier=self.tier, teachers=self.teachers, **trainer)


# verifiers bounds a Taskset's task type by Task[..., TaskConfig] with an invariant config parameter, so a task
# with its own config (ScoringConfig) is refused by the type checker although verifiers runs it as documented.
class ProblemTaskset(vf.Taskset[ProblemTask, ProblemTasksetConfig]):  # pyright: ignore[reportInvalidTypeArguments]
    def load(self) -> list[ProblemTask]:
        cfg = self.config
        problems = load_gsm8k(cfg.split, path=cfg.path, limit=cfg.limit, offset=cfg.offset)
        return [ProblemTask(problem_data(p), cfg.task) for p in problems]


def problem_data(problem: Problem) -> ProblemData:
    return ProblemData(  # pyright: ignore[reportCallIssue]  (artifact_max_bytes has a default in verifiers)
        id=problem.id, prompt=question_messages(problem), answer=problem.answer, info=dict(problem.info)
    )


# --- the program: one chat completion ----------------------------------------------------------------------
class AnswerHarnessConfig(vf.HarnessConfig):
    id: str = ENV_ID
    max_tokens: int = Field(default=512, ge=1)  # used unless the run sets --sampling.max-tokens
    timeout_s: float = Field(default=600.0, gt=0)


class AnswerHarness(vf.Harness[AnswerHarnessConfig]):
    """One chat completion, in process. Verifiers records the exchange through its interception endpoint."""

    APPENDS_SYSTEM_PROMPT = True
    EXECUTES_CODE = False
    NEEDS_CONTAINER = False

    async def launch(self, ctx, trace, runtime, endpoint, secret, mcp_urls, data, tool_interception_url=None):
        from verifiers.v1.dialects.chat import message_to_wire

        system, prompt = self.resolve_prompt(data)
        messages = [{"role": "system", "content": system}] if system else []
        if isinstance(prompt, str):
            messages.append({"role": "user", "content": prompt})
        else:
            messages += [message_to_wire(m) for m in prompt or []]
        body = {"model": ctx.model, "messages": messages, "max_tokens": self.config.max_tokens}
        async with httpx.AsyncClient(timeout=self.config.timeout_s) as client:
            response = await client.post(
                endpoint.rstrip("/") + "/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {secret}"},
            )
        if response.status_code != 200:
            return vf.ProgramResult(
                exit_code=1, stdout="", stderr=f"HTTP {response.status_code}: {response.text[-1000:]}"
            )
        return vf.ProgramResult(exit_code=0, stdout="", stderr="")


# --- the episode -------------------------------------------------------------------------------------------
class ProblemEnvConfig(vf.EnvConfig):
    agent: vf.AgentConfig = vf.AgentConfig(runtime=vf.SubprocessConfig())


class ProblemEnv(vf.Env[ProblemEnvConfig]):
    async def run(self, task, agents) -> None:
        await agents.agent.run(task)


# --- convenience: the pre-0.4 entry point ----------------------------------------------------------------
def load_environment(
    tier: TeacherTier = "free",
    use_student_model: bool = False,
    trainer_url: str | None = None,
    hre_weight: float | None = None,
    pre_weight: float | None = None,
    format_weight: float | None = None,
    **taskset: Any,
) -> vf.Env:
    """The environment through verifiers' own loader, configured the pre-0.4 way (keyword arguments).

    `taskset` takes the other taskset fields (split, path, limit, offset). Weights left None keep the defaults
    (the search's: correct 1.0, perplexity 0.0, format 0.0; the original's were 0.4 and 0.6).
    """
    weights = {"correct": hre_weight, "perplexity": pre_weight, "format": format_weight}
    task = {
        "use_student_model": use_student_model,
        "trainer_url": trainer_url,
        "rewards": {name: {"weight": w} for name, w in weights.items() if w is not None},
    }
    config = vf.resolve_env_config({"taskset": {"id": ENV_ID, "tier": tier, "task": task, **taskset}})
    return vf.load_environment(config)


__all__ = ["AnswerHarness", "ProblemEnv", "ProblemTaskset", "load_environment"]
