"""The reference teacher as a real process on 127.0.0.1: the OpenAI wire format (through the openai client),
its refusals, and a search grown with it as the teacher and the real trainer (tiny model, CPU) as the student."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from orchestrator.clients.llm import LLMPool, RetryPolicy
from orchestrator.clients.orchestrator import OrchestratorClient
from orchestrator.gsm8k.data import load_gsm8k
from orchestrator.local.processes import free_port, orchestrator_process
from orchestrator.reference_teacher.references import parse_reference
from orchestrator.runners.trajectories import grpo_group
from orchestrator.search.services import SearchServices
from orchestrator.search.shapes import run_search
from orchestrator.search.teachers import teacher_messages
from orchestrator.settings import Settings
from support.line_search import line_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def natalia():
    return load_gsm8k("train", limit=1)[0]


def test_openai_wire_format(reference_teacher, natalia):
    client = openai.OpenAI(base_url=reference_teacher.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["reference"]
    messages = teacher_messages("wrong", natalia.prompt, "")
    out = client.chat.completions.create(model="reference", messages=messages, n=3, seed=11, max_tokens=64)
    wrong = [c.message.content for c in out.choices]
    assert len(set(wrong)) == 3 and parse_reference(natalia).steps[0].text not in wrong
    assert [c.index for c in out.choices] == [0, 1, 2] and all(c.finish_reason == "stop" for c in out.choices)
    assert out.usage.completion_tokens > 0 and out.usage.total_tokens > out.usage.completion_tokens
    again = client.chat.completions.create(model="reference", messages=messages, n=3, seed=11, max_tokens=64)
    assert [c.message.content for c in again.choices] == wrong

    whole = teacher_messages("right", natalia.prompt, "", whole=True)
    cut = client.chat.completions.create(model="reference", messages=whole, max_tokens=4)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 4
    health = httpx.get(reference_teacher.url + "/health").json()
    assert health["status"] == "ok" and health["problems"] == 7473
    assert health["by_mode"] == {"wrong_line": 2, "right_whole": 1}


def test_refusals_name_what_is_wrong(reference_teacher):
    client = openai.OpenAI(base_url=reference_teacher.url + "/v1", api_key="unused", max_retries=0)
    test_problem = load_gsm8k("test", limit=1)[0]
    with pytest.raises(openai.NotFoundError, match="train problems only"):
        client.chat.completions.create(
            model="reference", messages=teacher_messages("right", test_problem.prompt, "")
        )
    with pytest.raises(openai.BadRequestError, match="not a teacher prompt"):
        client.chat.completions.create(model="reference", messages=[{"role": "user", "content": "2 + 2?"}])
    good = teacher_messages("right", "Anything?", "")
    with pytest.raises(openai.NotFoundError, match="serves 'reference'"):
        client.chat.completions.create(model="gpt-4o", messages=good)
    with pytest.raises(openai.BadRequestError, match="log-probs"):
        client.chat.completions.create(model="reference", messages=good, logprobs=True)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="reference", messages=good, n=0)


async def test_search_with_the_reference_teacher_and_the_real_trainer(
    reference_teacher, trainer_service, natalia
):
    """Configured as a user would (TEACHER_TIER=custom, TEACHERS JSON): the tree's teacher children come from
    the reference, the student's from the trainer; then the sft_gold shape (one whole reference answer, no
    student samples, rejection mode) makes a real GRPO step."""
    teachers = json.dumps(
        [{"name": "reference", "base_url": reference_teacher.url + "/v1", "model": "reference"}]
    )
    settings = Settings(
        trainer_url=trainer_service.url, teacher_tier="custom", teachers=teachers, request_timeout_s=300
    )
    reference = parse_reference(natalia)
    config = line_config(
        iterations=3,
        parallel_simulations=1,
        max_depth=3,
        max_tokens=96,
        chunk_tokens=24,
        n_student=1,
        n_teacher_right=1,
        n_teacher_wrong=2,
        rollout=False,
        use_checker=False,
        seed=3,
    )
    async with LLMPool.from_settings(settings, retry=RetryPolicy(max_retries=1)) as pool:
        services = SearchServices.from_settings(settings, pool)
        async with services.trainer:
            result = await run_search(natalia, config, services)
            tree, stats = result.tree, result.stats
            assert stats["teacher_errors"] == 0 and not stats["errors"], stats["errors"]
            assert not any(d.startswith("uniform_priors") for d in stats["degraded"]), stats["degraded"]
            root = {c.kind: c for c in tree.children(tree.root)}
            assert root["right"].text == reference.steps[0].text and root["right"].source == "reference"
            wrongs = [c for c in tree.children(tree.root) if c.kind == "wrong"]
            assert len(wrongs) == 2 and all(w.text != reference.steps[0].text for w in wrongs)
            assert all(c.step_logprob is not None for c in tree.children(tree.root))  # scored by the trainer
            for node in tree:  # a right child always continues the reference from where its partial stands
                for child in tree.children(node):
                    if child.kind == "right" and node.kind == "right":
                        assert child.text in [s.text for s in reference.steps] + [reference.answer_line]

            gold = line_config(
                iterations=1,
                parallel_simulations=1,
                max_depth=1,
                max_tokens=256,
                chunk_tokens=256,
                n_student=0,
                n_teacher_right=1,
                n_teacher_wrong=0,
                one_line_steps=False,
                rollout=False,
                use_checker=False,
            )
            gold_tree = (await run_search(natalia, gold, services)).tree
            leaf = gold_tree.nodes[1]
            assert (
                leaf.terminal
                and leaf.correct
                and leaf.text == "\n".join([s.text for s in reference.steps] + ["#### 72"])
            )
            items = [i.to_trainer_item() for i in grpo_group(gold_tree, "rejection", teacher_weight=1.0)]
            assert len(items) == 1 and items[0]["advantage"] == 1.0 and items[0]["weight"] == 1.0
            out = await services.trainer.grpo_step(
                items, {"type": "grpo", "beta": 0.0}, step_key="reference-gold"
            )
            assert out.adapter_version >= 1 and out.tokens > 20


def test_a_train_job_on_the_recipe_defaults(reference_teacher, trainer_service, tmp_path):
    """POST /train with no loss or search overrides but the sizes (tiny answers, few problems), the real trainer
    as student and the reference teacher as the only teacher: the fork search grows every tree, the step is
    applied with the recipe's loss, generated tokens are counted by source, and max_generated_tokens stops the
    job after its first step with that step's checkpoint saved."""
    teachers = [{"name": "reference", "base_url": reference_teacher.url + "/v1", "model": "reference"}]
    env = {
        "TEACHER_TIER": "custom",
        "TEACHERS": json.dumps(teachers),
        "REQUEST_TIMEOUT_S": "900",
    }
    with orchestrator_process(free_port(), trainer_service.url, tmp_path, env=env) as orch:
        orch.wait_ready(timeout_s=60)
        with OrchestratorClient(orch.url, timeout_s=120) as client:
            version_before = httpx.get(trainer_service.url + "/health").json()["adapter_version"]
            job_id = client.train(
                num_examples=4,
                batch_size=2,
                search={"root_samples": 2, "max_tokens": 48},
                max_generated_tokens=1,
            )
            job = client.wait(job_id, timeout_s=900)
            assert job["status"] == "completed", job["error"]
            request, result = job["request"], job["result"]
            assert request["loss"]["type"] == "dr_grpo" and request["loss"]["learning_rate"] == 5e-4
            assert request["loss"]["beta"] == 0.0 and request["loss"]["clip_eps_high"] == 0.28
            assert request["teacher_paths"] == "guided" and request["loss"]["micro_batch_size"] is None
            assert result["stop_reason"] == "max_generated_tokens" and result["steps"] == 2
            assert result["steps_done"] == 1 and result["checkpoint"]["step"] == 1
            names = {c["name"] for c in httpx.get(trainer_service.url + "/checkpoints").json()["checkpoints"]}
            assert result["checkpoint"]["name"] in names
            (step,) = client.steps(job_id)
            assert step["trees"] == 2 and step["student_tokens"] > 0 and step["teacher_tokens"] > 0
            assert step["generated_tokens"] == step["student_tokens"] + step["teacher_tokens"]
            assert step["generated_tokens_total"] == step["generated_tokens"] == result["generated_tokens"]
            assert not step.get("skipped") and step["items"] >= 2 and step["dropped_groups"] == 0
            assert result["applied_steps"] == 1 and result["adapter_version"] == version_before + 1
            assert step["micro_batches"] >= 1  # packed by the trainer's token budget
            assert 0 <= step["rescued_groups"] <= 2 and step["student_correct_share"] is not None
            for n in (0, 1):
                record = client.tree(job_id, n)
                assert record["stats"]["shape"] == "fork" and record["stats"]["requests"] >= 1
                assert not record["stats"]["errors"] and record["stats"]["correct_leaves"] >= 1
                nodes = record["tree"]["nodes"]
                leaves = [x for x in nodes if x["terminal"]]
                assert len(leaves) >= 2 and all(x["reward"] is not None for x in leaves)
                assert nodes[0]["visits"] == sum(
                    x["visits"] for x in leaves
                )  # every answer backed up to the root
                by_id = {x["id"]: x for x in nodes}

                def student_wrote(x, by_id=by_id):
                    while x["parent"] is not None:
                        if x["source"] != "student":
                            return False
                        x = by_id[x["parent"]]
                    return True

                solved = any(x["correct"] and student_wrote(x) for x in leaves)
                assert record["stats"]["gold_added"] == (
                    not solved
                )  # gold where the student alone did not solve it
