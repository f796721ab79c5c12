"""The options issue #9 added (teacher reference hint, plain-GRPO samples, reward and teacher-weight
overrides) and the pure helpers of bench/learning.py."""

import importlib.util

from orchestrator.clients.llm import LLMPool, RetryPolicy
from orchestrator.gsm8k.data import Problem
from orchestrator.runners.requests import TrainRequest, search_config
from orchestrator.search.services import SearchServices
from orchestrator.search.shapes import run_search
from orchestrator.search.teachers import TeacherEnsemble, teacher_messages, teacher_solution
from orchestrator.search.terminal import TerminalChecker
from orchestrator.settings import EndpointSpec, SearchConfig, Settings
from support.line_search import line_config


def load_learning(repo_root):
    spec = importlib.util.spec_from_file_location("learning_bench", repo_root / "bench" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- teacher reference ----------------------------------------------------------------------------------
def test_reference_is_shown_to_the_right_teacher_only():
    right = teacher_messages("right", "q?", "", reference="48/2 = 24\n#### 72")[1]["content"]
    wrong = teacher_messages("wrong", "q?", "", reference="48/2 = 24\n#### 72")[1]["content"]
    plain = teacher_messages("right", "q?", "")[1]["content"]
    assert "<reference>\n48/2 = 24\n</reference>" in right
    assert "reference" not in wrong and "reference" not in plain
    assert right.startswith(plain)


def test_the_reference_loses_its_calculator_notes_and_answer_line():
    right = teacher_messages("right", "q?", "", reference="48/2 = <<48/2=24>>24 clips.\n#### 72")[1][
        "content"
    ]
    assert "<reference>\n48/2 = 24 clips.\n</reference>" in right and "<<" not in right and "72" not in right


def test_whole_answer_prompts_ask_for_the_rest_of_the_solution():
    right = teacher_messages("right", "q?", "a\n", reference="6*12 = 72", whole=True)[1]["content"]
    wrong = teacher_messages("wrong", "q?", "a\n", reference="6*12 = 72", whole=True)[1]["content"]
    assert "Write the rest of a correct solution" in right and "<reference>\n6*12 = 72" in right
    assert "plausible but wrong solution" in wrong and "reference" not in wrong
    assert "next single step" not in right + wrong


def test_teacher_solution_keeps_the_lines_up_to_the_answer():
    # What the 135M teacher wrote for GSM8K train-0 with the reference shown (greedy): the answer, then an
    # echoed closing tag; sometimes a second attempt after a blank line.
    text = "Natalia sold 24 clips in May.\n\nShe sold 72 clips.\n#### 72\n</reference>\n#### 12"
    assert teacher_solution(text) == "Natalia sold 24 clips in May.\nShe sold 72 clips.\n#### 72"
    assert teacher_solution("<reference>\n  48/2 = 24  \n") == "48/2 = 24"
    echoed = "A reference solution, for you only, one step per line:\nShe earned $10.\n#### 10"
    assert teacher_solution(echoed) == "She earned $10.\n#### 10"
    assert teacher_solution("") == ""


# --- request options reach the search config -------------------------------------------------------------
def test_train_request_options_reach_the_search_config():
    request = TrainRequest.model_validate(
        {
            "search": {
                "one_line_steps": False,
                "teacher_reference": True,
                "rewards": {"pre": 0.1, "hre": 1.0},
            },
            "teacher_weight": 1.0,
        }
    )
    config = search_config(Settings(), request)
    assert config.one_line_steps is False and config.teacher_reference is True
    assert (config.rewards.pre, config.rewards.hre) == (0.1, 1.0)
    assert config.rewards.length_penalty == -0.01  # unset weights keep their default
    assert request.teacher_weight == 1.0 and request.eval_concurrency == 32
    defaults = search_config(Settings(), TrainRequest())
    assert defaults.one_line_steps is True and defaults.teacher_reference is False


def test_reward_overrides_reject_unknown_fields():
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError, match="prre"):
        TrainRequest.model_validate({"search": {"rewards": {"prre": 0.1}}})


# --- the search honours them (scripted OpenAI-compatible server) ------------------------------------------
async def _search(server, problem, config):
    def ep(name):
        return EndpointSpec(name=name, base_url=server.v1, model=name, timeout_s=5)

    async with LLMPool(retry=RetryPolicy(max_retries=0)) as pool:
        svc = SearchServices(
            pool=pool,
            teachers=TeacherEnsemble([ep("t1")], seed=0),
            checker=TerminalChecker(pool, ep("checker")),
            student=ep("student"),
        )
        return await run_search(problem, config, svc)


def one_expansion_of_whole_answers(**overrides) -> SearchConfig:
    """The grpo and guided arms' search: the root expanded once into whole answers, no wrong teacher."""
    fields = dict(
        iterations=1,
        parallel_simulations=1,
        max_depth=1,
        n_teacher_wrong=0,
        one_line_steps=False,
        chunk_tokens=256,
        rollout=False,
        use_checker=False,
    )
    return line_config(**{**fields, **overrides})


async def test_plain_grpo_samples_are_whole_answers(scripted_server):
    problem = Problem(id="t-0", prompt="What is 6 * 7?", answer="42")
    config = one_expansion_of_whole_answers(n_student=4, n_teacher_right=0)
    result = await _search(scripted_server, problem, config)
    students = [e for e in scripted_server.log if e.get("model") == "student"]
    assert len(students) == 1 and students[0]["payload"].get("stop") is None
    assert students[0]["payload"]["n"] == 4
    leaves = [n for n in result.tree if n.terminal]
    assert leaves and all(n.depth == 1 and n.source == "student" for n in leaves)
    assert not [e for e in scripted_server.log if e.get("model") in ("t1", "checker")]


async def test_teacher_reference_reaches_the_right_teacher(scripted_server):
    problem = Problem(id="t-1", prompt="What is 6 * 7?", answer="42", info={"solution": "6*7=42\n#### 42"})
    config = line_config(
        iterations=1, parallel_simulations=1, rollout=False, use_checker=False, teacher_reference=True
    )
    await _search(scripted_server, problem, config)
    teacher = [e for e in scripted_server.log if e.get("model") == "t1"]
    texts = {e["payload"]["messages"][1]["content"] for e in teacher}
    right = [t for t in texts if "Write only the next single step of a correct" in t]
    wrong = [t for t in texts if "plausible but wrong" in t]
    assert right and all("<reference>\n6*7=42\n</reference>" in t for t in right)
    assert wrong and not any("<reference>" in t for t in wrong)


async def test_whole_answer_teacher_joins_the_student_group(scripted_server):
    """one_line_steps=false with a "right" teacher: one expansion whose children are whole answers, the
    teacher's written with the reference; all of them terminal and scored, so flat advantages compare them."""
    problem = Problem(id="t-2", prompt="What is 6 * 7?", answer="42", info={"solution": "6*7=42\n#### 42"})
    config = one_expansion_of_whole_answers(n_student=3, n_teacher_right=1, teacher_reference=True)
    result = await _search(scripted_server, problem, config)
    teacher = [e for e in scripted_server.log if e.get("model") == "t1"]
    assert len(teacher) == 1
    prompt = teacher[0]["payload"]["messages"][1]["content"]
    assert "Write the rest of a correct solution" in prompt and "<reference>\n6*7=42\n</reference>" in prompt
    leaves = [n for n in result.tree if n.terminal]
    by_source = {n.source: n for n in leaves}
    assert len(leaves) == 4 and set(by_source) == {"student", "t1"}
    taught = by_source["t1"]
    assert taught.text.count("\n") >= 1 and taught.text.endswith("#### 42") and taught.correct


# --- bench/learning.py helpers ----------------------------------------------------------------------------
def test_arms_differ_only_where_they_should(repo_root):
    learning = load_learning(repo_root)
    arms = learning.arm_requests(learning.parse_args(["--group", "6", "--max-tokens", "200"]))
    mcts, grpo, gold = arms["mcts"], arms["grpo"], arms["sft_gold"]
    assert mcts["search"] == {"max_tokens": 200} and "loss" not in mcts  # the product's defaults otherwise
    assert arms["mcts_tree"] == {**mcts, "advantage_mode": "tree"}
    assert arms["legacy"]["loss"] == {"type": "legacy"}
    assert grpo["search"] == {
        "max_tokens": 200,
        "shape": "fork",
        "root_samples": 6,
        "iterations": 0,
        "n_teacher_right": 0,
        "n_teacher_wrong": 0,
        "teacher_gold": False,
    }
    assert {k: v for k, v in grpo.items() if k != "search"} == {
        k: v for k, v in mcts.items() if k != "search"
    }
    assert gold["search"]["root_samples"] == 0 and gold["search"]["teacher_gold"] is True
    assert gold["advantage_mode"] == "rejection" and gold["teacher_weight"] == 1.0
    for request in arms.values():
        TrainRequest.model_validate(request)  # every arm is a valid POST /train body
    group = search_config(Settings(), TrainRequest.model_validate(grpo)).student_rows()
    assert group == 6 == search_config(Settings(), TrainRequest.model_validate(mcts)).student_rows() - 2


def test_the_token_budget_is_the_jobs_max_generated_tokens(repo_root):
    learning = load_learning(repo_root)
    arms = learning.arm_requests(learning.parse_args(["--token-budget", "5000"]))
    assert {a["max_generated_tokens"] for a in arms.values()} == {5000}
    assert "max_generated_tokens" not in learning.product_request(learning.parse_args([]))


def test_the_updates_flag_sets_loss_updates_in_every_arm(repo_root):
    learning = load_learning(repo_root)
    arms = learning.arm_requests(learning.parse_args(["--updates", "4"]))
    assert {TrainRequest.model_validate(a).loss.updates for a in arms.values()} == {4}
    # left out: not sent, so the trainer's default (1) holds
    assert "loss" not in learning.product_request(learning.parse_args([]))


def test_extra_arm_is_merged_over_the_product(repo_root):
    learning = load_learning(repo_root)
    args = learning.parse_args(["--arm", 'lr2e-4={"loss": {"learning_rate": 0.0002}}'])
    arm = learning.arm_requests(args)["lr2e-4"]
    assert arm["loss"] == {"learning_rate": 0.0002}
    loss = TrainRequest.model_validate(arm).loss
    assert loss.learning_rate == 0.0002 and loss.type == "dr_grpo" and loss.beta == 0.0


def test_dev_mode_judges_on_the_train_tail_that_no_arm_trains_on(repo_root):
    learning = load_learning(repo_root)
    dev = learning.parse_args(["--dev", "--curve-every", "2"])
    assert learning.held_out(dev) == ("train", 7473 - 500, 500)
    assert learning.train_problems(dev) == (0, 7473 - 500)
    request = learning.product_request(dev)
    assert request["offset"] + request["num_examples"] <= 7473 - 500
    assert "eval_every" not in request  # the job's quick eval reads test problems: off in dev mode
    assert dev.json_out.endswith("learning_dev.json") and dev.tag == "dev"
    late = learning.parse_args(["--dev", "--train-offset", "7000", "--train-examples", "100"])
    assert learning.train_problems(late)[0] + learning.train_problems(late)[1] <= 7473 - 500
    test = learning.parse_args(["--curve-every", "2"])
    assert learning.held_out(test) == ("test", 0, 1319) and learning.train_problems(test) == (0, 7473)
    assert learning.product_request(test)["eval_every"] == 2 and test.json_out.endswith("learning.json")


def test_paired_uses_the_same_problems(repo_root):
    learning = load_learning(repo_root)
    base = [{"problem_id": f"p{i}", "strict_correct": i < 1, "flexible_correct": i < 2} for i in range(8)]
    trained = [{"problem_id": f"p{i}", "strict_correct": i < 7, "flexible_correct": i < 2} for i in range(8)]
    strict = learning.paired(base, trained, "strict")
    assert (strict["only_first"], strict["only_second"]) == (0, 6)
    assert strict["p_value"] == 2 / 2**6  # McNemar exact, b=0, c=6: 2 * C(6,0) / 2^6
    assert learning.paired(base, trained, "flexible")["p_value"] == 1.0
