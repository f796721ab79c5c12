"""The response shaper decodes a token's text once per id (issue #20): each must be exactly what decoding the token
alone gives, on the real SmolLM2 tokenizer (byte-level BPE, special tokens, multi-byte characters)."""

import pytest

TEXTS = [
    "Natalia sold clips to 48 of her friends in April.",
    "  leading spaces, trailing spaces  ",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "#### 42\n\nThe answer is 42.",
    "Ünïcödé: naïve café — 東京 🚀 ½",
    "tabs\tand\r\nnewlines\n\n\n",
    "<|endoftext|>inside<|endoftext|>",
    "a",
]


@pytest.fixture(scope="module")
def engine(student, tmp_path_factory):
    from services.trainer.core import LocalCore
    from services.trainer.engine import TrainerEngine
    from services.trainer.settings import TrainerSettings

    settings = TrainerSettings(checkpoint_dir=tmp_path_factory.mktemp("ckpt"))
    engine = TrainerEngine(LocalCore(student, settings), settings)
    yield engine
    engine.close()


def test_pieces_are_each_tokens_decode(engine):
    tokenizer = engine.tokenizer
    ids = sorted({i for text in TEXTS for i in tokenizer(text, add_special_tokens=False).input_ids})
    ids += [0, 1, 2, tokenizer.vocab_size - 1]
    expected = [tokenizer.decode([i]) for i in ids]
    assert [engine.shaper.piece(i) for i in ids] == expected
    decode, calls = tokenizer.decode, []
    tokenizer.decode = lambda *args, **kwargs: calls.append(args) or decode(*args, **kwargs)
    try:
        assert [engine.shaper.piece(i) for i in ids] == expected
    finally:
        del tokenizer.decode  # the instance attribute; the class's method again
    assert calls == []  # once per id: the second round came from the cache


@pytest.mark.parametrize("special", [False, True])
def test_encoding_equals_the_tokenizers_own(engine, special):
    """The request side encodes with the fast tokenizer's Rust encoder directly: the same ids as transformers'
    __call__, with and without special tokens, on every kind of text above."""
    assert engine._backend is not None  # SmolLM2's tokenizer is a fast one: the direct path is what runs
    tokenizer = engine.tokenizer
    for text in TEXTS:
        assert engine.encode(text, special=special) == tokenizer(text, add_special_tokens=special).input_ids
