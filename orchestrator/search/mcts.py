"""The line search (`shape: "line"`): async MCTS over OpenAI-compatible endpoints, one reasoning line per node;
one tree per problem, many simulations and trees at once. (The default shape is fork.py's whole answers.)

One simulation:
1. Select: from the root, follow the best PUCT (or UCT) child until a terminal node or an unexpanded leaf;
   virtual loss is added along the path so concurrent simulations spread out. A leaf another simulation is
   expanding is waited for, then the descent goes on from it.
2. Expand: in parallel, the student samples `n_student` next steps (chat continuation of the partial solution,
   stop at a newline, logprobs on) and the teacher ensemble writes `n_teacher_right` "right" and
   `n_teacher_wrong` "wrong" next steps (one request with n each). Teacher steps are scored by the trainer's
   POST /logprobs; priors = softmax over siblings of the student's mean token log-prob (uniform when there
   is no trainer, recorded in stats.degraded). Each child is checked for being terminal (rules, then the LLM
   checker) and for the depth and token limits.
3. Evaluate the new children: every terminal child scores its exact path reward (rewards.py, no request); of
   the others the one with the highest prior (`rollouts="best"`, the default) or all of them (`"all"`) get a
   student rollout to an answer (when `rollout`), and the path is scored with the rollout's answer.
4. Backprop each evaluated child's value along root..child, credit the teachers on that path, remove the
   virtual loss.
`parallel_simulations` simulations run at once until `iterations` have started; the pool's global semaphore
bounds requests in flight across every tree; shapes.run_searches bounds the trees in flight. Setting `cancel` stops
a search at once (in-flight requests are cancelled) and returns the tree so far.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from orchestrator.clients.llm import Completion, LLMError
from orchestrator.clients.student_adapters import StudentServerError
from orchestrator.clients.trainer import TrainerError
from orchestrator.gsm8k.answers import extract_answer, same_number
from orchestrator.gsm8k.data import Problem, question_messages
from orchestrator.search.cancellation import until_done_or_cancelled
from orchestrator.search.counters import SearchCounters
from orchestrator.search.rewards import RunningMean, accumulated_pre, path_reward, step_pre
from orchestrator.search.sampling import sample_student
from orchestrator.search.services import SearchResult, SearchServices
from orchestrator.search.teachers import AllTeachersFailed, first_line, teacher_solution
from orchestrator.search.terminal import rule_verdict
from orchestrator.search.tree import (
    ROOT,
    STUDENT,
    Node,
    Tree,
    apply_virtual_loss,
    backprop,
    best_child,
    jaccard,
    remove_virtual_loss,
    softmax,
)
from orchestrator.settings import SearchConfig


@dataclass
class _Candidate:
    text: str
    source: str
    kind: str  # "student" | "right" | "wrong"
    logprob: float | None
    tokens: int | None
    finish_reason: str | None = None
    eos: bool = False
    adapter_version: int | None = None  # the student's version that wrote it (None: a teacher)


@dataclass
class _Stats(SearchCounters):
    expansions: int = 0
    simulations: int = 0
    tokens: int = 0  # generated: student_tokens + teacher_tokens
    rollouts: int = 0


def _estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


class _Search:
    def __init__(self, problem: Problem, config: SearchConfig, services: SearchServices):
        self.cfg, self.svc = config, services
        self.tree = Tree(problem.id, problem.prompt, problem.answer, question_messages(problem))
        self.reference = (problem.info or {}).get("solution") if config.teacher_reference else None
        self.baseline = RunningMean()
        self.stats = _Stats()
        self.claims: dict[int, asyncio.Event] = {}  # leaves being expanded
        self.chain_done: dict[int, float] = {}  # critical-path time at which a node's children existed
        self.chain = [0.0] * config.parallel_simulations  # per worker: summed latency of dependent requests
        self.student_logprobs = True
        self.seed_counter = 0

    # --- driver ---------------------------------------------------------------------------------------------
    async def run(self, cancel: asyncio.Event | None) -> SearchResult:
        started = time.perf_counter()
        workers = [asyncio.create_task(self._worker(w)) for w in range(self.cfg.parallel_simulations)]
        try:
            cancelled = await until_done_or_cancelled(asyncio.gather(*workers), cancel)
        finally:
            # run_search itself cancelled, or one worker failed: stop the others before touching the tree
            pending = [t for t in workers if not t.done()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for node in self.tree:  # pending simulations of a cancelled search leave virtual loss behind
                node.virtual_loss = 0
            for event in self.claims.values():
                event.set()
        return SearchResult(tree=self.tree, stats=self._final_stats(time.perf_counter() - started, cancelled))

    def _final_stats(self, seconds: float, cancelled: bool) -> dict:
        s = self.stats
        leaves = [n for n in self.tree if n.terminal]
        return {
            "shape": "line",
            "expansions": s.expansions,
            "simulations": s.simulations,
            "requests": s.requests,
            "tokens": s.tokens,
            "student_tokens": s.student_tokens,
            "teacher_tokens": s.teacher_tokens,
            "teacher_errors": s.teacher_errors,
            "student_unavailable": s.student_unavailable,
            "checker_calls": s.checker_calls,
            "rollouts": s.rollouts,
            "seconds": seconds,
            "degraded": list(s.degraded),
            "errors": list(s.errors),
            "cancelled": cancelled,
            "nodes": len(self.tree),
            "terminal_leaves": len(leaves),
            "correct_leaves": sum(1 for n in leaves if n.correct),
            "max_depth_reached": max(n.depth for n in self.tree),
            "max_path_tokens": max(n.path_tokens for n in self.tree),
            "critical_path_s": max(self.chain) if self.chain else 0.0,
            "teachers": self.svc.teachers.snapshot(),
        }

    async def _worker(self, w: int) -> None:
        while self.stats.simulations < self.cfg.iterations:
            self.stats.simulations += 1
            await self._simulate(w)

    # --- one simulation -------------------------------------------------------------------------------------
    async def _simulate(self, w: int) -> None:
        path = await self._select(w)
        leaf = path[-1]
        try:
            if leaf.terminal:
                results = [(path, leaf.reward if leaf.reward is not None else self._score_terminal(leaf))]
            else:
                children = await self._expand(leaf, w)
                self._release(leaf)  # waiting simulations may descend into the new children right away
                if not children:
                    leaf.expand_failures += 1
                    if leaf.expand_failures < self.cfg.max_expand_failures:
                        return
                    leaf.terminal, leaf.terminal_reason = True, "expansion_failed"
                    results = [(path, self._score_terminal(leaf))]
                else:
                    evaluated = self._to_evaluate(children)
                    values = await self._evaluate(evaluated, w)
                    results = [([*path, c], v) for c, v in zip(evaluated, values, strict=True)]
            for nodes, value in results:
                backprop(nodes, value)
                for node in nodes:
                    if node.source not in (ROOT, STUDENT):
                        self.svc.teachers.record_reward(node.source, value)
        finally:
            remove_virtual_loss(path)
            self._release(leaf)

    def _release(self, leaf: Node) -> None:
        claim = self.claims.pop(leaf.id, None)
        if claim is not None:
            claim.set()

    async def _select(self, w: int) -> list[Node]:
        tree, cfg = self.tree, self.cfg
        c = cfg.c_puct if cfg.selection == "puct" else cfg.c_uct
        node, path = tree.root, [tree.root]
        while not node.terminal:
            if not node.expanded:
                claim = self.claims.get(node.id)
                if claim is None:
                    self.claims[node.id] = asyncio.Event()
                    break
                await claim.wait()  # another simulation is expanding this leaf: continue from it afterwards
                self.chain[w] = max(self.chain[w], self.chain_done.get(node.id, 0.0))
                continue
            child = best_child(tree, node, cfg.selection, c, cfg.virtual_loss, cfg.fpu)
            if child is None:
                break
            node = child
            path.append(node)
        apply_virtual_loss(path)
        return path

    # --- expansion ------------------------------------------------------------------------------------------
    async def _expand(self, leaf: Node, w: int) -> list[Node]:
        cfg, tree = self.cfg, self.tree
        partial = tree.partial_text(leaf)
        step_cap = max(1, min(cfg.chunk_tokens, cfg.max_tokens - leaf.path_tokens))
        latencies: list[float] = []
        groups = await asyncio.gather(
            self._student_steps(partial, step_cap, latencies),
            self._teacher_steps("right", cfg.n_teacher_right, partial, step_cap, latencies),
            self._teacher_steps("wrong", cfg.n_teacher_wrong, partial, step_cap, latencies),
        )
        self.chain[w] += max(latencies, default=0.0)
        candidates = _dedupe([c for group in groups for c in group])
        if not candidates:
            return []
        await self._score(candidates, partial, w)
        children = self._add_children(leaf, candidates)
        leaf.expanded = True
        self.stats.expansions += 1
        await self._check_terminal(children, [c.eos for c in candidates], partial, w)
        self.chain_done[leaf.id] = self.chain[w]
        return children

    def _next_seed(self) -> int | None:
        if self.cfg.seed is None:
            return None
        self.seed_counter += 1
        return self.cfg.seed * 1_000_003 + self.seed_counter

    async def _student_steps(self, partial: str, step_cap: int, latencies: list[float]) -> list[_Candidate]:
        if self.cfg.n_student <= 0:
            return []
        try:
            self.stats.requests += 1
            completion = await sample_student(
                self.svc.pool,
                self.svc.student,
                self.tree.messages,
                partial,
                n=self.cfg.n_student,
                max_tokens=step_cap,
                temperature=self.cfg.temperature,
                stop=["\n"] if self.cfg.one_line_steps else None,
                seed=self._next_seed(),
                logprobs=self.student_logprobs,
                adapters=self.svc.adapters,
            )
        except (LLMError, StudentServerError) as exc:
            self.stats.error(f"student: {exc}")
            self.stats.degrade("student_errors")
            self._count_unavailable(exc)
            return []
        if self.student_logprobs and any(ch.token_logprobs is None for ch in completion.choices):
            self.student_logprobs = False  # asked again without: don't ask for them again
            self.stats.degrade("student_logprobs_unavailable")
            self.stats.requests += 1
        latencies.append(completion.latency_s)
        self._count_tokens(STUDENT, completion)
        return [
            _Candidate(
                text=ch.text.strip(),
                source=STUDENT,
                kind="student",
                logprob=ch.mean_logprob,
                tokens=len(ch.token_logprobs) if ch.token_logprobs else None,
                finish_reason=ch.finish_reason,
                eos=ch.eos,
                adapter_version=completion.adapter_version,
            )
            for ch in completion.choices
        ]

    def _count_unavailable(self, exc: LLMError | StudentServerError) -> None:
        if isinstance(exc, StudentServerError) or exc.retryable:
            self.stats.student_unavailable += 1

    def _count_tokens(self, source: str, completion: Completion) -> None:
        tokens = int(completion.usage.get("completion_tokens", 0) or 0)
        self.stats.tokens += tokens
        if source == STUDENT:
            self.stats.student_tokens += tokens
        else:
            self.stats.teacher_tokens += tokens

    async def _teacher_steps(
        self, kind: str, n: int, partial: str, step_cap: int, latencies: list[float]
    ) -> list[_Candidate]:
        if n <= 0:
            return []
        try:
            reply = await self.svc.teachers.generate(
                self.svc.pool,
                kind,
                self.tree.question,
                partial,
                n=n,
                max_tokens=step_cap,
                temperature=self.cfg.teacher_temperature,
                seed=self._next_seed(),
                reference=self.reference if kind == "right" else None,
                whole=not self.cfg.one_line_steps,
            )
        except AllTeachersFailed as exc:
            self.stats.all_teachers_failed(kind, len(self.svc.teachers.states), exc)
            return []
        self.stats.teacher_answered(kind, reply.failed)
        latencies.append(reply.completion.latency_s)
        self._count_tokens(reply.teacher, reply.completion)
        return [
            _Candidate(
                text=first_line(ch.text) if self.cfg.one_line_steps else teacher_solution(ch.text),
                source=reply.teacher,
                kind=kind,
                logprob=None,
                tokens=None,
                finish_reason=ch.finish_reason,
            )
            for ch in reply.completion.choices
        ]

    async def _score(self, candidates: list[_Candidate], partial: str, w: int) -> None:
        """Fill in the student's mean log-prob of every step that has none yet (teacher steps)."""
        missing = [c for c in candidates if c.logprob is None]
        if not missing:
            return
        scorer = self.svc.scorer
        if scorer is None:
            self.stats.degrade("uniform_priors: no trainer for /logprobs")
            return
        items = [{"messages": self.tree.messages, "context": partial, "completion": c.text} for c in missing]
        started = time.perf_counter()
        try:
            self.stats.requests += 1  # a request merged with other expansions' counts once for each
            results = await scorer.score(items, model="student")
        except TrainerError as exc:
            self.stats.error(f"trainer /logprobs: {exc}")
            self.stats.degrade("uniform_priors: trainer /logprobs failed")
            return
        finally:
            self.chain[w] += time.perf_counter() - started
        for cand, result in zip(missing, results, strict=False):  # a short answer leaves the rest unscored
            cand.logprob = result.mean if result.num_tokens else None
            cand.tokens = result.num_tokens or None

    def _add_children(self, leaf: Node, candidates: list[_Candidate]) -> list[Node]:
        cfg = self.cfg
        logprobs = [c.logprob for c in candidates if c.logprob is not None]
        scored = len(logprobs) == len(candidates)
        if scored:
            priors = softmax(logprobs, cfg.prior_temperature)
            for logprob in logprobs:
                self.baseline.add(logprob)
        else:
            priors = [1.0 / len(candidates)] * len(candidates)
            if any(c.logprob is not None for c in candidates):
                self.stats.degrade("uniform_priors: some steps unscored")
        student_texts = [c.text for c in candidates if c.kind == "student"]
        children = []
        for cand, prior in zip(candidates, priors, strict=True):
            pre = step_pre(cand.logprob if scored else None, self.baseline.mean)
            similarity = None
            if cand.kind != "student" and student_texts:
                similarity = max(jaccard(cand.text, s) for s in student_texts)
            children.append(
                self.tree.add_child(
                    leaf,
                    cand.text,
                    cand.source,
                    cand.kind,
                    prior=prior,
                    step_logprob=cand.logprob,
                    step_pre=pre,
                    accumulated_pre=accumulated_pre(leaf.accumulated_pre, pre, cfg.rewards.discount),
                    tokens=cand.tokens if cand.tokens is not None else _estimate_tokens(cand.text),
                    similarity=similarity,
                    finish_reason=cand.finish_reason,
                    adapter_version=cand.adapter_version,
                )
            )
        return children

    async def _check_terminal(
        self, children: list[Node], eos_flags: list[bool], partial: str, w: int
    ) -> None:
        """Rules for every child; the LLM checker (in parallel) only for children the rules are unsure of."""
        cfg = self.cfg
        verdicts = [
            rule_verdict(c.text, c.finish_reason, eos) for c, eos in zip(children, eos_flags, strict=True)
        ]
        unsure = [i for i, v in enumerate(verdicts) if v.terminal is None]
        if unsure and cfg.use_checker:
            started = time.perf_counter()
            checked = await asyncio.gather(
                *(
                    self.svc.checker.check(
                        self.tree.question,
                        partial + children[i].text + "\n",
                        children[i].text,
                        children[i].finish_reason,
                        eos_flags[i],
                    )
                    for i in unsure
                )
            )
            asked = sum(1 for v in checked if v.reason in ("checker", "checker_failed"))
            self.stats.checker_calls += asked
            self.stats.requests += asked
            if asked:
                self.chain[w] += time.perf_counter() - started
            if any(v.reason == "checker_failed" for v in checked):
                self.stats.degrade("checker_failed")
            for i, v in zip(unsure, checked, strict=True):
                verdicts[i] = v
        for child, v in zip(children, verdicts, strict=True):
            if v.terminal:
                child.terminal, child.terminal_reason = True, v.reason
            elif child.depth >= cfg.max_depth:
                child.terminal, child.terminal_reason = True, "depth_limit"
            elif child.path_tokens >= cfg.max_tokens:
                child.terminal, child.terminal_reason = True, "token_limit"

    # --- evaluation -----------------------------------------------------------------------------------------
    def _score_terminal(self, node: Node) -> float:
        text = self.tree.partial_text(node)
        node.answer = extract_answer(text)
        node.correct = same_number(node.answer, self.tree.gold)
        node.reward, node.reward_terms = self._path_value(node, 1.0 if node.correct else 0.0)
        return node.reward

    def _path_value(self, node: Node, hre_value: float) -> tuple[float, dict]:
        directions = [n.direction for n in self.tree.steps(node)]
        return path_reward(hre_value, node.accumulated_pre, node.depth, directions, self.cfg.rewards)

    def _to_evaluate(self, children: list[Node]) -> list[Node]:
        """Terminal children always (their score is exact and free); of the others, all of them or only the
        one with the highest prior (one simulation per expansion, as in AlphaZero), per `rollouts`."""
        terminal = [c for c in children if c.terminal]
        open_ = [c for c in children if not c.terminal]
        if self.cfg.rollouts == "best" and open_:
            open_ = [max(open_, key=lambda c: c.prior)]
        return terminal + open_

    async def _evaluate(self, children: list[Node], w: int) -> list[float]:
        """Exact scores of terminal children (no request); rollouts of the open ones, in parallel."""
        values = [self._score_terminal(c) if c.terminal else 0.0 for c in children]
        open_ = [i for i, c in enumerate(children) if not c.terminal]
        if open_:
            latencies: list[float] = []
            rolled = await asyncio.gather(*(self._evaluate_one(children[i], latencies) for i in open_))
            self.chain[w] += max(latencies, default=0.0)
            for i, v in zip(open_, rolled, strict=True):
                values[i] = v
        return values

    async def _evaluate_one(self, node: Node, latencies: list[float]) -> float:
        if node.terminal:
            return self._score_terminal(node)
        remaining = self.cfg.max_tokens - node.path_tokens
        if not self.cfg.rollout or remaining <= 0:
            return self._path_value(node, 0.0)[0]
        partial = self.tree.partial_text(node)
        try:
            self.stats.requests += 1
            self.stats.rollouts += 1
            completion = await sample_student(
                self.svc.pool,
                self.svc.student,
                self.tree.messages,
                partial,
                n=1,
                max_tokens=min(self.cfg.rollout_max_tokens, remaining),
                temperature=self.cfg.temperature,
                seed=self._next_seed(),
                logprobs=False,
                adapters=self.svc.adapters,
            )
        except (LLMError, StudentServerError) as exc:
            self.stats.error(f"rollout: {exc}")
            self.stats.degrade("rollout_errors")
            self._count_unavailable(exc)
            return self._path_value(node, 0.0)[0]
        latencies.append(completion.latency_s)
        self._count_tokens(STUDENT, completion)
        node.rollout = completion.choices[0].text if completion.choices else ""
        correct = same_number(extract_answer(partial + node.rollout), self.tree.gold)
        return self._path_value(node, 1.0 if correct else 0.0)[0]


def _dedupe(candidates: list[_Candidate]) -> list[_Candidate]:
    """Drop empty steps and exact repeats among siblings (the first one, student before teachers, stays)."""
    seen: set[str] = set()
    out = []
    for c in candidates:
        key = " ".join(c.text.split()).lower()
        if key and key not in seen:
            seen.add(key)
            out.append(c)
    return out


async def run_line_search(
    problem: Problem, config: SearchConfig, services: SearchServices, cancel: asyncio.Event | None = None
) -> SearchResult:
    """Grow one tree for `problem` line by line; returns it with stats (also when cancelled). shapes.run_search
    picks this search for `shape: "line"`."""
    return await _Search(problem, config, services).run(cancel)
