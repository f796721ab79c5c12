"""Both search shapes against the real trainer service with the tiny model (SmolLM2-135M on CPU): the student is
the trainer's "student", teacher and checker its "base" (the embedded default). Tiny budgets: this is about the
wiring (continue_final_message, stop, logprobs and their tokens, /logprobs priors, /grpo/step items), not about
accuracy."""

import pytest

from orchestrator.clients.llm import LLMPool, RetryPolicy
from orchestrator.gsm8k.data import Problem
from orchestrator.runners.trajectories import grpo_group
from orchestrator.search.lines import split_answer
from orchestrator.search.services import SearchServices
from orchestrator.search.shapes import run_search
from orchestrator.settings import SearchConfig, Settings
from services.protocol import LossSettings

pytestmark = pytest.mark.integration
PROBLEM = Problem(
    id="test-0", prompt="Tom has 3 apples and buys 4 more. How many apples does he have?", answer="7"
)


@pytest.fixture(scope="module")
def settings(trainer_service) -> Settings:
    return Settings(trainer_url=trainer_service.url, teacher_tier="embedded", request_timeout_s=300)


async def test_line_search_over_the_real_trainer(settings):
    config = SearchConfig(
        shape="line",
        iterations=2,
        parallel_simulations=2,
        max_depth=2,
        max_tokens=40,
        chunk_tokens=8,
        n_student=2,
        n_teacher_right=1,
        n_teacher_wrong=1,
        rollout=True,
        rollout_max_tokens=8,
        temperature=1.0,
        seed=7,
    )
    async with LLMPool.from_settings(settings, retry=RetryPolicy(max_retries=1)) as pool:
        services = SearchServices.from_settings(settings, pool)
        async with services.trainer:
            result = await run_search(PROBLEM, config, services)
            tree, stats = result.tree, result.stats
            assert stats["expansions"] >= 1 and stats["simulations"] == 2
            assert not any(d.startswith("uniform_priors") for d in stats["degraded"]), stats["degraded"]
            assert stats["teacher_errors"] == 0 and not stats["errors"], stats["errors"]
            root_children = tree.children(tree.root)
            assert {c.kind for c in root_children} >= {"student"}
            assert sum(c.prior for c in root_children) == pytest.approx(1.0)
            assert all(c.step_logprob is not None and c.step_logprob < 0 for c in root_children)
            assert all(n.depth <= 2 and n.path_tokens <= 40 and n.virtual_loss == 0 for n in tree)
            assert all("\n" not in n.text for n in tree)  # a node is one line
            assert stats["tokens"] > 0 and tree.to_json()["nodes"][0]["visits"] == tree.root.visits

            # whatever the tiny model wrote, the items are valid input for a real GRPO step
            items = [i.to_trainer_item() for i in grpo_group(tree, "tree")]
            if items:
                out = await services.trainer.grpo_step(
                    items[:4], LossSettings(type="grpo", micro_batch_size=4), step_key="search-trainer-test"
                )
                assert out.adapter_version >= 1 and out.tokens > 0


async def test_fork_search_over_the_real_trainer(settings):
    """The default shape: whole answers with the trainer's token log-probs cut into lines (each token's text found
    in the answer), forks continuing a partial with continue_final_message, the embedded teacher's continuation
    beside them; then a real GRPO step on the flat group (when the group has both right and wrong answers)."""
    config = SearchConfig(root_samples=3, iterations=2, n_student=2, max_tokens=48, seed=11)
    assert config.shape == "fork"
    async with LLMPool.from_settings(settings, retry=RetryPolicy(max_retries=1)) as pool:
        services = SearchServices.from_settings(settings, pool)
        async with services.trainer:
            sample = await pool.chat(
                services.student, [{"role": "user", "content": PROBLEM.prompt}], max_tokens=24, logprobs=True
            )
            choice = sample.choices[0]
            lines = split_answer(choice.text, choice.tokens, choice.token_logprobs)
            assert choice.tokens and "".join(choice.tokens).startswith(choice.text.strip()[:5])
            assert sum(len(line.logprobs) for line in lines) == len(choice.token_logprobs or [])

            result = await run_search(PROBLEM, config, services)
            tree, stats = result.tree, result.stats
            assert stats["shape"] == "fork" and not stats["errors"], stats["errors"]
            assert stats["teacher_errors"] == 0 and "uniform_priors" not in " ".join(stats["degraded"])
            assert stats["answers"] >= 3 and stats["student_tokens"] > 0
            student_lines = [n for n in tree if n.source == "student"]
            assert student_lines and all(
                n.step_logprob is not None and n.step_logprob < 0 for n in student_lines
            )
            assert all(n.path_tokens <= 48 and n.virtual_loss == 0 and "\n" not in n.text for n in tree)
            leaves = [n for n in tree if n.terminal]
            assert tree.root.visits == sum(n.visits for n in leaves) >= 3
            # each fork adds n_student continuations (and the teacher's)
            assert stats["answers"] >= 3 + 2 * stats["forks"]

            items = [i.to_trainer_item() for i in grpo_group(tree)]
            if items:  # a mixed group: the items are valid input for a real GRPO step
                out = await services.trainer.grpo_step(
                    items[:4],
                    LossSettings(type="dr_grpo", beta=0.0, micro_batch_size=4),
                    step_key="fork-trainer",
                )
                assert out.tokens > 0
