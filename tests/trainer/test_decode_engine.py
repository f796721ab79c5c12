"""The slot decode engine (services/trainer/decode) on the tiny random model, on CPU: the same slot, prefix and
sampling code that CUDA replays as graphs, run eagerly. Shapes are also bucketed as on CUDA in some tests, so steps
that cover slots no row is using, and attention windows longer than any row, are exercised too."""

import gc
import threading
import time
import weakref

import pytest

torch = pytest.importorskip("torch")

from services.protocol import LossSettings
from services.trainer.decode.attention import varlen_reference
from services.trainer.decode.prefixes import BLOCK, PrefixIndex, block_hashes
from services.trainer.decode.sampler import choose, row_uniform
from services.trainer.items import GenerationRequest, GrpoItem
from support.tiny_student import hf_greedy, make_student


@pytest.fixture(scope="module")
def student(tiny_random_model_dir, tmp_path_factory):
    """Four slots per lane: enough for the tests' batches, few enough that rows wait for slots and reuse them."""
    return make_student(tiny_random_model_dir, tmp_path_factory.mktemp("decode"), max_batch_size=4)


@pytest.fixture
def bucketed(student):
    """The engine shaped as on CUDA: steps cover a bucket of slots, attention windows are rounded up, prefills
    are padded with rows that write to the scratch slot."""
    config = student.slot_decoder.engine.config
    saved = (config.row_buckets, config.window_step, config.prefill_buckets)
    config.row_buckets, config.window_step, config.prefill_buckets = (2, 4), 8, True
    yield student
    config.row_buckets, config.window_step, config.prefill_buckets = saved


@pytest.fixture
def overlapped(bucketed):
    """... and in CUDA's order: each decode step is launched before the host reads the tokens it feeds."""
    config = bucketed.slot_decoder.engine.config
    config.overlap = True
    yield bucketed
    config.overlap = False


@pytest.fixture
def padded(bucketed):
    """... with each prompt of a prefill padded to the longest in its sequence (the layout before packing)."""
    config = bucketed.slot_decoder.engine.config
    config.pack_prefill = False
    yield bucketed
    config.pack_prefill = True


@pytest.fixture
def varlen(bucketed):
    """... with prefills attending on their packed sequence through a varlen attention: varlen_reference, what
    flash_varlen's kernel computes on CUDA (tests/trainer/test_cuda_prefill.py holds the two together there)."""
    engine_lane = bucketed.slot_decoder.engine.lane("student")
    engine_lane.index.clear()  # no prefix cached by an earlier test: the first prompts attend over their own keys
    calls = {"own keys": 0, "gathered keys": 0}

    def counted(query, key, value, sequences, key_sequences, *sizes):
        calls["own keys" if key_sequences is sequences else "gathered keys"] += 1
        return varlen_reference(query, key, value, sequences, key_sequences, *sizes)

    engine_lane.varlen_attention = counted
    yield bucketed
    engine_lane.varlen_attention = None
    assert calls["own keys"] and calls["gathered keys"], (
        calls
    )  # both ways ran: prompts new, and reusing prefixes


def lane(student, name="student"):
    return student.slot_decoder.engine.lanes[name]


PROMPTS = [list(range(5, 5 + n)) for n in (3, 40, 17, 1, 26)]


@pytest.mark.parametrize("shaped", ["exact", "bucketed", "overlapped", "padded", "varlen"])
def test_greedy_in_one_batch_equals_transformers_generate(student, request, shaped):
    if shaped != "exact":
        request.getfixturevalue(shaped)
    requests = [GenerationRequest(p, max_tokens=6 + i, temperature=0) for i, p in enumerate(PROMPTS)]
    results = student.generate(requests)  # five requests, four slots: one waits for a slot
    for request, samples in zip(requests, results, strict=False):
        assert samples[0].token_ids == hf_greedy(student, request.prompt_ids, request.max_tokens)


def test_joining_rows_prefill_on_their_own_thread_beside_the_decode_step(student, monkeypatch):
    """On CPU a row that joins a running loop is prefilled on the prefill thread while the live rows decode, and
    takes part from the first step after its prefill is done, however many steps that takes: the answers are
    those of prefills in line."""
    engine = student.slot_decoder.engine
    assert engine.config.concurrent_prefill  # the CPU default
    engine_lane = engine.lane("student")
    threads: list[str] = []
    steps_beside: list[int] = []  # decode steps the loop took while a prefill ran beside it
    prefill = engine_lane.prefill

    def on_which_thread(plan, logits):
        threads.append(threading.current_thread().name)
        if not threads[-1].startswith("decode-prefill"):
            return prefill(plan, logits)
        before = engine.decode_steps
        time.sleep(0.3)  # a prefill longer than a decode step: the loop goes on without it
        passes = prefill(plan, logits)
        steps_beside.append(engine.decode_steps - before)
        return passes

    monkeypatch.setattr(engine_lane, "prefill", on_which_thread)
    # Five requests, four slots: the fifth joins when the first frees its slot after 2 tokens, while three rows
    # still have up to 38 steps to go (an end of sequence may end one early, all three at once is unlikely).
    requests = [
        GenerationRequest(p, max_tokens=2 if i == 0 else 40, temperature=0) for i, p in enumerate(PROMPTS)
    ]
    beside = student.generate(requests)
    engine.config.concurrent_prefill = False
    try:
        in_line = student.generate(requests)
    finally:
        engine.config.concurrent_prefill = True
    assert [s[0].token_ids for s in beside] == [s[0].token_ids for s in in_line]
    assert threads[0] == threading.current_thread().name  # the first rows: nothing to decode beside them yet
    assert any(name.startswith("decode-prefill") for name in threads)
    assert max(steps_beside) > 1
    assert not engine_lane.reserved


def test_sampled_logprobs_and_top_alternatives_equal_a_direct_forward(student):
    prompt = list(range(30, 52))
    sample = student.generate([GenerationRequest(prompt, max_tokens=8, temperature=1.0, seed=3, logprobs=3)])[
        0
    ][0]
    with torch.no_grad():
        logits = student.model(torch.tensor([prompt + sample.token_ids])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 : -1]
    expected = logp.gather(1, torch.tensor(sample.token_ids).unsqueeze(1)).squeeze(1)
    assert sample.token_logprobs == pytest.approx(expected.tolist(), abs=1e-4)
    top = logp.topk(3, dim=-1)
    for k, alternatives in enumerate(sample.top_logprobs):
        assert [t for t, _ in alternatives] == top.indices[k].tolist()
        assert [v for _, v in alternatives] == pytest.approx(top.values[k].tolist(), abs=1e-4)


@pytest.mark.parametrize("shaped", ["bucketed", "overlapped"])
def test_rows_join_and_leave_at_any_step_and_keep_their_text(student, request, shaped):
    request.getfixturevalue(shaped)
    alone = {tuple(p): hf_greedy(student, p, 9) for p in (PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[4])}
    calls, done = [], []

    def admit(free_rows):
        calls.append(free_rows)
        if len(calls) in (2, 5):  # two late requests, joining while the others decode
            prompt = PROMPTS[2] if len(calls) == 2 else PROMPTS[4]
            return [GenerationRequest(prompt, max_tokens=9, temperature=0)]
        return []

    answers = {}
    results = student.generate(
        [
            GenerationRequest(PROMPTS[0], max_tokens=3, temperature=0),  # leaves early: its slot is reused
            GenerationRequest(PROMPTS[1], max_tokens=9, temperature=0),
        ],
        admit=admit,
        on_done=lambda index, samples: done.append(index) or answers.update({index: samples}),
    )
    assert results == [[], [], [], []]  # reported through on_done, not kept
    assert [answers[i][0].token_ids for i in range(4)] == [
        alone[tuple(PROMPTS[0])][:3],
        alone[tuple(PROMPTS[1])],
        alone[tuple(PROMPTS[2])],
        alone[tuple(PROMPTS[4])],
    ]
    assert done[0] == 0 and sorted(done) == [0, 1, 2, 3]
    assert calls[0] == student.max_batch_rows - 2


def test_n_samples_share_one_prefill_and_seeded_rows_ignore_their_neighbours(student):
    prompt = list(range(100, 137))
    engine_lane = student.slot_decoder.engine.lane("student")
    engine_lane.index.clear()  # nothing cached: the prompt is computed once here
    before, passes = engine_lane.prefill_tokens, student.forward_passes
    together = student.generate([GenerationRequest(prompt, n=4, max_tokens=6, temperature=1.0, seed=11)])[0]
    assert engine_lane.prefill_tokens - before == len(prompt)
    assert student.forward_passes - passes == 6  # one prefill, then one pass per further token
    texts = [s.token_ids for s in together]
    assert len({tuple(t) for t in texts}) > 1  # the samples differ
    crowded = student.generate(
        [
            GenerationRequest(list(range(7, 20)), n=2, max_tokens=6, temperature=0.7, seed=5),
            GenerationRequest(prompt, n=4, max_tokens=6, temperature=1.0, seed=11),
        ]
    )[1]
    assert [s.token_ids for s in crowded] == texts


@pytest.mark.parametrize("shaped", ["bucketed", "varlen"])
def test_a_prompt_extending_another_reuses_its_kv_across_calls_and_within_one_admission(
    student, request, shaped
):
    request.getfixturevalue(shaped)
    engine_lane = student.slot_decoder.engine.lane("student")
    engine_lane.index.clear()
    parent = list(range(200, 200 + 3 * BLOCK + 5))
    child = [*parent, 7, 8, 9]  # a node's prompt, then a child's: siblings and rollouts look like this
    first = student.generate([GenerationRequest(parent, max_tokens=4, temperature=0)])[0][0]
    before = engine_lane.prefill_tokens
    again = student.generate([GenerationRequest(child, max_tokens=5, temperature=0)])[0][0]
    assert engine_lane.prefill_tokens - before == 3  # the parent's KV was still in a free slot
    assert again.token_ids == hf_greedy(student, child, 5)

    engine_lane.index.clear()
    other = [*parent[: 2 * BLOCK], 1, 2, 3]
    before, passes = engine_lane.prefill_tokens, student.forward_passes
    both = student.generate(
        [
            GenerationRequest(parent, max_tokens=4, temperature=0),
            GenerationRequest(other, max_tokens=4, temperature=0),
        ]
    )
    assert (
        engine_lane.prefill_tokens - before == len(parent) + 3
    )  # other waited one pass for the shared blocks
    assert student.forward_passes - passes == 2 + 3
    assert both[0][0].token_ids == first.token_ids
    assert both[1][0].token_ids == hf_greedy(student, other, 4)


@pytest.mark.parametrize("shaped", ["exact", "overlapped"])
def test_a_prompt_extending_a_finished_answer_reuses_the_answers_kv(student, request, shaped):
    """A finished row's slot holds its prompt and the tokens it fed back (all but the last, which ended it): a
    prompt continuing the answer (the search's next step) prefills only what follows them."""
    if shaped != "exact":
        request.getfixturevalue(shaped)
    engine_lane = student.slot_decoder.engine.lane("student")
    engine_lane.index.clear()
    prompt = list(range(300, 300 + 2 * BLOCK + 3))
    answer = student.generate([GenerationRequest(prompt, max_tokens=8, temperature=0)])[0][0]
    assert len(answer.token_ids) == 8  # no end of sequence: every token but the last was fed back
    child = [*prompt, *answer.token_ids, 11]
    before = engine_lane.prefill_tokens
    again = student.generate([GenerationRequest(child, max_tokens=4, temperature=0)])[0][0]
    assert engine_lane.prefill_tokens - before == 2  # the answer's last token and the new one
    assert again.token_ids == hf_greedy(student, child, 4)


def test_overlapped_steps_give_what_steps_in_order_give(student, bucketed):
    """The same mix (greedy and seeded rows, log-probs, a stop string, more rows than slots, a late request) in
    order and overlapped: the same samples, token for token."""

    def run():
        calls = []

        def admit(free_rows):
            calls.append(free_rows)
            return (
                [GenerationRequest(PROMPTS[4], n=2, max_tokens=7, temperature=0.9, seed=4)]
                if len(calls) == 3
                else []
            )

        requests = [
            GenerationRequest(PROMPTS[1], n=3, max_tokens=9, temperature=1.0, seed=8, logprobs=2),
            GenerationRequest(PROMPTS[2], max_tokens=5, temperature=0, stop=["e", "a"]),
            GenerationRequest(PROMPTS[0], n=2, max_tokens=6, temperature=0.7, seed=1),
        ]
        # both runs from an empty prefix cache: a reused prefix attends over the cache, not the prompt's own
        # new keys, and its log-probs may then differ in the last bits
        for lane in student.slot_decoder.engine.lanes.values():
            lane.index.clear()
        results = student.generate(requests, admit=admit)
        return [[(s.token_ids, s.finish_reason, s.token_logprobs) for s in r] for r in results]

    in_order = run()
    student.slot_decoder.engine.config.overlap = True
    try:
        assert run() == in_order
    finally:
        student.slot_decoder.engine.config.overlap = False


def test_more_rows_than_slots_wait_and_are_all_served(student):
    prompt = list(range(60, 75))
    samples = student.generate([GenerationRequest(prompt, n=10, max_tokens=3, temperature=1.0, seed=2)])[0]
    assert len(samples) == 10 and all(s.num_generated == 3 for s in samples)
    alone = student.generate([GenerationRequest(prompt, n=10, max_tokens=3, temperature=1.0, seed=2)])[0]
    assert [s.token_ids for s in samples] == [s.token_ids for s in alone]


@pytest.mark.parametrize("shaped", ["exact", "overlapped"])
def test_stop_strings_end_rows_where_the_text_first_holds_them(student, request, shaped):
    if shaped != "exact":
        request.getfixturevalue(shaped)
    requests = [
        GenerationRequest(list(range(300 + i, 320 + i)), max_tokens=24, temperature=0) for i in range(3)
    ]
    full = [r[0] for r in student.generate(requests)]
    # a stop string the greedy text reaches: the last two characters of its 4th token's text
    texts = [student.tokenizer.decode(s.token_ids[:4], skip_special_tokens=True) for s in full]
    stops = [[t[-2:]] if len(t) >= 2 else ["\n"] for t in texts]
    cut = student.generate(
        [
            GenerationRequest(r.prompt_ids, max_tokens=24, temperature=0, stop=s)
            for r, s in zip(requests, stops, strict=False)
        ]
    )
    for sample, stop, whole in zip((c[0] for c in cut), stops, full, strict=False):
        decoded = student.tokenizer.decode(whole.token_ids, skip_special_tokens=True)
        if stop[0] in decoded:
            assert sample.finish_reason == "stop" and sample.stop_reason == stop[0]
            assert sample.text == decoded[: decoded.index(stop[0])]
        else:
            assert sample.finish_reason == "length"


def test_student_and_base_rows_decode_in_one_loop(tiny_random_model_dir, tmp_path):
    student = make_student(tiny_random_model_dir, tmp_path, max_batch_size=4)
    items = [
        GrpoItem(p, [11, 12, 13, 14], advantage=1.0 if i % 2 else -1.0) for i, p in enumerate(PROMPTS[:3])
    ]
    student.grpo_step(items, LossSettings(beta=0.0, learning_rate=0.5, max_grad_norm=1e9))
    requests = [GenerationRequest(p, max_tokens=6, temperature=0) for p in PROMPTS[:3]]
    trained = [s[0].token_ids for s in student.generate(requests)]
    base = [s[0].token_ids for s in student.generate(requests, use_adapter=False)]
    assert trained != base  # the adapter moved: mixing the lanes up would show
    passes = student.slot_decoder.engine.forward_passes
    mixed = student.slot_decoder.generate_lanes(
        [("student", r) for r in requests] + [("base", r) for r in requests]
    )
    assert [s[0].token_ids for s in mixed] == trained + base
    assert (
        student.slot_decoder.engine.forward_passes - passes == 2 * 6
    )  # per lane: one prefill, five decode steps
    assert trained == [hf_greedy(student, p, 6) for p in PROMPTS[:3]]


def test_a_gradient_step_drops_the_students_cached_prefixes(tiny_random_model_dir, tmp_path):
    student = make_student(tiny_random_model_dir, tmp_path, max_batch_size=4)
    prompt = list(range(400, 400 + 2 * BLOCK + 3))
    student.generate([GenerationRequest(prompt, max_tokens=2, temperature=0)])
    student.generate([GenerationRequest(prompt, max_tokens=2, temperature=0)], use_adapter=False)
    student.grpo_step([GrpoItem(prompt, [1, 2, 3], advantage=1.0)], LossSettings(beta=0.0, learning_rate=0.5))
    lanes = student.slot_decoder.engine.lanes
    before = {name: lanes[name].prefill_tokens for name in ("student", "base")}
    after_step = student.generate([GenerationRequest(prompt, max_tokens=4, temperature=0)])[0][0]
    student.generate([GenerationRequest(prompt, max_tokens=2, temperature=0)], use_adapter=False)
    # the student's prompt is computed again with the new weights; base did not change: all but its last token reused
    assert lanes["student"].prefill_tokens - before["student"] == len(prompt)
    assert lanes["base"].prefill_tokens - before["base"] == 1
    assert after_step.token_ids == hf_greedy(student, prompt, 4)


# ----- the parts alone -----
def test_prefix_index_finds_the_longest_verified_prefix_within_the_limit():
    index = PrefixIndex(slots=3)
    a = list(range(50))
    index.assign(0, a[:40])
    index.assign(1, a[:20] + [999] * 20)
    assert index.longest(a, block_hashes(a), limit=49) == (0, 40)
    assert index.longest(a, block_hashes(a), limit=35) == (0, 35)
    b = [*a[:20], 999, 999, 5]
    assert index.longest(b, block_hashes(b), limit=len(b) - 1) == (1, 22)
    assert index.longest([1] * 40, block_hashes([1] * 40), limit=39) == (None, 0)
    index.extend(0, a[40:44])
    assert index.longest(a, block_hashes(a), limit=49) == (0, 44)  # verified past the last whole block
    index.extend(0, a[44:48])  # a 3rd whole block completes: found by hash now
    index.forget(1)
    assert index.longest(a, block_hashes(a), limit=49) == (0, 48)
    assert index.longest(b, block_hashes(b), limit=len(b) - 1) == (0, 20)


def test_sampler_keeps_to_the_nucleus_and_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 4000
    logits = torch.log(probs).repeat(rows, 1)
    seeds, counters = torch.arange(rows) * 7919, torch.zeros(rows, dtype=torch.long)
    ones = torch.ones(rows)
    tokens, picked, _, _ = choose(logits, ones, ones, seeds, counters, sampled=True, nucleus=False, top_k=0)
    freq = torch.bincount(tokens, minlength=4).float() / rows
    assert freq.tolist() == pytest.approx(probs.tolist(), abs=0.03)
    assert picked.tolist() == pytest.approx(torch.log(probs)[tokens].tolist(), abs=1e-6)
    nucleus, _, _, _ = choose(logits, ones, ones * 0.7, seeds, counters, sampled=True, nucleus=True, top_k=2)
    freq = torch.bincount(nucleus, minlength=4).float() / rows
    assert freq[2:].sum() == 0 and freq[0] == pytest.approx(0.5 / 0.8, abs=0.03)
    greedy_rows = torch.zeros(rows)
    greedy, _, _top_values, top_ids = choose(
        logits, greedy_rows, ones, seeds, counters, sampled=True, nucleus=False, top_k=2
    )
    assert bool((greedy == 0).all()) and top_ids[0].tolist() == [0, 1]
    again, _, _, _ = choose(logits, ones, ones, seeds, counters, sampled=True, nucleus=False, top_k=0)
    assert torch.equal(again, tokens)  # a pure function of seed and counter
    bare, no_logprobs, _, _ = choose(
        logits, ones, ones, seeds, counters, sampled=True, nucleus=False, top_k=0, logprobs=False
    )
    assert torch.equal(bare, tokens) and no_logprobs is None  # the same draw without the log-softmax


def test_row_uniform_is_strictly_inside_zero_one_and_varies_with_seed_and_counter():
    seeds = torch.tensor([0, 1, 2**62 - 1, 123456789] * 4)
    counters = torch.tensor([0] * 4 + [1] * 4 + [2**31] * 4 + [7] * 4)
    u = row_uniform(seeds, counters)
    assert bool(((u > 0) & (u < 1)).all()) and len(set(u.tolist())) == 16


async def test_the_services_student_and_base_requests_share_one_decode_batch(tiny_random_model_dir, tmp_path):
    """Through the service's engine (TrainerEngine over LocalCore, its batcher): concurrent "student" and "base" completions are
    one batch, one decode loop, and each answer equals what the request gets alone."""
    import asyncio

    from services.protocol import CompletionRequest
    from services.trainer.core import LocalCore
    from services.trainer.engine import TrainerEngine
    from services.trainer.loading import load_student
    from services.trainer.settings import TrainerSettings

    settings = TrainerSettings(
        model_source=str(tiny_random_model_dir),
        checkpoint_dir=tmp_path,
        lora_r=4,
        lora_alpha=8,
        batch_wait_ms=500,  # every request of the gather below reaches the first batch
    )
    student = load_student(settings)
    items = [
        GrpoItem(p, [11, 12, 13, 14], advantage=1.0 if i % 2 else -1.0) for i, p in enumerate(PROMPTS[:3])
    ]
    student.grpo_step(items, LossSettings(beta=0.0, learning_rate=0.5, max_grad_norm=1e9))
    core = LocalCore(student, settings)
    engine = TrainerEngine(core, settings)
    try:
        bodies = [
            CompletionRequest(model=model, prompt=f"Fact number {i}:", max_tokens=5, temperature=0)
            for i in range(3)
            for model in ("student", "base")
        ]
        together = await asyncio.gather(*(engine.complete(body) for body in bodies))
        counters = core.batcher.counters
        assert counters.forward_batches == 1 and counters.merged_requests == len(bodies)
        alone = [await engine.complete(body) for body in bodies]
        assert core.batcher.counters.forward_batches == 1 + len(bodies)
        texts = [r.choices[0].text for r in together]
        assert texts == [r.choices[0].text for r in alone]
        assert texts[0::2] != texts[1::2]  # the student's texts are not base's: the lanes were not mixed up
    finally:
        engine.close()


def test_models_whose_attention_the_slots_would_get_wrong_are_refused():
    """Sliding-window layers attend to fewer positions than a slot holds: such a model keeps the DecodeLoop."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from services.trainer.decode import DecodeEngine

    shape = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    windowed = Qwen2ForCausalLM(
        Qwen2Config(**shape, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    )
    assert "sliding" in (DecodeEngine.unsupported(windowed) or "")
    assert DecodeEngine.unsupported(Qwen2ForCausalLM(Qwen2Config(**shape))) is None
    assert DecodeEngine.unsupported(LlamaForCausalLM(LlamaConfig(**shape))) is None


def test_the_cache_grows_in_slots_and_positions_as_rows_need_them(tiny_random_model_dir, tmp_path):
    """A lane starts with one slot of 8 positions: joining rows make it double both (copying what it holds, the
    graphs and prefill buffers dropped), and every row still gets transformers' greedy text."""
    student = make_student(tiny_random_model_dir, tmp_path, max_batch_size=4)
    config = student.slot_decoder.engine.config
    config.initial_slots, config.initial_capacity = 1, 8
    config.row_buckets, config.window_step, config.prefill_buckets = (2, 4), 8, True
    first = GenerationRequest(PROMPTS[2], max_tokens=9, temperature=0)

    calls = []

    def admit(free_rows):  # once, at the first step: two rows join the first one
        calls.append(free_rows)
        if len(calls) > 1:
            return []
        return [GenerationRequest(p, max_tokens=7, temperature=0) for p in (PROMPTS[1], PROMPTS[4])]

    results = student.generate([first], admit=admit)
    cache = student.slot_decoder.engine.lanes["student"].cache
    assert (cache.allocated, cache.capacity) == (4, 64)
    expected = [hf_greedy(student, r, n) for r, n in ((PROMPTS[2], 9), (PROMPTS[1], 7), (PROMPTS[4], 7))]
    assert [r[0].token_ids for r in results] == expected


def test_sampler_takes_temperatures_and_top_p_near_zero_as_greedy():
    """temperature 5e-324 divided the logits into +-inf and the softmax into NaN; top_p 5e-324 then kept no token
    (gather at index -1: a 500 the schema fuzz found). Both now pick the most likely token."""
    logits = torch.tensor([[2.0, -1.0, 5.0, 0.5], [-3.0, 4.0, 1.0, -2.0]])
    tiny = torch.full((2,), 5e-324, dtype=torch.float64).float().clamp(min=torch.finfo(torch.float32).tiny)
    seeds, counters = torch.tensor([1, 2]), torch.tensor([0, 0])
    zero = torch.zeros(2)  # 5e-324 as the float32 the lane holds it in
    cases = (
        (tiny, torch.ones(2), False),
        (tiny, tiny, True),
        (torch.ones(2), zero, True),
        (tiny, zero, True),
    )
    for temperature, top_p, nucleus in cases:
        tokens, picked, _, _ = choose(
            logits, temperature, top_p, seeds, counters, sampled=True, nucleus=nucleus, top_k=0
        )
        assert tokens.tolist() == [2, 1] and torch.isfinite(picked).all()


def test_a_continuous_run_keeps_nothing_of_the_requests_it_answered(student):
    """A decode loop under steady traffic never ends: once a request is reported through on_done, neither the
    run nor its rows hold it (or its samples) any more, so a long run does not grow."""
    gone: list[weakref.ref] = []
    seen_alive: list[int] = []

    def admit(free_rows):
        if len(gone) == 40 or free_rows < 1:
            return []
        gc.collect()
        seen_alive.append(sum(ref() is not None for ref in gone))
        request = GenerationRequest(PROMPTS[len(gone) % 3], max_tokens=2, temperature=0)
        gone.append(weakref.ref(request))
        return [request]

    student.generate(
        [GenerationRequest(PROMPTS[0], max_tokens=200, temperature=0)],  # keeps the run going
        admit=admit,
        on_done=lambda index, samples: None,
    )
    assert len(gone) == 40
    # Each admitted request lives for its 2 tokens, then is dropped: never more than the other 3 slots' rows
    # alive at once, and none once the run is over.
    gc.collect()
    assert max(seen_alive) <= 3 and not any(ref() is not None for ref in gone)
