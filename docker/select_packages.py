"""Keep in pyproject.toml's package list only the packages whose folders this image copied, so that `pip install .`
builds the part of the distribution the image holds (the orchestrator image has no services/trainer, the trainer
image no orchestrator/). Run in the build stage, on the build's own copy of pyproject.toml."""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path


def main(pyproject: Path) -> None:
    text = pyproject.read_text()
    setuptools = tomllib.loads(text)["tool"]["setuptools"]
    folders = setuptools.get("package-dir", {})
    kept = [name for name in setuptools["packages"] if Path(folders.get(name, name.replace(".", "/"))).is_dir()]
    text, count = re.subn(r"(?ms)^packages = \[.*?\]$", f"packages = {json.dumps(kept)}", text, count=1)
    if count != 1:
        sys.exit(f"{pyproject}: no `packages = [...]` list in [tool.setuptools]")
    pyproject.write_text(text)
    print("packages:", ", ".join(kept))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))
