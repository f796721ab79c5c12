"""The texts of one teacher request: right or wrong, one line or the rest, n choices (before max_tokens and stop)."""

from __future__ import annotations

import hashlib
import random

from orchestrator.reference_teacher.alignment import steps_done
from orchestrator.reference_teacher.arithmetic import same
from orchestrator.reference_teacher.mistakes import carry_error, wrong_answer, wrong_step
from orchestrator.reference_teacher.prompts import TeacherAsk
from orchestrator.reference_teacher.references import Reference, question_key


def right_text(reference: Reference, done: int, whole: bool) -> str:
    rest = [s.text for s in reference.steps[done:]] + [reference.answer_line]
    return "\n".join(rest) if whole else rest[0]


def wrong_text(reference: Reference, done: int, whole: bool, rng: random.Random) -> str:
    """A wrong next step (or, `whole`, a wrong rest of the solution). A step with nothing to get wrong ("Let S
    be the price.") is written as it is and the mistake goes into the first step after it that has one."""
    steps = reference.steps
    kept: list[str] = []
    for at in range(done, len(steps)):
        text, result = wrong_step(steps[at], rng)
        if text != steps[at].text:
            break
        kept.append(steps[at].text)
    else:
        return (
            "\n".join([*kept, wrong_answer(reference, {}, rng)])
            if whole
            else wrong_answer(reference, {}, rng)
        )
    if not whole:
        return text
    step = steps[at]
    wrong = {step.result: result} if step.result is not None and result is not None else {}
    lines = [*kept, text]
    for later in steps[at + 1 :]:
        text, result = carry_error(later, wrong)
        lines.append(text)
        if later.result is not None and result is not None and not same(later.result, result):
            wrong[later.result] = result
    return "\n".join([*lines, wrong_answer(reference, wrong, rng)])


def _rng(seed: int | None, index: int, attempt: int, ask: TeacherAsk) -> random.Random:
    if seed is None:
        return random.Random()
    digest = hashlib.blake2b(
        f"{seed}|{index}|{attempt}|{question_key(ask.question)}|{ask.partial}".encode(), digest_size=8
    ).digest()
    return random.Random(int.from_bytes(digest, "big"))


def write(reference: Reference, ask: TeacherAsk, n: int, seed: int | None) -> list[str]:
    """The n texts of a teacher request (before max_tokens and stop)."""
    done = steps_done(reference, ask.partial)
    if ask.kind == "right":
        return [right_text(reference, done, ask.whole)] * n
    texts: list[str] = []
    for index in range(n):
        for attempt in range(16):  # the n choices differ where the step has that many wrong versions
            text = wrong_text(reference, done, ask.whole, _rng(seed, index, attempt, ask))
            if text not in texts:
                break
        texts.append(text)
    return texts
