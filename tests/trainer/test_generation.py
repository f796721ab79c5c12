"""The decode loop (generation.py) through Student.generate, on a tiny randomly initialised model (fast on 2 cores)."""

import pytest

torch = pytest.importorskip("torch")

from services.trainer.generation import stop_position
from services.trainer.items import GenerationRequest
from support.tiny_student import ids


def test_n_samples_share_one_prefill_and_rows_leave_when_done(student):
    prompt = ids(student, "Hello there, how are you")
    before = student.forward_passes
    samples = student.generate(
        [
            GenerationRequest(prompt, n=3, max_tokens=5, temperature=1.0, seed=1),
            GenerationRequest(prompt[:3], n=1, max_tokens=2, temperature=0),
        ]
    )
    assert [len(s) for s in samples] == [3, 1]
    assert all(s.num_generated <= 5 for s in samples[0]) and samples[1][0].num_generated <= 2
    # one prefill for both prompts, then one decode pass per further token of the longest row
    assert student.forward_passes - before == max(s.num_generated for s in samples[0])


def test_greedy_in_a_padded_batch_equals_greedy_alone(student):
    a, b = ids(student, "The quick brown fox jumps"), ids(student, "One")
    alone = student.generate([GenerationRequest(a, max_tokens=6, temperature=0)])[0][0]
    together = student.generate(
        [GenerationRequest(b, max_tokens=6, temperature=0), GenerationRequest(a, max_tokens=6, temperature=0)]
    )[1][0]
    assert together.token_ids == alone.token_ids


def test_a_request_joining_a_running_decode_loop_gets_the_same_greedy_text(student):
    long_prompt, short_prompt = (
        ids(student, "A much longer prompt than the other one, with many words"),
        ids(student, "Short"),
    )
    alone = student.generate([GenerationRequest(short_prompt, max_tokens=5, temperature=0)])[0][0]
    calls, done = [], []

    def admit(free_rows):
        calls.append(free_rows)
        return [GenerationRequest(short_prompt, max_tokens=5, temperature=0)] if len(calls) == 3 else []

    answers = {}
    results = student.generate(
        [GenerationRequest(long_prompt, max_tokens=8, temperature=0)],
        admit=admit,
        on_done=lambda index, samples: done.append(index) or answers.update({index: samples}),
    )
    assert results == [[], []]  # reported through on_done, not kept
    assert answers[1][0].token_ids == alone.token_ids
    assert sorted(done) == [0, 1] and calls[0] == student.max_batch_rows - 1


@pytest.mark.parametrize("stop", ["\n", "####", "→ so"])
def test_stop_position_after_every_token_matches_the_whole_text(student, stop):
    """Checked token by token, as the decode loop does: the first step whose text holds the stop finds it at the
    same place as a search of the whole text, however long the text before it (the check reads a short tail)."""
    text = "She has 3 apples and buys 4 more, é 🍎 twice, " * 6 + f"then 7{stop} and after{stop} more"
    tokens = ids(student, text)
    first_hit = None
    for length in range(1, len(tokens) + 1):
        found = stop_position(student.tokenizer, tokens[:length], [stop, "never here"])
        if found is not None:
            first_hit = (length, found)
            break
    decoded = student.tokenizer.decode(tokens[: first_hit[0]], skip_special_tokens=True)
    assert first_hit[1] == decoded.index(stop) == student.tokenizer.decode(tokens).index(stop)
    assert stop not in student.tokenizer.decode(tokens[: first_hit[0] - 1], skip_special_tokens=True)
