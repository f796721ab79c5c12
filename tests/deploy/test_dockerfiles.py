"""The two images' Dockerfiles and the build context (no Docker engine here, so their structure is what is
checked): multi-stage, dependencies installed before the source is copied (a code change reuses the dependency
layer), a non-root user, a HEALTHCHECK on /health, pinned bases, no secrets baked in, torch-free orchestrator."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"trainer": ROOT / "docker" / "trainer.Dockerfile",
               "orchestrator": ROOT / "docker" / "orchestrator.Dockerfile"}
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
    final = steps[stages[-1]:]
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
    build = steps[:[i for i, (op, _) in enumerate(steps) if op == "FROM"][-1]]
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
    assert installs and not [seg for seg in installs if "torch" in seg or ".[" in seg]  # base dependencies only
    text = DOCKERFILES["orchestrator"].read_text()
    assert "optional-dependencies" not in text
    # The build fails if importing the CLI pulls torch in.
    assert "assert 'torch' not in sys.modules" in text


def test_trainer_image_is_cuda_with_the_gpu_extra():
    text = DOCKERFILES["trainer"].read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:[0-9.]+-", text)
    assert "['optional-dependencies']['gpu']" in text and "download.pytorch.org/whl/cu" in text


def test_dockerignore_keeps_secrets_and_local_state_out():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for needed in ("**/.env", ".git", ".venv", "runs"):
        assert needed in patterns, needed
    # What the images do copy must not be ignored.
    for kept in ("pyproject.toml", "README.md", "orchestrator", "services"):
        assert kept not in patterns, kept
