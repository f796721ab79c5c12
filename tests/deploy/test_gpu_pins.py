"""The trainer image's pins against what the pinned Unsloth release declares.

docker/trainer-constraints.txt (exact versions the image installs), the Dockerfile's torch/torchvision ARGs and the
project's `gpu` extra must all fall inside the Requires-Dist ranges of unsloth and unsloth_zoo, kept in
docker/unsloth/*.requires (copied from the release's wheels). The last test checks those copies against PyPI
itself (the wheel's digest and its own METADATA, read with HTTP range requests); it is skipped when PyPI cannot be
reached.
"""

from __future__ import annotations

import io
import re
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "trainer.Dockerfile"
CONSTRAINTS = ROOT / "docker" / "trainer-constraints.txt"
REQUIRES = {name: ROOT / "docker" / "unsloth" / f"{name}.requires" for name in ("unsloth", "unsloth_zoo")}
# The image: Ubuntu 24.04 (Python 3.12) on x86_64.
IMAGE_ENV = {
    **default_environment(),
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "os_name": "posix",
    "extra": "",
}


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M))


def image_pins() -> dict[str, Version]:
    """Package -> exact version the image installs: the constraints file plus torch/torchvision from the ARGs."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = Version(version)
    args = dockerfile_args()
    pins["torch"] = Version(args["TORCH_VERSION"])
    pins["torchvision"] = Version(args["TORCHVISION_VERSION"])
    return pins


def copied_requirements(name: str) -> tuple[Version, list[Requirement]]:
    """(release version, its requirements that apply to the image) from a docker/unsloth/*.requires copy."""
    text = REQUIRES[name].read_text()
    version = Version(re.search(rf"Requires-Dist of {name} (\S+) ", text).group(1))
    requirements = [
        Requirement(line) for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    return version, [r for r in requirements if r.marker is None or r.marker.evaluate(IMAGE_ENV)]


def gpu_extra() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["optional-dependencies"]["gpu"]]


def probe_versions(*specifier_sets) -> list[Version]:
    """Every version a specifier names, and its neighbours: enough to compare two ranges made of such bounds."""
    probes = set()
    for specifiers in specifier_sets:
        for spec in specifiers:
            base = Version(spec.version.replace(".*", ".0"))
            major, minor, micro = [*base.release, 0, 0][:3]
            probes |= {
                base,
                Version(f"{major}.{minor}.{micro + 1}"),
                Version(f"{major}.{minor + 1}.0"),
                Version(f"{major + 1}.0.0"),
            }
            if micro:
                probes.add(Version(f"{major}.{minor}.{micro - 1}"))
            elif minor:
                probes.add(Version(f"{major}.{minor - 1}.99"))
    return sorted(probes)


@pytest.mark.parametrize("release", sorted(REQUIRES))
def test_image_pins_satisfy_the_unsloth_release(release):
    pins = image_pins()
    _, requirements = copied_requirements(release)
    checked = 0
    for requirement in requirements:
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is not None:
            assert requirement.specifier.contains(pinned, prereleases=True), (
                f"{release} requires {requirement}, the image pins {requirement.name}=={pinned}"
            )
            checked += 1
    # The ones the issue names must be among those pinned: transformers, trl, torch, peft, bitsandbytes.
    assert checked >= 5


def test_the_image_installs_the_copied_releases():
    pins = image_pins()
    for release in REQUIRES:
        version, _ = copied_requirements(release)
        assert pins[canonicalize_name(release)] == version, f"the image pins another {release} than the copy"


def test_image_pins_satisfy_the_gpu_extra():
    pins = image_pins()
    for requirement in gpu_extra():
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"the gpu extra's {requirement.name} is not pinned in the image"
        assert requirement.specifier.contains(pinned), (
            f"gpu extra {requirement} excludes the image's {pinned}"
        )


def test_the_gpu_extra_admits_nothing_unsloth_excludes():
    """Installing `.[gpu]` anywhere gives a set the pinned Unsloth accepts: each range of the extra lies inside
    Unsloth's range for the same package (compared on every version either range names, and its neighbours)."""
    declared = {}
    for release in REQUIRES:
        for requirement in copied_requirements(release)[1]:
            declared.setdefault(canonicalize_name(requirement.name), []).append(requirement.specifier)
    shared = [r for r in gpu_extra() if canonicalize_name(r.name) in declared]
    assert {canonicalize_name(r.name) for r in shared} >= {
        "transformers",
        "peft",
        "bitsandbytes",
        "unsloth-zoo",
    }
    for requirement in shared:
        theirs = declared[canonicalize_name(requirement.name)]
        for version in probe_versions(requirement.specifier, *theirs):
            if requirement.specifier.contains(version):
                assert all(s.contains(version) for s in theirs), (
                    f"the gpu extra's {requirement} admits {version}, which Unsloth's {theirs} excludes"
                )


def test_the_dockerfile_installs_with_the_constraints():
    text = DOCKERFILE.read_text()
    assert re.search(r"^COPY [^\n]*docker/trainer-constraints\.txt", text, re.M)
    assert re.search(r"pip install -r requirements\.txt[^\n]*-c trainer-constraints\.txt", text)
    assert "torchvision==${TORCHVISION_VERSION}" in text, "torchvision must come from the torch index"


def test_the_default_backend_is_one_setting_everywhere():
    """The image's ARG, compose's fallback and .env.example name the same default backend."""
    default = dockerfile_args()["TRAINER_BACKEND"]
    assert default in ("transformers", "unsloth")
    assert f"TRAINER_BACKEND: ${{TRAINER_BACKEND:-{default}}}" in (ROOT / "compose.yaml").read_text()
    assert re.search(rf"^TRAINER_BACKEND={default}$", (ROOT / ".env.example").read_text(), re.M)
    assert "TRAINER_BACKEND=${TRAINER_BACKEND}" in DOCKERFILE.read_text()


class RangeReader(io.RawIOBase):
    """A seekable read-only view of a remote file through HTTP range requests (enough for zipfile)."""

    def __init__(self, client, url: str):
        self.client, self.url, self.position = client, url, 0
        head = client.head(url, follow_redirects=True)
        head.raise_for_status()
        self.size = int(head.headers["content-length"])

    def seekable(self):
        return True

    def readable(self):
        return True

    def tell(self):
        return self.position

    def seek(self, offset, whence=io.SEEK_SET):
        self.position = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence] + offset
        return self.position

    def read(self, size=-1):
        end = self.size if size is None or size < 0 else min(self.size, self.position + size)
        if end <= self.position:
            return b""
        answer = self.client.get(
            self.url, headers={"Range": f"bytes={self.position}-{end - 1}"}, follow_redirects=True
        )
        answer.raise_for_status()
        assert answer.status_code == 206, "the server ignored the range request"
        self.position += len(answer.content)
        return answer.content


@pytest.mark.parametrize("release", sorted(REQUIRES))
def test_the_copies_match_the_wheels_on_pypi(release):
    httpx = pytest.importorskip("httpx")
    version, _ = copied_requirements(release)
    text = REQUIRES[release].read_text()
    digest = re.search(r"sha256 ([0-9a-f]{64})", text).group(1)
    index = f"https://pypi.org/pypi/{release}/json"
    try:
        with httpx.Client(timeout=20) as client:
            answer = client.get(index, follow_redirects=True)
            answer.raise_for_status()
            files = answer.json()["releases"][str(version)]
            (wheel,) = [f for f in files if f["packagetype"] == "bdist_wheel"]
            metadata = zipfile.ZipFile(RangeReader(client, str(httpx.URL(index).join(wheel["url"]))))
            name = next(n for n in metadata.namelist() if n.endswith(".dist-info/METADATA"))
            published = metadata.read(name).decode()
    except (httpx.TransportError, httpx.HTTPStatusError) as exc:
        pytest.skip(f"PyPI not reachable: {exc}")
    assert wheel["digests"]["sha256"] == digest, "the copy names another file than PyPI's wheel"
    requires = [
        line.removeprefix("Requires-Dist: ")
        for line in published.splitlines()
        if line.startswith("Requires-Dist: ") and "extra ==" not in line
    ]
    copy = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert copy == requires
