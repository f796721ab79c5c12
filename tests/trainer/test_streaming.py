"""What a stream may show of a sample while its tokens arrive (streaming.SampleText), with the real tokenizer of the
tiny model: never text that a stop string will cut, never half a character, and the final text always continues
what was shown."""

from __future__ import annotations

import pytest

from services.trainer.items import Sample
from services.trainer.streaming import SampleText


@pytest.fixture(scope="module")
def tokenizer(trainer_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(trainer_model_dir)


def final(tokenizer, ids: list[int], stops: list[str]) -> Sample:
    """The sample the decoder ends with: its text cut at the first stop string."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [text.find(stop) for stop in stops if stop in text]
    cut = min(cuts) if cuts else None
    return Sample(
        token_ids=ids,
        text=text if cut is None else text[:cut],
        finish_reason="stop" if cut is not None else "length",
        num_generated=len(ids),
        token_logprobs=[-0.5] * len(ids),
    )


@pytest.mark.parametrize(
    "text, stops",
    [
        ("Step 1: 48 / 2 = 24\n\nStep 2: 24 + 48 = 72", ["\n\n"]),  # a stop of two newline tokens
        ("The answer is 42. #### 42", ["####", "42."]),  # stops that overlap the text's tail
        ("Café 🎉 naïve 日本語 ok", []),  # characters made of several byte tokens
        ("no stop here at all", ["zzz"]),
    ],
)
def test_shown_text_is_always_a_prefix_of_the_final_text(tokenizer, text, stops):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    sample = final(tokenizer, ids, stops)
    stream = SampleText(tokenizer, stops)
    shown, tokens = "", []
    for token in ids:
        delta, passed = stream.add(token, -0.5, None)
        shown += delta
        tokens += passed
        assert sample.text.startswith(shown), (shown, sample.text)
        assert "\ufffd" not in shown
        assert not any(stop in shown for stop in stops)
    rest, passed = stream.finish(sample)
    tokens += passed
    assert shown + rest == sample.text
    assert [t for t, _, _ in tokens] == sample.token_ids  # every token handed out once, in order
    assert len(shown) > 0  # text flowed before the end
