"""The decode loop (generation.py) through Student.generate, on a tiny randomly initialised model (fast on 2 cores)."""

import gc
import weakref

import pytest

torch = pytest.importorskip("torch")

from services.trainer.generation import stop_position
from services.trainer.items import GenerationRequest
from support.tiny_student import hf_greedy, ids


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


@pytest.fixture(scope="module")
def loop_student(tiny_random_model_dir, tmp_path_factory):
    from support.tiny_student import make_student

    student = make_student(tiny_random_model_dir, tmp_path_factory.mktemp("loop"), decode_engine="loop")
    assert student.slot_decoder is None  # generation.py's loop, not the slot engine
    return student


def test_the_loop_keeps_nothing_of_the_requests_it_answered(loop_student):
    """As the slot engine: once on_done reports a request, the running loop holds neither it nor its samples, so a
    loop that never ends under steady traffic does not grow; and the answers are those of the requests alone."""
    student = loop_student
    prompts = [ids(student, text) for text in ("One two", "Three four five", "Six")]
    alone = [
        student.generate([GenerationRequest(p, max_tokens=2, temperature=0)])[0][0].token_ids for p in prompts
    ]
    assert alone == [hf_greedy(student, p, 2) for p in prompts]
    gone: list[weakref.ref] = []
    seen_alive: list[int] = []
    answers: dict[int, list[int]] = {}

    def admit(free_rows):
        gc.collect()
        seen_alive.append(sum(ref() is not None for ref in gone))
        if len(gone) >= 30 or free_rows < 1:
            return []
        request = GenerationRequest(prompts[len(gone) % 3], max_tokens=2, temperature=0)
        gone.append(weakref.ref(request))
        return [request]

    results = student.generate(
        [GenerationRequest(prompts[0], max_tokens=50, temperature=0)],  # keeps the loop going
        admit=admit,
        on_done=lambda index, samples: answers.update({index: samples[0].token_ids}),
    )
    assert len(gone) == 30 and all(r == [] for r in results)
    assert max(seen_alive) <= 3 and seen_alive[-1] <= 1
    assert [answers[i] for i in range(1, 31)] == [alone[(i - 1) % 3] for i in range(1, 31)]


def test_the_loop_decodes_as_transformers_generate(loop_student):
    """Through the merged decode copies with their fused attention, the loop's KV cache is filled as transformers'
    own (a cache the fused layers ignored made every step after the prefill attend to its own token only)."""
    prompts = [ids(loop_student, text) for text in ("Natalia sold clips to 48 of her friends", "1, 2, 3,")]
    answers = loop_student.generate([GenerationRequest(p, max_tokens=12, temperature=0) for p in prompts])
    assert [a[0].token_ids for a in answers] == [hf_greedy(loop_student, p, 12) for p in prompts]
