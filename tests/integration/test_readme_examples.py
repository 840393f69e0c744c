"""The shell examples of README.md and docs/*.md (docs/models.md: a /v1 and a /v2 call of every model), run against the real stack, print what they show.

One ``tgw up`` for the module (as ``make run``: the embedded Triton on ``model_repository/`` with the CPU
configurations, the cache and jobs Redis, the gateway on uvloop with its in-process job worker), on free
ports with a private state dir. The examples talk to ``localhost:8080`` as written: curl reads a
``.curlrc`` that connects that address to the stack's port (so the Host header, and the URLs the gateway
builds from it, stay ``localhost:8080``). Blocks marked ``<!-- example: auth -->`` run against a second
gateway (``tgw serve``, ``TGW_AUTH=required``) on the same Triton and Redis. Each document's examples run
in order in one shell (tests/doc_examples.py: the convention, the masks); README.md first, on the fresh
stack its outputs (cache misses, metrics counters) were taken from.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.launcher import StackState, free_port
from tests.doc_examples import (
    READ_RETRY_S,
    Block,
    Example,
    Shell,
    base_env,
    bindings,
    difference,
    documents_with_examples,
    is_read_only,
    parse_blocks,
)
from tests.eventually import eventually
from tests.processes import ROOT, TgwProcess, clean_env, start_tgw, up_env

pytestmark = pytest.mark.integration
DOCUMENTS = documents_with_examples()  # README.md, docs/models.md
SHOWN = "localhost:8080"  # where the examples say the gateway is


@dataclass
class ExampleStack:
    tmp: Path
    state: Path
    main: TgwProcess
    env: dict[str, str]  # the stack's addresses (stack.json)
    pepper: str
    auth: TgwProcess | None = None

    def gateway(self, mode: str) -> TgwProcess:
        if mode == "run":
            return self.main
        if self.auth is None:  # started the first time a block needs it
            env = clean_env()
            env.update(self.env)
            env.update({
                "TGW_PORT": str(free_port()), "TGW_GRPC_PORT": str(free_port()), "TGW_AUTH": "required",
                "TGW_KEY_PEPPER": self.pepper,  # what the README's .env adds, and nothing else
                "TGW_STATE_DIR": str(self.state), "TGW_SHUTDOWN_DELAY_S": "0", "TGW_DRAIN_S": "2",
            })  # fmt: skip
            self.auth = start_tgw(["serve"], env, self.tmp / "tgw-serve-auth.log", cwd=self.tmp, timeout=180)
        return self.auth


@pytest.fixture(scope="module")
def example_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExampleStack]:
    if shutil.which("curl") is None:
        pytest.fail("the README's examples need curl on PATH")
    tmp = tmp_path_factory.mktemp("examples")
    state = tmp / "state"
    env = up_env(
        state, TGW_MODEL_REPOSITORY=str(ROOT / "model_repository"),
        TGW_TRITON_MODEL_CONFIG_NAME="cpu",  # the outputs shown are the CPU (ONNX Runtime) answers
        TGW_WORKERS="1", TGW_SHUTDOWN_DELAY_S="0", TGW_DRAIN_S="5",
    )  # fmt: skip
    main = start_tgw(["up"], env, tmp / "tgw-up.log", cwd=tmp, timeout=180)
    stack_state = StackState.read(state)
    assert stack_state is not None
    stack = ExampleStack(tmp, state, main, stack_state.env, secrets.token_hex(32))
    yield stack
    if stack.auth is not None:
        stack.auth.stop()
    main.stop()


def document_blocks(document: str) -> list[Block]:
    return parse_blocks((ROOT / document).read_text(), document)


def run_example(shell: Shell, example: Example) -> tuple[str, int, str]:
    """(output, exit status, difference from what it shows) of ``example``; a read-only one is run again
    until it prints what it shows, for at most READ_RETRY_S (a job finishes after its submission answered)."""
    last: list[tuple[str, int, str]] = []

    def shown() -> bool:
        actual, rc = shell.run(example.command)
        last[:] = [(actual, rc, difference(example, actual))]
        return not last[0][2] or not is_read_only(example.command)

    with contextlib.suppress(AssertionError):  # still different: the difference is what the test reports
        eventually(shown, READ_RETRY_S, 0.2)
    return last[0]


def run_document(stack: ExampleStack, document: str) -> tuple[int, list[str]]:
    """Run every example of ``document`` in order; (examples run, failures)."""
    cwd = stack.tmp / document.replace("/", "_")
    cwd.mkdir()
    shell = Shell(cwd, base_env(Path(sys.executable).parent))
    shell.env["CURL_HOME"] = str(cwd)  # curl reads its .curlrc from here
    shell.env["TGW_STATE_DIR"] = str(stack.state)  # `tgw keys` finds the stack's Redis (stack.json)
    failures: list[str] = []
    ran = 0
    for block in document_blocks(document):
        if block.lang != "console" or block.mode == "skip":
            continue
        gateway = stack.gateway(block.mode)
        (cwd / ".curlrc").write_text(f'connect-to = "{SHOWN}:127.0.0.1:{gateway.port}"\n')
        if block.mode == "auth":
            shell.env["TGW_KEY_PEPPER"] = stack.pepper
        else:
            shell.env.pop("TGW_KEY_PEPPER", None)
        for example in block.examples:
            actual, rc, diff = run_example(shell, example)
            ran += 1
            if diff:
                failures.append(f"{diff}(exit status {rc})")
            else:
                shell.bound.update(bindings(example.expected, actual))
    return ran, failures


@pytest.mark.parametrize("document", DOCUMENTS)
def test_shell_examples_print_what_they_show(example_stack: ExampleStack, document: str) -> None:
    ran, failures = run_document(example_stack, document)
    assert ran > 0, f"no example found in {document}"
    assert not failures, (
        f"{len(failures)} of {ran} examples in {document} printed something else:\n\n" + "\n".join(failures)
    )
