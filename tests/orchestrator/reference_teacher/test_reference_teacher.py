"""The reference teacher's engine: reading teacher prompts, aligning a partial solution with the reference,
right and wrong steps, sampling fields. The HTTP server is tested in tests/integration/test_reference_teacher.py."""

from __future__ import annotations

import pytest

from orchestrator.gsm8k.answers import extract_strict, same_number
from orchestrator.gsm8k.data import Problem, load_gsm8k
from orchestrator.reference_teacher.alignment import steps_done
from orchestrator.reference_teacher.arithmetic import evaluate, format_number
from orchestrator.reference_teacher.engine import ReferenceTeacher
from orchestrator.reference_teacher.errors import UnknownQuestion, UnreadablePrompt
from orchestrator.reference_teacher.prompts import read_teacher_prompt
from orchestrator.reference_teacher.references import ReferenceBook, parse_reference
from orchestrator.reference_teacher.tokens import TokenCounter
from orchestrator.search.teachers import teacher_messages

NATALIA = Problem(
    id="train-0",
    prompt="Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    answer="72",
    info={
        "split": "train",
        "index": 0,
        "solution": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
)
# Two steps with the same result (20), a step that computes nothing new, a number from the question (10).
SHOPPING = Problem(
    id="train-1",
    prompt="Ann spent $75 on 5 shorts at $7 each, 2 pairs of shoes at $10 each and 4 tops. How much was a top?",
    answer="5",
    info={
        "split": "train",
        "index": 1,
        "solution": "Let T be the price of a top.\n"
        "She bought 5 shorts at $7 each so 5*7=$<<5*7=35>>35\n"
        "She bought 2 pair of shoes at $10 each so 2*10=$<<2*10=20>>20\n"
        "The shorts and shoes cost her 35+20 = $<<35+20=55>>55\n"
        "That left 75-55 = $<<75-55=20>>20 for the tops\n"
        "So T = 20/4 = $<<20/4=5>>5\n#### 5",
    },
)


@pytest.fixture
def teacher() -> ReferenceTeacher:
    return ReferenceTeacher(ReferenceBook([NATALIA, SHOPPING]))


def ask(teacher, kind, problem, partial="", whole=False, **params):
    return teacher.chat(teacher_messages(kind, problem.prompt, partial, whole=whole), **params)


def texts(reply) -> list[str]:
    return [c.text for c in reply.choices]


# --- prompts ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["right", "wrong"])
@pytest.mark.parametrize("whole", [False, True])
def test_reads_every_teacher_prompt_of_the_orchestrator(kind, whole):
    partial = "Natalia sold 48/2 = 24 clips in May.\n"
    messages = teacher_messages(kind, NATALIA.prompt, partial, reference="a hint", whole=whole)
    read = read_teacher_prompt(messages)
    assert (read.kind, read.whole, read.partial) == (kind, whole, partial)
    assert read.question == NATALIA.prompt.strip()


def test_other_prompts_are_refused_with_their_kind():
    with pytest.raises(UnreadablePrompt):
        read_teacher_prompt([{"role": "user", "content": "What is 2 + 2?"}])
    with pytest.raises(UnreadablePrompt):
        read_teacher_prompt([{"role": "system", "content": "hi"}])
    bent = teacher_messages("right", NATALIA.prompt, "")
    bent[-1]["content"] = bent[-1]["content"].replace("Write only the next single step", "Write a poem")
    with pytest.raises(UnreadablePrompt):
        read_teacher_prompt(bent)


def test_questions_are_found_in_train_only(teacher):
    assert teacher.book.find("  " + NATALIA.prompt.replace(" ", "\n", 3) + " ").answer == "72"
    with pytest.raises(UnknownQuestion, match="train problems only"):
        ask(teacher, "right", Problem(id="test-0", prompt="How many legs has a cat?", answer="4"))
    assert teacher.counters.unknown_questions == 1
    with pytest.raises(ValueError, match="train problems only"):
        ReferenceBook([Problem(id="test-3", prompt="q", answer="1", info={"split": "test"})])


# --- alignment -------------------------------------------------------------------------------------------------
def test_reference_parsing_keeps_results_and_drops_notes():
    ref = parse_reference(NATALIA)
    assert [s.text for s in ref.steps] == [
        "Natalia sold 48/2 = 24 clips in May.",
        "Natalia sold 48+24 = 72 clips altogether in April and May.",
    ]
    assert [s.result for s in ref.steps] == [24, 72] and ref.answer_line == "#### 72"


@pytest.mark.parametrize(
    "partial, done",
    [
        ("", 0),
        ("In April she sold 48 clips.\n", 0),  # a question number restated is no step done
        ("In May she sold half of 48, that is 24.\n", 1),  # the result ends the line
        ("May: 48 / 2 = 24 clips\n", 1),  # the result after an '='
        ("May: 48 / 2 = 25 clips\n", 0),  # a wrong result does not count
        ("She sold 24 in May.\nSo 48 + 24 = 72 in all.\n", 2),
        ("So 48 + 24 = 72 in all.\n", 2),  # a step skipped: the next step follows the last one done
    ],
)
def test_steps_done_follows_the_results_in_the_partial(partial, done):
    assert steps_done(parse_reference(NATALIA), partial) == done


def test_steps_done_needs_a_line_per_repeated_result_and_the_text_of_a_bare_step():
    ref = parse_reference(SHOPPING)
    assert steps_done(ref, "Let T be the price of a top.\n") == 1
    assert steps_done(ref, "Shorts: 5*7=$35\nShoes: 2*10=$20\n") == 3  # 20 claimed by step 3 only, not step 5
    assert steps_done(ref, "Shorts: 5*7=$35\nShoes: 2*10=$20\nTops: 75-55 = $20\n") == 5


# --- right steps -----------------------------------------------------------------------------------------------
def test_right_writes_the_next_reference_step_then_the_answer_line(teacher):
    first = texts(ask(teacher, "right", NATALIA, n=3))
    assert first == ["Natalia sold 48/2 = 24 clips in May."] * 3  # one right answer: n copies
    partial = first[0] + "\n"
    second = texts(ask(teacher, "right", NATALIA, partial))[0]
    assert second == "Natalia sold 48+24 = 72 clips altogether in April and May."
    assert texts(ask(teacher, "right", NATALIA, partial + second + "\n")) == ["#### 72"]
    whole = texts(ask(teacher, "right", NATALIA, partial, whole=True))[0]
    assert whole == second + "\n#### 72"


def test_right_steps_chain_to_the_whole_reference_on_every_train_problem():
    """One right step at a time, each fed back as the partial, rebuilds the whole reference (7,473 problems)."""
    problems = load_gsm8k("train")
    teacher = ReferenceTeacher(ReferenceBook(problems))
    for problem in problems:
        whole = texts(ask(teacher, "right", problem, whole=True))[0]
        assert same_number(extract_strict(whole), problem.answer), problem.id
        assert "<<" not in whole
        partial = ""
        for _ in range(len(whole.split("\n"))):
            partial += texts(ask(teacher, "right", problem, partial))[0] + "\n"
        assert partial == whole + "\n", problem.id


# --- wrong steps -----------------------------------------------------------------------------------------------
def test_wrong_steps_are_plausible_differ_and_repeat_per_seed(teacher):
    wrong = texts(ask(teacher, "wrong", NATALIA, n=4, seed=5))
    assert len(set(wrong)) == 4 and "Natalia sold 48/2 = 24 clips in May." not in wrong
    assert all(w.startswith("Natalia sold ") and "<<" not in w for w in wrong)
    assert texts(ask(teacher, "wrong", NATALIA, n=4, seed=5)) == wrong
    assert texts(ask(teacher, "wrong", NATALIA, n=4, seed=6)) != wrong
    # the mistake is real arithmetic on shown numbers: "48/2 = 24" becomes e.g. "49/2 = 24.5" or "48x2 = 96"
    final = texts(ask(teacher, "wrong", NATALIA, "She sold 24.\nSo 48+24 = 72.\n", n=3, seed=1))
    assert all(w.startswith("#### ") and not same_number(extract_strict(w), "72") for w in final)


def test_a_wrong_whole_solution_carries_its_error_to_a_wrong_answer(teacher):
    for seed in range(20):
        text = texts(ask(teacher, "wrong", NATALIA, whole=True, seed=seed))[0]
        lines = text.split("\n")
        assert len(lines) == 3 and lines[-1].startswith("#### ")
        assert not same_number(extract_strict(text), "72")
        # the first step's wrong result is what the second step adds, and the answer is the second's result
        may = lines[0].split("= ")[1].split(" ")[0]
        assert f"48+{may} = " in lines[1]
        total = lines[1].split("= ")[1].split(" ")[0]
        assert same_number(extract_strict(lines[2]), total)


def test_wrong_passes_over_a_step_with_nothing_to_get_wrong(teacher):
    wrong = texts(ask(teacher, "wrong", SHOPPING, n=3, seed=0))
    assert all(
        w.startswith("She bought 5 shorts") and w != "She bought 5 shorts at $7 each so 5*7=$35"
        for w in wrong
    )
    whole = texts(ask(teacher, "wrong", SHOPPING, whole=True, seed=0))[0]
    assert whole.split("\n")[0] == "Let T be the price of a top."
    assert not same_number(extract_strict(whole), "5")


def test_wrong_whole_answers_are_wrong_on_every_train_problem():
    problems = load_gsm8k("train")
    teacher = ReferenceTeacher(ReferenceBook(problems))
    distinct = 0
    for problem in problems:
        wrong = texts(ask(teacher, "wrong", problem, whole=True, n=3, seed=0))
        assert all(not same_number(extract_strict(w), problem.answer) for w in wrong), problem.id
        distinct += len(set(wrong)) == 3
        line = texts(ask(teacher, "wrong", problem, seed=0))[0]
        assert line != parse_reference(problem).steps[0].text, problem.id
    assert distinct >= 0.99 * len(problems)


# --- sampling fields and usage ----------------------------------------------------------------------------------
def test_max_tokens_stop_and_usage(teacher):
    reply = ask(teacher, "right", NATALIA, whole=True, max_tokens=5)
    assert reply.choices[0].finish_reason == "length"
    assert TokenCounter().count(reply.choices[0].text) == 5
    assert reply.completion_tokens == 5 and reply.prompt_tokens > 50

    reply = ask(teacher, "right", NATALIA, whole=True, stop=["\n"])
    assert texts(reply) == ["Natalia sold 48/2 = 24 clips in May."]
    assert (reply.choices[0].finish_reason, reply.choices[0].stop_reason) == ("stop", "\n")

    reply = ask(teacher, "right", NATALIA, whole=True, n=2)
    assert all(c.finish_reason == "stop" and c.stop_reason is None for c in reply.choices)
    assert reply.completion_tokens == 2 * TokenCounter().count(reply.choices[0].text)
    assert teacher.counters.requests == 3 and teacher.counters.by_mode == {"right_whole": 3}


def test_numbers_and_arithmetic():
    assert evaluate("48/2") == 24 and evaluate("100-50-30-15") == 5 and evaluate("2*(3+4)") == 14
    assert evaluate("1/0") is None and evaluate("__import__('os')") is None and evaluate("2**8") is None
    assert [format_number(x) for x in (24.0, 0.2, 16.666666, -3.0, 2.50)] == [
        "24",
        "0.2",
        "16.67",
        "-3",
        "2.5",
    ]
