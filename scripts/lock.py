#!/usr/bin/env python3
"""The dependency lock: compile, check and install (uv's pip interface, hash-pinned requirements).

Every install of this project comes from a file under ``requirements/``:

- ``requirements/py3.X/<profile>.txt`` (X = 11, 12): the exact versions, with hashes, of what one install
  profile needs on that Python (Linux x86_64). A profile is the runtime plus some extras of
  ``pyproject.toml``: ``gateway`` (the runtime: Dockerfile.gateway, the GPU bundle), ``run`` (+ embedded:
  ``make run``), ``test`` (+ embedded, dev, models, otel: ``make test``), ``bench`` (+ embedded, bench:
  ``make bench``). ``all.txt`` holds every extra at once; the profiles are compiled against it, so a
  package has one version in every profile.
- ``requirements/triton-py3.10.txt``: the Python packages Dockerfile.triton adds to NGC's Triton image
  (Python 3.10), from ``requirements/triton.in``.
- ``requirements/uv.txt``: the installer itself, bootstrapped with pip.
- ``requirements/perf-analyzer.txt``: what scripts/install_perf_analyzer.sh downloads (opt-in tooling).

Usage (the Makefile calls these):
  lock.py compile [--upgrade]     write the locks (``make lock``; ``make upgrade`` = newest allowed + tests)
  lock.py check                   recompile into a temp dir and compare: exit 1 if a lock is not current
  lock.py install PROFILE         install PROFILE's lock for this interpreter into its venv, then the project

torch: the ``models`` extra pins torch==2.13.0 and the lock pins its CPU build (``2.13.0+cpu``), which
PyPI does not carry: it comes from pip's configured ``find-links`` (a local wheelhouse) where one has it,
else from PyTorch's CPU index. The hash in the lock is checked either way.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQ = ROOT / "requirements"
PYTHONS = ("3.11", "3.12")
PROFILES: dict[str, tuple[str, ...]] = {
    "gateway": (),
    "run": ("embedded",),
    "test": ("embedded", "dev", "models", "otel"),
    "bench": ("embedded", "bench"),
}
ALL_EXTRAS = ("embedded", "dev", "models", "otel", "bench")
PLATFORM = "x86_64-manylinux_2_35"  # nvidia-pytriton's wheel needs glibc >= 2.35
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
HEADER_COMMAND = "make lock"


def lock_path(python: str, profile: str) -> Path:
    return REQ / f"py{python}" / f"{profile}.txt"


def uv() -> list[str]:
    """The uv next to this interpreter (the venv's, from requirements/uv.txt), else one on PATH."""
    here = Path(sys.executable).parent / "uv"
    if here.exists():
        return [str(here)]
    found = shutil.which("uv")
    if found:
        return [found]
    sys.exit("uv is not installed: run `make install` (it bootstraps uv from requirements/uv.txt with pip)")


def pip_find_links() -> list[str]:
    """The find-links locations pip is configured with (PIP_FIND_LINKS, pip.conf), so a wheelhouse that
    pip would use (this machine's CPU torch) serves uv too."""
    locations = os.environ.get("PIP_FIND_LINKS", "").split()
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                             text=True, timeout=60, check=False).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip().endswith("find-links"):
            locations += value.strip().strip("'\"").split()
    return [loc for loc in dict.fromkeys(locations) if loc]


def torch_sources(python: str, lock: Path | None = None) -> list[str]:
    """Where uv may look for torch's CPU build: pip's find-links; PyTorch's CPU index only to install a lock
    that pins a ``+cpu`` build no find-links location holds (compiling never asks that index, so a lock
    compiles the same on every machine: where no local wheelhouse has the CPU build, PyPI's torch is locked).
    """
    links = pip_find_links()
    args: list[str] = []
    for loc in links:
        args += ["--find-links", loc]
    tag = f"cp{python.replace('.', '')}"
    local = any(
        tag in wheel.name
        for loc in links
        if Path(loc.removeprefix("file://")).is_dir()
        for wheel in Path(loc.removeprefix("file://")).glob("torch-*+cpu-*.whl")
    )
    if lock is not None and not local and "+cpu" in lock.read_text():
        args += ["--extra-index-url", TORCH_CPU_INDEX, "--index-strategy", "unsafe-best-match"]
    return args


def compile_one(
    work: Path,
    python: str,
    out: str,
    inputs: str,
    extras: tuple[str, ...] = (),
    constraint: str | None = None,
    upgrade: bool = False,
    platform: str = PLATFORM,
    no_deps: bool = False,
) -> None:
    """One ``uv pip compile`` run in ``work`` (ROOT, or a copy of its inputs): every path relative to it, so
    the annotations in a lock read the same wherever it was compiled."""
    cmd = [*uv(), "pip", "compile", inputs, "--quiet", "--generate-hashes", "--no-strip-extras",
           "--python-version", python, "--python-platform", platform,
           "--custom-compile-command", HEADER_COMMAND, "-o", out]  # fmt: skip
    for extra in extras:
        cmd += ["--extra", extra]
    if constraint is not None:
        cmd += ["--constraint", constraint]
    if upgrade:
        cmd.append("--upgrade")
    if no_deps:
        cmd.append("--no-deps")
    subprocess.run([*cmd, *torch_sources(python)], cwd=work, check=True)


def compile_python(work: Path, python: str, upgrade: bool) -> None:
    everything = f"requirements/py{python}/all.txt"
    (work / everything).parent.mkdir(parents=True, exist_ok=True)
    compile_one(work, python, everything, "pyproject.toml", ALL_EXTRAS, upgrade=upgrade)
    for profile, extras in PROFILES.items():
        compile_one(work, python, f"requirements/py{python}/{profile}.txt", "pyproject.toml", extras,
                    constraint=everything, upgrade=upgrade)  # fmt: skip


def compile_all(work: Path, upgrade: bool) -> None:
    """Write every lock under ``work/requirements`` (the locks already there are the starting pins)."""
    jobs = [lambda python=python: compile_python(work, python, upgrade) for python in PYTHONS]
    # Dockerfile.triton: NGC 24.10's Python is 3.10. The installer: any Python.
    triton = ("requirements/triton-py3.10.txt", "requirements/triton.in")
    jobs.append(lambda: compile_one(work, "3.10", *triton, upgrade=upgrade))
    tools = ("requirements/perf-analyzer.txt", "requirements/perf-analyzer.in")
    jobs.append(lambda: compile_one(work, "3.11", *tools, upgrade=upgrade, no_deps=True))
    installer = ("requirements/uv.txt", "requirements/uv.in")
    any_linux = "x86_64-manylinux_2_28"
    jobs.append(lambda: compile_one(work, "3.11", *installer, upgrade=upgrade, platform=any_linux))
    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


def locked_files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*.txt"))


def check() -> int:
    """Recompile from the current locks (no upgrade) in a copy of the inputs and compare: what a fresh
    ``make lock`` would write."""
    with tempfile.TemporaryDirectory(prefix="tgw-lock-") as tmp:
        work = Path(tmp)
        shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
        shutil.copytree(REQ, work / "requirements")
        compile_all(work, upgrade=False)
        fresh = work / "requirements"
        stale = [
            str(rel)
            for rel in locked_files(REQ)
            if not (fresh / rel).exists() or not filecmp.cmp(REQ / rel, fresh / rel, shallow=False)
        ]
        stale += [str(rel) for rel in locked_files(fresh) if not (REQ / rel).exists()]
    if stale:
        print("not current (run `make lock`): " + ", ".join(sorted(set(stale))), file=sys.stderr)
        return 1
    print("locks are current")
    return 0


def install(profile: str) -> None:
    python = "{}.{}".format(*sys.version_info[:2])
    lock = lock_path(python, profile)
    if not lock.exists():
        sys.exit(f"no lock for Python {python} ({lock.relative_to(ROOT)}): use Python {' or '.join(PYTHONS)}")
    env = dict(os.environ, VIRTUAL_ENV=sys.prefix)
    base = [*uv(), "pip", "install", "--python", sys.executable]
    print(f"installing {lock.relative_to(ROOT)} (uv; a cold cache downloads ~0.5 GB)", flush=True)
    locked = ["--require-hashes", "-r", str(lock), *torch_sources(python, lock)]
    # uv's own progress and summary ("Installed N packages in ...") are the newcomer's progress report.
    subprocess.run([*base, *locked], env=env, check=True)
    subprocess.run([*base, "--quiet", "--no-deps", "-e", str(ROOT)], env=env, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    comp = sub.add_parser("compile")
    comp.add_argument("--upgrade", action="store_true", help="newest versions pyproject.toml allows")
    sub.add_parser("check")
    inst = sub.add_parser("install")
    inst.add_argument("profile", choices=sorted(PROFILES))
    args = parser.parse_args()
    if args.cmd == "compile":
        compile_all(ROOT, upgrade=args.upgrade)
        return 0
    if args.cmd == "check":
        return check()
    install(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
