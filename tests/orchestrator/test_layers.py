"""The orchestrator's packages are layers (pyproject.toml [tool.importlinter]): each imports only the layers below
it, and the modules of a package import each other without cycles. import-linter reads every import, also those
inside functions."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the orchestrator package found in `root`, with that folder's pyproject.toml."""
    return subprocess.run(
        [sys.executable, "-c", "import sys, importlinter.cli as c; sys.exit(c.lint_imports(no_cache=True))"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_layers_and_no_cycles_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    "module,line,broken",
    [
        (
            "search/tree.py",
            "from orchestrator.runners import plots",
            "orchestrator.search is not allowed to import",
        ),
        ("gsm8k/data.py", "import orchestrator.cli", "orchestrator.gsm8k is not allowed to import"),
        ("runners/evaluation.py", "import orchestrator.runners.training", "No cycles are allowed"),
    ],
)
def test_an_upward_import_or_a_cycle_breaks_the_contracts(tmp_path, module, line, broken):
    shutil.copytree(ROOT / "orchestrator", tmp_path / "orchestrator")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "orchestrator" / module, "a") as fh:
        fh.write(f"\n\ndef _late():\n    {line}  # inside a function: still an import\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0 and broken in result.stdout, result.stdout + result.stderr
