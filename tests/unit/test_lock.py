"""The dependency lock (requirements/, written by scripts/lock.py): it matches pyproject.toml, every pin is
hash-checked, a package has one version in every profile of a Python, and the installs use it.

``test_locks_are_what_make_lock_writes`` recompiles every lock from pyproject.toml (same pins where still
allowed) and compares byte for byte: it needs the package index, like the install that precedes it."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import lock  # noqa: E402

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+)")


def pins(path: Path) -> dict[str, tuple[Version, int]]:
    """name -> (version, number of hashes) for every requirement line of a compiled lock."""
    found: dict[str, tuple[Version, int]] = {}
    name = ""
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m:
            name = canonicalize_name(m.group(1))
            found[name] = (Version(m.group(3)), 0)
        elif line.strip().startswith("--hash=sha256:") and name:
            version, hashes = found[name]
            found[name] = (version, hashes + 1)
    return found


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements_of(extras: tuple[str, ...]) -> list[Requirement]:
    proj = project()
    reqs = [Requirement(r) for r in proj["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in proj["optional-dependencies"][extra]]
    return reqs


def environment(python: str) -> dict[str, str]:
    """The environment a lock is compiled for (lock.PLATFORM: Linux x86_64)."""
    return {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}  # fmt: skip


@pytest.mark.parametrize("python", lock.PYTHONS)
@pytest.mark.parametrize("profile", [*lock.PROFILES, "all"])
def test_every_requirement_of_pyproject_is_pinned_inside_its_range(python: str, profile: str) -> None:
    path = lock.REQ / f"py{python}" / f"{profile}.txt"
    assert path.exists(), f"{path.relative_to(ROOT)} is missing: run `make lock`"
    locked = pins(path)
    extras = lock.ALL_EXTRAS if profile == "all" else lock.PROFILES[profile]
    env = environment(python)
    checked = 0
    for req in requirements_of(extras):
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in locked, f"{req} (pyproject.toml) is not in {path.relative_to(ROOT)}: run `make lock`"
        version, hashes = locked[name]
        # torch's CPU build is 2.13.0+cpu: a local label satisfies ==2.13.0 (PEP 440).
        assert req.specifier.contains(version, prereleases=True), (
            f"{path.relative_to(ROOT)} pins {name}=={version}, outside pyproject.toml's {req}: run `make lock`"
        )
        assert hashes > 0, f"{name} in {path.relative_to(ROOT)} has no hash"
        checked += 1
    assert checked >= len(project()["dependencies"]) - 1  # uvloop's marker excludes only Windows


@pytest.mark.parametrize("python", lock.PYTHONS)
def test_a_package_has_one_version_in_every_profile_and_every_pin_a_hash(python: str) -> None:
    everything = pins(lock.REQ / f"py{python}" / "all.txt")
    for profile in lock.PROFILES:
        for name, (version, hashes) in pins(lock.REQ / f"py{python}" / f"{profile}.txt").items():
            assert hashes > 0, f"{name} in py{python}/{profile}.txt has no hash"
            assert everything[name][0] == version, (
                f"{name}: {version} in {profile}, {everything[name][0]} in all"
            )


def test_the_gateways_runtime_lock_holds_no_test_tools_and_the_test_lock_the_cpu_torch() -> None:
    gateway = pins(lock.REQ / "py3.11" / "gateway.txt")
    assert "fastapi" in gateway and "redis" in gateway and "tritonclient" in gateway
    assert not {"pytest", "torch", "nvidia-pytriton", "ruff"} & gateway.keys()
    assert str(pins(lock.REQ / "py3.11" / "test.txt")["torch"][0]) == "2.13.0+cpu"
    assert pins(lock.REQ / "uv.txt")["uv"][1] > 0
    triton = pins(lock.REQ / "triton-py3.10.txt")
    assert triton["numpy"][0] < Version("2") and "onnxruntime" in triton


def test_every_install_reads_the_lock() -> None:
    """make, both Dockerfiles and the GPU bundle install from requirements/, never from open ranges."""
    makefile = (ROOT / "Makefile").read_text()
    assert "scripts/lock.py install run" in makefile and "scripts/lock.py install test" in makefile
    assert "--require-hashes -r requirements/uv.txt" in makefile
    assert "pip install -q -e" not in makefile
    gateway = (ROOT / "Dockerfile.gateway").read_text()
    assert "--require-hashes -r requirements/py3.11/gateway.txt" in gateway
    assert re.search(r"pip install [^\n]*--no-deps", gateway)
    triton = (ROOT / "Dockerfile.triton").read_text()
    assert "--require-hashes -r /tmp/triton-requirements.txt" in triton
    assert "'numpy<2'" not in triton
    bundle = (ROOT / "scripts" / "gpu" / "prepare-bundle.sh").read_text()
    assert "requirements/py3.12/gateway.txt" in bundle


def test_markers_in_pyproject_are_valid() -> None:
    for req in requirements_of(lock.ALL_EXTRAS):
        if req.marker is not None:
            Marker(str(req.marker))


def test_locks_are_what_make_lock_writes() -> None:
    """The lock is current: a fresh `make lock` (same pins where pyproject.toml allows them) writes the
    same files. Stale after a pyproject.toml edit: run `make lock` (or `make upgrade` for newer versions)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "lock.py"), "check"], capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
