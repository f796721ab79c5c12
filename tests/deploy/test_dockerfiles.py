"""The two images' Dockerfiles and the build context (no Docker engine here, so their structure is what is
checked): multi-stage, dependencies installed before the source is copied (a code change reuses the dependency
layer), a non-root user, a HEALTHCHECK on /health, pinned bases, no secrets baked in, torch-free orchestrator."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "trainer": ROOT / "docker" / "trainer.Dockerfile",
    "orchestrator": ROOT / "docker" / "orchestrator.Dockerfile",
}
SECRET_WORDS = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)", re.I)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_multi_stage_non_root_with_healthcheck(image):
    steps = instructions(DOCKERFILES[image])
    stages = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    final = steps[stages[-1] :]
    assert any(op == "COPY" and args.startswith("--from=build") for op, args in final)
    users = [args for op, args in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the runtime stage must not run as root"
    (health,) = [args for op, args in final if op == "HEALTHCHECK"]
    port = "8001" if image == "trainer" else "8000"
    assert "/health" in health and port in health
    assert any(op == "CMD" for op, _ in final)


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dependencies_install_before_the_source_is_copied(image):
    steps = instructions(DOCKERFILES[image])
    build = steps[: [i for i, (op, _) in enumerate(steps) if op == "FROM"][-1]]
    copies = [i for i, (op, args) in enumerate(build) if op == "COPY"]
    manifest = next(i for i in copies if build[i][1].split()[0] == "pyproject.toml")
    deps = next(i for i, (op, args) in enumerate(build) if op == "RUN" and "-r requirements.txt" in args)
    source = next(i for i in copies if build[i][1].split()[0] in ("orchestrator", "services"))
    assert manifest < deps < source
    assert "--mount=type=cache" in build[deps][1], "a BuildKit cache keeps pip's downloads across builds"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_no_secrets_and_pinned_bases(image):
    steps = instructions(DOCKERFILES[image])
    for op, args in steps:
        if op in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]
            assert not [n for n in names if SECRET_WORDS.search(n)], f"{op} {args}"
    bases = [args.split()[0] for op, args in steps if op == "ARG" and args.split("=")[0].endswith("_IMAGE")]
    for base in bases:
        image_ref = base.split("=", 1)[1]
        assert ":" in image_ref and not image_ref.endswith(":latest"), base


def test_orchestrator_image_has_no_torch():
    steps = instructions(DOCKERFILES["orchestrator"])
    installs = [seg for op, args in steps if op == "RUN" for seg in args.split("&&") if "pip install" in seg]
    assert installs and not [
        seg for seg in installs if "torch" in seg or ".[" in seg
    ]  # base dependencies only
    text = DOCKERFILES["orchestrator"].read_text()
    assert "optional-dependencies" not in text
    # The build fails if importing the CLI pulls torch in.
    assert "assert 'torch' not in sys.modules" in text


def test_trainer_image_is_cuda_with_the_gpu_extra():
    text = DOCKERFILES["trainer"].read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:[0-9.]+-", text)
    assert "['optional-dependencies']['gpu']" in text and "download.pytorch.org/whl/cu" in text


def test_dockerignore_keeps_secrets_and_local_state_out():
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    for needed in ("**/.env", ".git", ".venv", "runs"):
        assert needed in patterns, needed
    # What the images do copy must not be ignored.
    for kept in ("pyproject.toml", "README.md", "orchestrator", "services"):
        assert kept not in patterns, kept


def copied_sources(image: str) -> list[str]:
    """The repository paths the image's build stage copies (COPY src... dest, --from copies left out)."""
    steps = instructions(DOCKERFILES[image])
    return [
        src for op, args in steps if op == "COPY" and not args.startswith("--") for src in args.split()[:-1]
    ]


def test_orchestrator_image_holds_the_protocol_and_not_the_trainer():
    sources = copied_sources("orchestrator")
    assert "services/protocol" in sources and "services/body_limit.py" in sources
    assert not [s for s in sources if s in ("services", "services/") or s.startswith("services/trainer")]


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_each_image_builds_the_packages_it_copied(image, tmp_path):
    """What the image's build stage does, in a folder holding only what it copies: select_packages.py trims the
    package list, then a wheel builds; the orchestrator's wheel holds the protocol and no trainer, the protocol
    imports without torch, and GSM8K loads from the wheel's own files with no hub and no GSM8K_PATH."""
    for source in copied_sources(image):
        origin = ROOT / source
        target = tmp_path / source
        target.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_dir():
            shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.write_bytes(origin.read_bytes())
    (tmp_path / "select_packages.py").write_bytes((ROOT / "docker" / "select_packages.py").read_bytes())
    subprocess.run([sys.executable, "select_packages.py"], cwd=tmp_path, check=True, capture_output=True)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", "dist", "."],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    packages = {name.rsplit("/", 1)[0] for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    if image == "trainer":
        assert {"services/trainer", "services/trainer/api", "services/protocol"} <= packages
    else:
        assert "services/protocol" in packages
        assert not [p for p in packages if p.startswith("services/trainer")]
        check = "import sys, services.protocol; assert 'torch' not in sys.modules"
        subprocess.run(
            [sys.executable, "-c", check], cwd=tmp_path, check=True, env={"PYTHONPATH": str(tmp_path)}
        )
        names = set(zipfile.ZipFile(wheel).namelist())
        shipped = {
            f"orchestrator/gsm8k/dataset/{n}"
            for n in ("train.jsonl.gz", "test.jsonl.gz", "LICENSE", "README.md")
        }
        assert shipped <= names
        installed = tmp_path / "installed"
        zipfile.ZipFile(wheel).extractall(installed)
        load = (
            "from orchestrator.gsm8k.data import read_split; d = read_split('train'); "
            "print(d.source.kind, len(d.rows), d.source.location)"
        )
        loaded = subprocess.run(
            [sys.executable, "-c", load],
            cwd=installed,
            env={"PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1"},
            capture_output=True,
            text=True,
            check=True,
        )
        assert loaded.stdout.split() == ["shipped", "7473", str(installed / "orchestrator/gsm8k/dataset")]
