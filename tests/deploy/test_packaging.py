"""The distribution ships every package: setuptools installs exactly the packages pyproject.toml names, so a
subpackage left out of the list would be missing from the wheel and the images while the tests, run from the
checkout, still pass."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_of_the_tree_is_listed_and_every_listed_one_exists():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    mapped = {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("orchestrator", "services")
        for init in (ROOT / top).rglob("__init__.py")
        if init.parent not in mapped.values()
    }
    assert found | set(mapped) == listed
    assert all((ROOT / name.replace(".", "/") / "__init__.py").is_file() for name in listed - set(mapped))
    assert all((folder / "__init__.py").is_file() for folder in mapped.values())
