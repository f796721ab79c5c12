"""GSM8K loading: the shipped copy (what a fresh clone, a wheel and the image use), the caller's folder, the hub
through `datasets` on a folder laid out as the hub's repository, and the hub probe against real servers on
127.0.0.1 that answer, refuse or hang."""

import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import pytest

from orchestrator.gsm8k.data import (
    GSM8K_INSTRUCTION,
    Problem,
    hub_rows,
    load_gsm8k,
    probe_hub,
    question_messages,
    read_split,
    shipped_rows,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
# The digests of the uncompressed JSONL files, as the dataset's README lists them.
SHIPPED = {
    "train": (7473, "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
    "test": (1319, "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
}


@pytest.fixture
def no_hub(monkeypatch):
    """Neither a folder nor the hub: what a fresh clone on an offline machine has."""
    monkeypatch.delenv("GSM8K_PATH", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_jsonl(folder: Path, split: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_shipped_copy_is_gsm8k_byte_for_byte(split):
    dataset = resources.files("orchestrator.gsm8k").joinpath("dataset")
    raw = gzip.decompress(dataset.joinpath(f"{split}.jsonl.gz").read_bytes())
    rows, digest = SHIPPED[split]
    assert hashlib.sha256(raw).hexdigest() == digest
    assert len(shipped_rows(split)) == rows
    readme = dataset.joinpath("README.md").read_text()
    assert digest in readme and f"{rows:,}" in readme
    assert dataset.joinpath("LICENSE").read_text().startswith("MIT License")


def test_default_without_path_or_hub_is_the_shipped_copy(no_hub, caplog):
    caplog.set_level("INFO", logger="orchestrator.gsm8k.data")
    data = read_split("test")
    assert data.source.kind == "shipped"
    assert data.source.reason == "hub not used: HF_HUB_OFFLINE is set"
    assert Path(data.source.location, "test.jsonl.gz").is_file()
    assert "GSM8K test: 1319 rows from shipped" in caplog.text
    problems = load_gsm8k("test")
    assert len(problems) == 1319
    first = problems[0]
    assert first.id == "test-0" and first.answer == "18"
    assert first.prompt.startswith("Janet")
    assert first.info["split"] == "test" and first.info["index"] == 0
    assert first.info["solution"].rstrip().endswith("#### 18")


def test_limit_and_offset(no_hub):
    problems = load_gsm8k("train", limit=3, offset=10)
    assert [p.id for p in problems] == ["train-10", "train-11", "train-12"]
    assert load_gsm8k("test", limit=0) == []
    assert [p.id for p in load_gsm8k("test", offset=1317)] == ["test-1317", "test-1318"]


def test_every_gold_answer_is_a_canonical_number(no_hub):
    for split in ("train", "test"):
        for p in load_gsm8k(split):
            assert p.answer.lstrip("-").replace(".", "", 1).isdigit(), p


def test_a_folder_wins_over_every_other_source(no_hub, monkeypatch, tmp_path):
    write_jsonl(tmp_path / "env", "test", [{"question": "From the environment?", "answer": "so\n#### 1,000"}])
    monkeypatch.setenv("GSM8K_PATH", str(tmp_path / "env"))
    data = read_split("test")
    assert (data.source.kind, data.source.location, data.source.reason) == (
        "path",
        str(tmp_path / "env"),
        "GSM8K_PATH",
    )
    assert data.problems() == [Problem(id="test-0", prompt="From the environment?", answer="1000")]

    gz = tmp_path / "gz"
    gz.mkdir()
    (gz / "test.jsonl.gz").write_bytes(gzip.compress(b'{"question": "Gzipped?", "answer": "#### 7"}\n'))
    (problem,) = load_gsm8k("test", path=gz)  # the argument wins over GSM8K_PATH; .jsonl.gz is read too
    assert (problem.prompt, problem.answer) == ("Gzipped?", "7")


def test_bad_input_is_refused_with_what_is_wrong(no_hub, tmp_path):
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_gsm8k("dev")
    with pytest.raises(ValueError, match=">= 0"):
        load_gsm8k("test", offset=-1)
    with pytest.raises(FileNotFoundError, match=r"test\.jsonl"):
        load_gsm8k("test", str(tmp_path))
    write_jsonl(tmp_path, "test", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(ValueError, match="no '#### N'"):
        load_gsm8k("test", str(tmp_path))


def test_hub_loading_through_datasets_on_a_folder_laid_out_as_the_hub(tmp_path):
    """openai/gsm8k's repository: a README whose `configs` name the parquet files of config "main"."""
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet", reason="datasets brings pyarrow")
    import pyarrow

    repo = tmp_path / "openai-gsm8k"
    (repo / "main").mkdir(parents=True)
    (repo / "socratic").mkdir()
    expected = {split: list(shipped_rows(split)[:5]) for split in ("train", "test")}
    for split, rows in expected.items():
        pyarrow_parquet.write_table(
            pyarrow.Table.from_pylist(rows), repo / "main" / f"{split}-00000-of-00001.parquet"
        )
        socratic = [{**r, "question": "socratic " + r["question"]} for r in rows]
        pyarrow_parquet.write_table(
            pyarrow.Table.from_pylist(socratic), repo / "socratic" / f"{split}-00000-of-00001.parquet"
        )
    configs = "".join(
        f"- config_name: {name}\n  data_files:\n"
        f"  - split: train\n    path: {name}/train-*\n  - split: test\n    path: {name}/test-*\n"
        for name in ("main", "socratic")
    )
    (repo / "README.md").write_text(f"---\nlicense: mit\nconfigs:\n{configs}---\n# gsm8k\n")

    cache = str(tmp_path / "cache")
    for split, rows in expected.items():
        assert list(hub_rows(split, repo=str(repo), cache_dir=cache)) == rows
    assert hub_rows("test", repo=str(repo), config="socratic", cache_dir=cache)[0]["question"].startswith(
        "socratic"
    )


# ----- the hub probe, against real servers on 127.0.0.1 ---------------------------------------------------------
class FakeHub(ThreadingHTTPServer):
    """Answers the dataset-info call for openai/gsm8k (that is all the probe asks) and 404 for anything else."""

    def __init__(self):
        self.paths: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub.paths.append(self.path)
                found = self.path.split("?")[0] == "/api/datasets/openai/gsm8k"
                body = json.dumps({"id": "openai/gsm8k"} if found else {"error": "not found"}).encode()
                self.send_response(200 if found else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    yield hub
    hub.shutdown()
    hub.server_close()


@pytest.fixture
def silent_server():
    """Accepts connections and never answers: a hub behind a black hole."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def hub_online(monkeypatch):
    """huggingface_hub read HF_HUB_OFFLINE when first imported, perhaps under the session's offline setting."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_probe_says_yes_to_a_hub_that_answers(fake_hub, hub_online):
    assert probe_hub(endpoint=fake_hub.url, timeout_s=5.0) is None
    assert fake_hub.paths == ["/api/datasets/openai/gsm8k"]
    assert probe_hub(endpoint=fake_hub.url, timeout_s=5.0) is None  # remembered: asked once per process
    assert len(fake_hub.paths) == 1
    missing = probe_hub("nobody/nothing", endpoint=fake_hub.url, timeout_s=5.0)  # a 404
    assert missing is not None and missing.endswith("Error from the hub")


def test_probe_gives_up_on_a_silent_hub_at_its_deadline(silent_server, hub_online):
    started = time.monotonic()
    reason = probe_hub(endpoint=silent_server, timeout_s=0.5)
    assert time.monotonic() - started < 3.0
    assert reason is not None and "from the hub" in reason


def test_probe_of_a_closed_port_fails_at_once(hub_online):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    started = time.monotonic()
    refused = probe_hub(endpoint=url, timeout_s=5.0)
    assert refused is not None and refused.endswith("Error from the hub")
    assert time.monotonic() - started < 3.0


def source_in_fresh_process(endpoint: str, **env: str) -> tuple[dict, float]:
    """read_split's choice in a new process (huggingface_hub and datasets read HF_* when first imported)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GSM8K_"))}
    environ.update(HF_ENDPOINT=endpoint, HF_HOME=env.pop("HF_HOME"), PYTHONPATH=str(REPO_ROOT), **env)
    code = (
        "import json; from orchestrator.gsm8k.data import read_split; "
        "d = read_split('test'); print(json.dumps({**d.source.to_record(), 'rows': len(d.rows)}))"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.splitlines()[-1]), time.monotonic() - started


def test_a_hub_that_answers_but_cannot_serve_the_files_falls_back_to_the_shipped_copy(fake_hub, tmp_path):
    record, _ = source_in_fresh_process(fake_hub.url, HF_HOME=str(tmp_path))
    probe = fake_hub.paths.index("/api/datasets/openai/gsm8k")
    assert len(fake_hub.paths) > probe + 1, fake_hub.paths  # then datasets asked for the files
    assert record["source"] == "shipped" and record["rows"] == 1319
    assert record["reason"].startswith("hub not used: loading from the hub failed (")


def test_a_silent_hub_costs_the_probe_deadline_only(silent_server, tmp_path):
    record, seconds = source_in_fresh_process(silent_server, HF_HOME=str(tmp_path))
    assert record["source"] == "shipped" and record["rows"] == 1319
    assert "from the hub" in record["reason"]
    assert seconds < 30  # the 3 s probe plus a cold interpreter on a busy machine; a hang would reach 120


def test_offline_asks_no_hub_at_all(fake_hub, tmp_path):
    record, _ = source_in_fresh_process(fake_hub.url, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    assert fake_hub.paths == []
    assert record == {
        "source": "shipped",
        "location": record["location"],
        "reason": "hub not used: HF_HUB_OFFLINE is set",
        "rows": 1319,
    }


def test_question_messages():
    p = Problem(id="x-0", prompt="How many?  ", answer="3")
    assert question_messages(p) == [{"role": "user", "content": f"How many?\n{GSM8K_INSTRUCTION}"}]
    assert question_messages("How many?") == question_messages(p)
