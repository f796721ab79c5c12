"""The forked whole-answer search, the default shape: AlphaZero-style MCTS whose simulation is a whole answer.

One tree per problem; its nodes are the lines of the answers written so far, identical prefixes merged
(fork_tree.py). The student is asked only for whole answers or whole continuations, n at a time, with the
sampled tokens' log-probs, so a train step's requests are few, large and all of one kind for the trainer.

    round 0     the root's expansion: one student request, n = root_samples whole answers from the question
    round r     parallel_simulations simulations at once, until `iterations` have run:
                1. select: a line s of the tree by PUCT over the internal line-nodes (values, visits, and a
                   prior from the surprisal of the student's sampled log-probs; fork_tree.select_forks), with
                   virtual loss so the round's picks spread over different answers;
                2. expand + simulate: ONE student request of n_student whole continuations of root..s
                   (continue_final_message, `temperature`, log-probs on), and beside it, with teachers,
                   n_teacher_right "right" and n_teacher_wrong "wrong" rest-of-answer requests at s; every
                   pick's requests of the round go out together;
                3. evaluate: each continuation's lines join the tree below s; its last line is a leaf, judged
                   exactly: the rules (a `#### N` line, an answer phrase, the end of the sequence), the LLM
                   checker only where the rules are unsure and only with `use_checker` (a "no" means no
                   answer: HRE 0); reward = rewards.path_reward (correctness, plus the capped tie-breaks);
                4. backup: every new answer's reward along root..leaf (visits, values) and to the teachers that
                   wrote it (their dynamic weights); the virtual loss is removed.
    gold        with `teacher_gold`, a tree in which no answer written by the student alone is right after its
                last round gets the "right" teacher's whole answer from the question (GCPO), backed up like any
                answer: the clean worked solution of a problem the student did not solve. A right teacher
                continuation of a student prefix does not count as solved (in the H200 run of session 4
                the forks' teacher continuations were right so often that gold was asked in only ~8 of 64
                trees per step, so the whole answers the learning probe trained on were missing).

Every tree of a train step runs at once (runners/batch_search.py): their round-0 requests reach the trainer
together, and each tree's next round starts as soon as its own answers are in (the trainer admits requests
into a running decode batch), instead of waiting for the step's longest answer. Setting `cancel` stops the
search at once and returns the tree so far.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from orchestrator.clients.llm import Completion, LLMError
from orchestrator.clients.student_adapters import StudentServerError
from orchestrator.gsm8k.answers import extract_answer, same_number
from orchestrator.gsm8k.data import Problem, question_messages
from orchestrator.search.cancellation import until_done_or_cancelled
from orchestrator.search.counters import SearchCounters
from orchestrator.search.fork_tree import Writer, add_answer, select_forks
from orchestrator.search.lines import Line, split_answer
from orchestrator.search.rewards import RunningMean, accumulated_pre, path_reward, step_pre
from orchestrator.search.sampling import sample_student
from orchestrator.search.services import SearchResult, SearchServices
from orchestrator.search.teachers import AllTeachersFailed, teacher_solution
from orchestrator.search.terminal import rule_verdict
from orchestrator.search.tree import ROOT, STUDENT, Node, Tree, backprop, remove_virtual_loss
from orchestrator.settings import SearchConfig

MIN_ROOM = 16  # tokens of the answer budget a fork point must have left to be worth a request
STUDENT_WRITER = Writer(STUDENT, "student")


@dataclass
class _Answer:
    """One written answer (or continuation) waiting to join the tree."""

    start: Node  # the node its lines follow
    lines: list[Line]
    token_counts: list[int]
    writer: Writer
    finish_reason: str | None
    eos: bool
    adapter_version: int | None = None  # the student's version that wrote it (None: a teacher)


@dataclass
class _Stats(SearchCounters):
    rounds: int = 0
    forks: int = 0
    answers: int = 0
    empty_answers: int = 0
    gold_added: bool = False
    critical_path_s: float = 0.0


def share(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights` (whole numbers that add up to `total`; at least 1 each when
    there is enough)."""
    if not weights:
        return []
    mass = sum(weights) or len(weights)
    parts = [max(1 if total >= len(weights) else 0, math.floor(total * (w or 1) / mass)) for w in weights]
    parts[-1] += total - sum(parts)
    if parts[-1] < 0:  # the floors of 1 took more than there was: give it back from the front
        for i in range(len(parts) - 1):
            take = min(parts[i], -parts[-1])
            parts[i] -= take
            parts[-1] += take
    return parts


class _ForkSearch:
    def __init__(self, problem: Problem, config: SearchConfig, services: SearchServices):
        self.cfg, self.svc = config, services
        self.tree = Tree(problem.id, problem.prompt, problem.answer, question_messages(problem))
        self.reference = (problem.info or {}).get("solution") if config.teacher_reference else None
        self.baseline = RunningMean()  # of the student lines' mean log-probs: the PRE baseline (rewards.py)
        self.stats = _Stats()
        self.seed_counter = 0

    # --- driver -------------------------------------------------------------------------------------------
    async def run(self, cancel: asyncio.Event | None) -> SearchResult:
        started = time.perf_counter()
        grow = asyncio.create_task(self._grow())
        try:
            cancelled = await until_done_or_cancelled(grow, cancel)
        finally:
            if not grow.done():  # run_search itself cancelled
                grow.cancel()
                await asyncio.gather(grow, return_exceptions=True)
            for node in self.tree:  # picks of a cancelled round leave virtual loss behind
                node.virtual_loss = 0
        return SearchResult(tree=self.tree, stats=self._final_stats(time.perf_counter() - started, cancelled))

    async def _grow(self) -> None:
        cfg, tree = self.cfg, self.tree
        await self._round([self._student(tree.root, cfg.root_samples)])
        left = cfg.iterations
        while left > 0:
            paths = select_forks(
                tree,
                min(cfg.parallel_simulations, left),
                c_puct=cfg.c_puct,
                vl_value=cfg.virtual_loss,
                prior_temperature=cfg.prior_temperature,
                max_tokens=cfg.max_tokens,
                min_room=MIN_ROOM,
            )
            if not paths:
                break
            left -= len(paths)
            try:
                asks = []
                for path in paths:
                    s = path[-1]
                    asks += [
                        self._student(s, cfg.n_student),
                        self._teacher(s, "right", cfg.n_teacher_right),
                        self._teacher(s, "wrong", cfg.n_teacher_wrong),
                    ]
                await self._round(asks)
            finally:
                for path in paths:
                    remove_virtual_loss(path)
            self.stats.forks += len(paths)
        if cfg.teacher_gold and not self._student_solved():
            before = self.stats.answers
            await self._round([self._teacher(tree.root, "right", 1)])
            self.stats.gold_added = self.stats.answers > before

    async def _round(self, asks) -> None:
        """Send a round's requests together, then add every answer to the tree, judge and back it up."""
        requests_before = self.stats.requests
        replies = await asyncio.gather(*asks)
        self.stats.rounds += int(self.stats.requests > requests_before)
        self.stats.critical_path_s += max((latency for _, latency in replies), default=0.0)
        answers = [a for batch, _ in replies for a in batch]
        added = [self._add(a) for a in answers]
        new = [(leaf, a) for (leaf, is_new), a in zip(added, answers, strict=True) if is_new]
        await asyncio.gather(*(self._judge(leaf, a.eos) for leaf, a in new))
        for leaf, _ in added:
            self._backup(leaf)

    def _student_solved(self) -> bool:
        """Whether an answer written by the student alone (every line its own) is right."""
        tree = self.tree
        return any(n.terminal and n.correct and all(s.source == STUDENT for s in tree.steps(n)) for n in tree)

    # --- requests -------------------------------------------------------------------------------------------
    def _next_seed(self) -> int | None:
        if self.cfg.seed is None:
            return None
        self.seed_counter += 1
        return self.cfg.seed * 1_000_003 + self.seed_counter

    def _room(self, start: Node) -> int:
        return self.cfg.max_tokens - start.path_tokens

    async def _student(self, start: Node, n: int) -> tuple[list[_Answer], float]:
        """n whole continuations of root..start by the student (whole answers at the root), with log-probs."""
        if n <= 0 or self._room(start) <= 0:
            return [], 0.0
        self.stats.requests += 1
        try:
            completion = await sample_student(
                self.svc.pool,
                self.svc.student,
                self.tree.messages,
                self.tree.partial_text(start),
                n=n,
                max_tokens=self._room(start),
                temperature=self.cfg.temperature,
                seed=self._next_seed(),
                adapters=self.svc.adapters,
            )
        except (LLMError, StudentServerError) as exc:
            self.stats.error(f"student: {exc}")
            self.stats.degrade("student_errors")
            if isinstance(exc, StudentServerError) or exc.retryable:
                self.stats.student_unavailable += 1
            return [], 0.0
        if any(ch.token_logprobs is None for ch in completion.choices):
            self.stats.degrade("uniform_priors: the student's server gave no log-probs")
        self.stats.student_tokens += _generated(completion)
        answers = []
        for ch, tokens in zip(completion.choices, _per_choice(completion), strict=True):
            lines = split_answer(ch.text, ch.tokens, ch.token_logprobs, ch.token_ids)
            counts = (
                [len(line.logprobs) for line in lines]
                if ch.token_logprobs is not None
                else share(tokens, [len(line.text) for line in lines])
            )
            answers += self._answer(
                start, lines, counts, STUDENT_WRITER, ch.finish_reason, ch.eos, completion.adapter_version
            )
        return answers, completion.latency_s

    async def _teacher(self, start: Node, kind: str, n: int) -> tuple[list[_Answer], float]:
        """n rest-of-answer continuations of root..start of `kind` ("right" | "wrong") by the teachers."""
        if n <= 0 or self._room(start) <= 0:
            return [], 0.0
        try:
            reply = await self.svc.teachers.generate(
                self.svc.pool,
                kind,
                self.tree.question,
                self.tree.partial_text(start),
                n=n,
                max_tokens=self._room(start),
                temperature=self.cfg.teacher_temperature,
                seed=self._next_seed(),
                reference=self.reference if kind == "right" else None,
                whole=True,
            )
        except AllTeachersFailed as exc:
            self.stats.all_teachers_failed(kind, len(self.svc.teachers.states), exc)
            return [], 0.0
        self.stats.teacher_answered(kind, reply.failed)
        self.stats.teacher_tokens += _generated(reply.completion)
        writer = Writer(reply.teacher, kind)
        answers = []
        for ch, tokens in zip(reply.completion.choices, _per_choice(reply.completion), strict=True):
            lines = split_answer(teacher_solution(ch.text))
            counts = share(tokens, [len(line.text) for line in lines])
            answers += self._answer(start, lines, counts, writer, ch.finish_reason, ch.eos)
        return answers, reply.completion.latency_s

    def _answer(
        self,
        start: Node,
        lines: list[Line],
        counts: list[int],
        writer: Writer,
        finish_reason: str | None,
        eos: bool,
        adapter_version: int | None = None,
    ) -> list[_Answer]:
        if not lines:
            if start.parent is None or writer != STUDENT_WRITER:  # nothing written: nothing to learn from
                self.stats.empty_answers += 1
                return []
            # The continuation ended at once: the answer is root..start itself, as a leaf beside `start`. Its
            # tokens were sampled by two requests (`start`'s and this one), so it keeps no sampled tokens (its
            # GRPO item is scored on its text) and the older of their versions.
            parent = self.tree.nodes[start.parent]
            ended = Line(start.text)
            versions = [v for v in (start.adapter_version, adapter_version) if v is not None]
            version = min(versions) if versions else None
            return [_Answer(parent, [ended], [start.tokens], writer, finish_reason, eos, version)]
        return [_Answer(start, lines, counts, writer, finish_reason, eos, adapter_version)]

    # --- tree, judgement, backup ---------------------------------------------------------------------------
    def _add(self, answer: _Answer) -> tuple[Node, bool]:
        """The answer's lines into the tree; returns (its leaf, whether the leaf is new)."""
        leaf, created = add_answer(
            self.tree,
            answer.start,
            answer.lines,
            answer.writer,
            token_counts=answer.token_counts,
            finish_reason=answer.finish_reason,
            adapter_version=answer.adapter_version,
        )
        self.stats.answers += 1
        for node in created:
            if node.step_logprob is not None:
                self.baseline.add(node.step_logprob)
        for node in created:  # in path order: a parent's accumulated PRE is set before its child's
            parent = self.tree.nodes[node.parent] if node.parent is not None else self.tree.root
            node.step_pre = step_pre(node.step_logprob, self.baseline.mean)
            node.accumulated_pre = accumulated_pre(
                parent.accumulated_pre, node.step_pre, self.cfg.rewards.discount
            )
        return leaf, bool(created) and created[-1] is leaf

    async def _judge(self, leaf: Node, eos: bool) -> None:
        """The exact reward of a new leaf: rules first, the checker only where they are unsure."""
        text = self.tree.partial_text(leaf)
        verdict = rule_verdict(leaf.text, leaf.finish_reason, eos)
        if verdict.terminal is None and self.cfg.use_checker:
            verdict = await self.svc.checker.check(
                self.tree.question, text, leaf.text, leaf.finish_reason, eos
            )
            if verdict.reason in ("checker", "checker_failed"):
                self.stats.checker_calls += 1
                self.stats.requests += 1
            if verdict.reason == "checker_failed":
                self.stats.degrade("checker_failed")
        said_no = verdict.terminal is False and verdict.reason in ("checker", "checker_cached")
        if verdict.terminal:
            leaf.terminal_reason = verdict.reason
        elif leaf.finish_reason == "length":
            leaf.terminal_reason = "token_limit"
        else:
            leaf.terminal_reason = "checker_no_answer" if said_no else "answer_end"
        leaf.answer = None if said_no else extract_answer(text)
        leaf.correct = same_number(leaf.answer, self.tree.gold)
        directions = [n.direction for n in self.tree.steps(leaf)]
        leaf.reward, leaf.reward_terms = path_reward(
            1.0 if leaf.correct else 0.0, leaf.accumulated_pre, leaf.depth, directions, self.cfg.rewards
        )

    def _backup(self, leaf: Node) -> None:
        assert leaf.reward is not None, "judged before the backup"
        path = self.tree.path(leaf)
        backprop(path, leaf.reward)
        for teacher in {n.source for n in path if n.source not in (ROOT, STUDENT)}:
            self.svc.teachers.record_reward(teacher, leaf.reward)

    def _final_stats(self, seconds: float, cancelled: bool) -> dict:
        s, tree = self.stats, self.tree
        leaves = [n for n in tree if n.terminal]
        return {
            "shape": "fork",
            "rounds": s.rounds,
            "forks": s.forks,
            "simulations": s.forks,
            "expansions": s.forks + int(bool(tree.root.children)),
            "rollouts": 0,
            "answers": s.answers,
            "empty_answers": s.empty_answers,
            "requests": s.requests,
            "tokens": s.student_tokens + s.teacher_tokens,
            "student_tokens": s.student_tokens,
            "teacher_tokens": s.teacher_tokens,
            "teacher_errors": s.teacher_errors,
            "student_unavailable": s.student_unavailable,
            "checker_calls": s.checker_calls,
            "gold_added": s.gold_added,
            "seconds": seconds,
            "critical_path_s": s.critical_path_s,
            "degraded": list(s.degraded),
            "errors": list(s.errors),
            "cancelled": cancelled,
            "nodes": len(tree),
            "terminal_leaves": len(leaves),
            "correct_leaves": sum(1 for n in leaves if n.correct),
            "max_depth_reached": max(n.depth for n in tree),
            "max_path_tokens": max(n.path_tokens for n in tree),
            "teachers": self.svc.teachers.snapshot(),
        }


def _generated(completion: Completion) -> int:
    return int(completion.usage.get("completion_tokens", 0) or 0)


def _per_choice(completion: Completion) -> list[int]:
    """The usage's generated tokens per choice: counted from the log-probs where they came, else shared by the
    choices' lengths."""
    choices = completion.choices
    if choices and all(ch.token_logprobs is not None for ch in choices):
        return [len(ch.token_logprobs or []) for ch in choices]
    return share(_generated(completion), [len(ch.text) for ch in choices])


async def run_fork_search(
    problem: Problem, config: SearchConfig, services: SearchServices, cancel: asyncio.Event | None = None
) -> SearchResult:
    """Grow one tree for `problem` with the fork search; returns it with stats (also when cancelled)."""
    return await _ForkSearch(problem, config, services).run(cancel)
