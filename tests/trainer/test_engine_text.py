"""The request handlers' text paths, which skip transformers' Python where it costs (issue #20): prompts are encoded
by the Rust tokenizer itself, and a token's text is decoded once per id. Both must give exactly what the transformers
calls they replace give, on the real SmolLM2 tokenizer (byte-level BPE, special tokens, multi-byte characters)."""

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
    from services.trainer.engine import TrainerEngine
    from services.trainer.settings import TrainerSettings

    engine = TrainerEngine(student, TrainerSettings(checkpoint_dir=tmp_path_factory.mktemp("ckpt")))
    yield engine
    engine.close()


@pytest.mark.parametrize("special", [False, True])
def test_encode_gives_the_ids_of_transformers_call(engine, special):
    reference = engine.tokenizer  # the handlers' copy, asked the way the engine asked before
    for text in TEXTS:
        assert (
            engine.encode(text, special=special) == reference(text, add_special_tokens=special).input_ids
        ), text


def test_encode_follows_split_special_tokens(engine):
    """With split_special_tokens a special token's text is plain text (several ids), as transformers encodes it."""
    text = "<|im_start|>user"
    whole = engine.encode(text)
    engine.tokenizer.split_special_tokens = True
    try:
        split = engine.encode(text)
        assert split == engine.tokenizer(text, add_special_tokens=False).input_ids
        assert len(split) > len(whole)
    finally:
        engine.tokenizer.split_special_tokens = False
    assert engine.encode(text) == whole


def test_pieces_are_each_tokens_decode(engine):
    tokenizer = engine.tokenizer
    ids = sorted({i for text in TEXTS for i in tokenizer(text, add_special_tokens=False).input_ids})
    ids += [0, 1, 2, tokenizer.vocab_size - 1]
    for _ in range(2):  # the second round comes from the cache
        assert [engine.shaper.piece(i) for i in ids] == [tokenizer.decode([i]) for i in ids]
