"""What every search shape talks to and what it gives back, shared by the fork search (fork.py) and the line
search (mcts.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.clients.llm import LLMPool
from orchestrator.clients.student_adapters import StudentAdapters
from orchestrator.clients.trainer import TrainerClient
from orchestrator.search.scoring import ScoreBatcher
from orchestrator.search.teachers import TeacherEnsemble
from orchestrator.search.terminal import TerminalChecker
from orchestrator.search.tree import Tree
from orchestrator.settings import EndpointSpec


@dataclass
class SearchServices:
    """Everything a search talks to; shared by all searches of a job (teacher weights learn across trees)."""

    pool: LLMPool
    teachers: TeacherEnsemble
    checker: TerminalChecker
    student: (
        EndpointSpec  # the trainer's student endpoint, or the student server (STUDENT_URL) with `adapters`
    )
    trainer: TrainerClient | None = None
    adapters: StudentAdapters | None = None  # set: the student's samples come from the student server
    _scorer: ScoreBatcher | None = field(default=None, init=False, repr=False)

    @property
    def scorer(self) -> ScoreBatcher | None:
        """The /logprobs batcher of `trainer` (None without a trainer)."""
        if self.trainer is None:
            return None
        if self._scorer is None or self._scorer.trainer is not self.trainer:
            self._scorer = ScoreBatcher(self.trainer)
        return self._scorer

    @classmethod
    def from_settings(
        cls,
        settings,
        pool: LLMPool,
        trainer: TrainerClient | None = None,
        adapters: StudentAdapters | None = None,
    ) -> SearchServices:
        """A trainer client is made from TRAINER_URL unless one is passed; an empty TRAINER_URL means none
        (a vLLM-only set-up: uniform priors and no PRE in the line search). With `adapters` (STUDENT_URL set)
        the student's samples come from the student server, else from the trainer."""
        if trainer is None and settings.trainer_url:
            trainer = TrainerClient.from_settings(settings)
        student_server = settings.student_server() if adapters is not None else None
        return cls(
            pool=pool,
            teachers=TeacherEnsemble(settings.teacher_endpoints(), cooldown_s=settings.teacher_cooldown_s),
            checker=TerminalChecker(pool, settings.checker_endpoint()),
            student=student_server or settings.student_endpoint(),
            trainer=trainer,
            adapters=adapters,
        )


@dataclass
class SearchResult:
    tree: Tree
    # expansions, requests, tokens (student_tokens + teacher_tokens), teacher_errors, seconds, degraded, ...
    stats: dict
