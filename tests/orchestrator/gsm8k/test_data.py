from pathlib import Path

import pytest

from orchestrator.gsm8k.data import GSM8K_INSTRUCTION, Problem, load_gsm8k, question_messages

GSM8K = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "gsm8k"
pytestmark = pytest.mark.skipif(not GSM8K.is_dir(), reason="../shared/data/gsm8k not beside the repo")


def test_load_local_test_split():
    problems = load_gsm8k("test", str(GSM8K))
    assert len(problems) == 1319
    first = problems[0]
    assert first.id == "test-0" and first.answer == "18"
    assert first.prompt.startswith("Janet")
    assert first.info["split"] == "test" and first.info["index"] == 0
    assert first.info["solution"].rstrip().endswith("#### 18")


def test_limit_and_offset():
    problems = load_gsm8k("train", str(GSM8K), limit=3, offset=10)
    assert [p.id for p in problems] == ["train-10", "train-11", "train-12"]
    assert load_gsm8k("test", str(GSM8K), limit=0) == []


def test_every_gold_answer_is_a_canonical_number():
    for p in load_gsm8k("test", str(GSM8K)):
        assert p.answer.lstrip("-").replace(".", "", 1).isdigit(), p


def test_gsm8k_path_environment(monkeypatch):
    monkeypatch.setenv("GSM8K_PATH", str(GSM8K))
    assert load_gsm8k("test", limit=1)[0].id == "test-0"


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError):
        load_gsm8k("dev", str(GSM8K))
    with pytest.raises(FileNotFoundError):
        load_gsm8k("test", str(tmp_path))
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(ValueError, match="no '#### N'"):
        load_gsm8k("test", str(tmp_path))


def test_hub_without_datasets_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.delenv("GSM8K_PATH", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(RuntimeError, match="GSM8K_PATH"):
        load_gsm8k("test")


def test_question_messages():
    p = Problem(id="x-0", prompt="How many?  ", answer="3")
    assert question_messages(p) == [{"role": "user", "content": f"How many?\n{GSM8K_INSTRUCTION}"}]
    assert question_messages("How many?") == question_messages(p)
