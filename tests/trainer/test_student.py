"""The student engine without HTTP, on a tiny randomly initialised model (fast on 2 cores)."""

import pytest

torch = pytest.importorskip("torch")

from services.trainer.settings import TrainerSettings
from services.trainer.student import (
    GenerationRequest,
    GrpoItem,
    LossConfig,
    ScoreItem,
    load_student,
)


def make_student(model_dir, tmp_path, **overrides):
    settings = TrainerSettings(
        model_source=str(model_dir),
        checkpoint_dir=tmp_path / "ckpt",
        lora_r=4,
        lora_alpha=8,
        learning_rate=1e-2,
        **overrides,
    )
    return load_student(settings)


@pytest.fixture(scope="module")
def student(tiny_random_model_dir, tmp_path_factory):
    return make_student(tiny_random_model_dir, tmp_path_factory.mktemp("student"))


def ids(student, text):
    return student.tokenizer(text, add_special_tokens=False).input_ids


def test_lora_settings_reach_the_adapter(student):
    config = student.model.peft_config["default"]
    assert (config.r, config.lora_alpha) == (4, 8)
    assert set(config.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert student.trainable and all(
        "lora_" in n for n, p in student.model.named_parameters() if p.requires_grad
    )


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


def test_logprobs_in_a_padded_batch_equal_a_plain_forward(student):
    item = ScoreItem(ids(student, "Natalia sold 48 clips"), ids(student, " in April."))
    batch = student.logprobs([ScoreItem(ids(student, "x"), ids(student, " y z")), item])
    with torch.no_grad():
        logits = student.model(torch.tensor([item.context_ids + item.completion_ids])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    start = len(item.context_ids) - 1
    expected = [logp[start + i, t].item() for i, t in enumerate(item.completion_ids)]
    assert batch[1] == pytest.approx(expected, abs=1e-5)


def test_scoring_gives_every_query_position_a_key_to_attend_to(student):
    """A left pad as a query may attend to nothing; on CUDA in bf16 that row is NaN and its backward poisons
    the real keys' gradients (a GRPO step of mixed lengths failed with a non-finite gradient on the H100). So
    scoring batches are right-padded: position 0 of every row is a real token."""
    seen = []
    hook = student.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"].clone()), with_kwargs=True
    )
    try:
        items = [ScoreItem([5], [6]), ScoreItem([5, 6, 7, 8, 9, 10], [11, 12, 13, 14])]
        student.logprobs(items)
        student.grpo_step([GrpoItem(it.context_ids, it.completion_ids, advantage=1.0) for it in items],
                          LossConfig(beta=0.0, learning_rate=1e-9))
    finally:
        hook.remove()
    assert seen and all(bool(mask[:, 0].all()) for mask in seen)


def test_micro_batches_accumulate_to_the_full_batch_gradient(tiny_random_model_dir, tmp_path):
    items = [
        GrpoItem(ids_, comp, advantage=adv)
        for ids_, comp, adv in [
            ([5, 6, 7], [8, 9], 1.0),
            ([5, 6], [10, 11, 12], -0.5),
            ([7], [13], 0.25),
            ([9, 9, 9, 9], [14, 15], -1.0),
        ]
    ]
    results = []
    for micro in (1, 4):
        student = make_student(tiny_random_model_dir, tmp_path)  # the same seed: the same start
        results.append(
            student.grpo_step(items, LossConfig(micro_batch_size=micro, beta=0.1, max_grad_norm=1e9))
        )
    full, micro = results[1], results[0]
    assert micro.loss == pytest.approx(full.loss, abs=1e-6)
    assert micro.grad_norm == pytest.approx(full.grad_norm, rel=1e-4)
    assert micro.tokens == full.tokens == 8


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "legacy"])
def test_each_loss_type_moves_the_advantaged_sequence_up(tiny_random_model_dir, tmp_path, loss_type):
    student = make_student(tiny_random_model_dir, tmp_path)
    item = GrpoItem([5, 6, 7], [8, 9, 10], advantage=1.0)
    before = sum(student.logprobs([ScoreItem(item.context_ids, item.completion_ids)])[0])
    result = student.grpo_step([item], LossConfig(type=loss_type, learning_rate=1e-2))
    after = sum(student.logprobs([ScoreItem(item.context_ids, item.completion_ids)])[0])
    assert after > before and result.adapter_version == 1 and result.step == 1
    base = sum(student.logprobs([ScoreItem(item.context_ids, item.completion_ids)], use_adapter=False)[0])
    assert base == pytest.approx(before, abs=1e-5)


def test_invalid_items_change_nothing(student):
    version = student.adapter_version
    with pytest.raises(ValueError, match=r"items\[0\].old_logprobs"):
        student.grpo_step([GrpoItem([1, 2], [3, 4], 1.0, old_logprobs=[-1.0])], LossConfig())
    with pytest.raises(ValueError, match=r"items\[0\].advantage"):
        student.grpo_step([GrpoItem([1, 2], [3, 4], float("nan"))], LossConfig())
    assert student.adapter_version == version


def test_adapter_state_round_trip_refuses_foreign_tensors(student):
    state = student.adapter_state()
    with pytest.raises(ValueError, match="do not match"):
        student.load_adapter_state({"foreign": torch.zeros(1)})
    key = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        student.load_adapter_state({**state, key: torch.zeros(1)})
    student.load_adapter_state(state)


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

    results = student.generate(
        [GenerationRequest(long_prompt, max_tokens=8, temperature=0)],
        admit=admit,
        on_done=lambda index, samples: done.append(index),
    )
    assert len(results) == 2 and results[1][0].token_ids == alone.token_ids
    assert sorted(done) == [0, 1] and calls[0] == student.max_batch_rows - 1


@pytest.mark.parametrize("stop", ["\n", "####", "→ so"])
def test_stop_position_after_every_token_matches_the_whole_text(student, stop):
    """Checked token by token, as the decode loop does: the first step whose text holds the stop finds it at the
    same place as a search of the whole text, however long the text before it (the check reads a short tail)."""
    text = "She has 3 apples and buys 4 more, é 🍎 twice, " * 6 + f"then 7{stop} and after{stop} more"
    tokens = ids(student, text)
    first_hit = None
    for length in range(1, len(tokens) + 1):
        found = student._stop_position(tokens[:length], [stop, "never here"])
        if found is not None:
            first_hit = (length, found)
            break
    decoded = student.tokenizer.decode(tokens[: first_hit[0]], skip_special_tokens=True)
    assert first_hit[1] == decoded.index(stop) == student.tokenizer.decode(tokens).index(stop)
    assert stop not in student.tokenizer.decode(tokens[: first_hit[0] - 1], skip_special_tokens=True)
