"""The shell examples of README.md and docs/*.md: how they are written, parsed, run and compared.

The convention (README.md, "Development"):

- A fenced ```` ```console ```` block holds examples: a line starting with ``$ `` is a command (a line
  ending in ``\\`` continues it), and the lines up to the next ``$ `` line are its output, exactly as the
  shell printed it (trailing blank lines dropped). A command may show no output.
- An HTML comment on the line right above the fence changes how the block runs:
  ``<!-- example: skip: <reason> -->`` it is not run (the reason says why);
  ``<!-- example: auth -->`` it runs against the gateway started with ``TGW_AUTH=required`` (the text
  above it says how to start one), with ``TGW_KEY_PEPPER`` in the commands' environment as ``tgw keys``
  needs it.
- ```` ```bash ```` / ```` ```sh ```` blocks are commands without shown output and are never run
  (``make run``, Docker, kubectl); they carry no ``$ `` prompts.

Outputs are compared after ``MASKS`` replaced what legitimately varies between runs (timestamps, timings,
generated ids, key secrets, retry-after seconds). A masked value marked ``bind`` is remembered: the id a
README output shows (a job id) stands for the id the run printed, in every later command of the document.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "$ "
MARKER = re.compile(r"^<!--\s*example:\s*(?P<mode>skip|auth)\b\s*:?\s*(?P<reason>.*?)\s*-->$")
FENCE = re.compile(r"^```(?P<lang>\S*)\s*$")
RUN_MODES = ("run", "auth")
# A command that only reads (curl without a body or another method) is re-run until its output matches,
# for at most READ_RETRY_S: a job finishes in the background after its submission answered.
WRITE_OPTIONS = frozenset({"-d", "--data", "--data-binary", "--data-raw", "--data-urlencode", "--json", "-F",
                           "--form", "-T", "--upload-file", "-X", "--request"})  # fmt: skip
READ_RETRY_S = 10.0


@dataclass(frozen=True)
class Example:
    document: str
    line: int  # 1-based line of the command's prompt
    command: str
    expected: str

    def __str__(self) -> str:
        return f"{self.document}:{self.line}: $ {self.command}"


@dataclass(frozen=True)
class Block:
    document: str
    line: int  # 1-based line of the opening fence
    lang: str
    mode: str  # "run", "auth" or "skip"
    reason: str = ""
    examples: tuple[Example, ...] = ()
    body: tuple[str, ...] = ()


def parse_blocks(text: str, document: str) -> list[Block]:
    """Every fenced block of a Markdown text, with the examples of the console ones."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        start, lang = i, fence["lang"]
        end = start + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        body = tuple(lines[start + 1 : end])
        above = lines[start - 1].strip() if start > 0 else ""
        marker = MARKER.match(above)
        mode = marker["mode"] if marker else "run"
        reason = marker["reason"] if marker else ""
        examples = _examples(body, document, start + 2) if lang == "console" else ()
        blocks.append(Block(document, start + 1, lang, mode, reason, examples, body))
        i = end + 1
    return blocks


def markdown_files() -> list[str]:
    """README.md, then every other Markdown document of the project (docs/, k8s/), as root-relative paths."""
    others = sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("docs/*.md"), *ROOT.glob("k8s/*.md")])
    return ["README.md", *others]


def documents_with_examples() -> list[str]:
    """The documents whose console blocks are run: README.md first (its outputs were taken on a fresh
    stack: cache misses, metrics counters), then the others, whose examples must not depend on order.
    A document whose every console block is marked ``skip`` has nothing to run."""
    return [
        doc
        for doc in markdown_files()
        if any(b.examples and b.mode != "skip" for b in parse_blocks((ROOT / doc).read_text(), doc))
    ]


def _examples(body: tuple[str, ...], document: str, first_line: int) -> tuple[Example, ...]:
    found: list[Example] = []
    i = 0
    while i < len(body):
        if not body[i].startswith(PROMPT):
            if body[i].strip():
                raise ValueError(f"{document}:{first_line + i}: output before the first `$ ` command")
            i += 1
            continue
        line = first_line + i
        command = [body[i][len(PROMPT) :]]
        while command[-1].endswith("\\") and i + 1 < len(body):
            i += 1
            command.append(body[i])
        i += 1
        output: list[str] = []
        while i < len(body) and not body[i].startswith(PROMPT):
            output.append(body[i])
            i += 1
        found.append(Example(document, line, "\n".join(command), normalize("\n".join(output))))
    return tuple(found)


def normalize(text: str) -> str:
    """Line ends as ``\\n``, no trailing spaces, no trailing blank lines."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def is_read_only(command: str) -> bool:
    return "curl " in command and not any(token in WRITE_OPTIONS for token in command.split())


# --- masks ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mask:
    name: str
    pattern: re.Pattern[str]
    replacement: str
    bind: bool = False  # the shown value stands for the printed one in later commands


def _mask(name: str, pattern: str, replacement: str, bind: bool = False) -> Mask:
    return Mask(name, re.compile(pattern, re.MULTILINE | re.IGNORECASE), replacement, bind)


# What varies between two runs of the same example, and nothing else (applied in this order).
MASKS: tuple[Mask, ...] = (
    _mask("timestamp", r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z", "<time>"),
    _mask("Date header", r"(?<=^date: ).+$", "<date>"),
    _mask("Server-Timing durations", r"(?<=;dur=)\d+(?:\.\d+)?", "<ms>"),
    _mask("generated request id", r"(?<=^x-request-id: )[0-9a-f]{32}$", "<request id>"),
    _mask("job id", r"\b[0-9a-f]{32}\b", "<job id>", bind=True),
    _mask("API key", r"\btgw_[0-9a-f]{12}_[A-Za-z0-9_-]+", "<key>", bind=True),
    _mask("key id", r'(?<="id": ")[0-9a-f]{12}(?=")', "<key id>", bind=True),
    _mask("seconds to wait", r'(?<=^retry-after: )\d+$|(?<="retry_after_s":)\d+|(?<=;t=)\d+', "<s>"),
)


def masked(text: str) -> str:
    for mask in MASKS:
        text = mask.pattern.sub(mask.replacement, text)
    return text


def bindings(expected: str, actual: str) -> dict[str, str]:
    """Shown value -> printed value of every ``bind`` mask (in order of appearance)."""
    found: dict[str, str] = {}
    for mask in MASKS:  # each looks at the text the masks before it left (a request id is no job id)
        if mask.bind:
            shown = [m.group(0) for m in mask.pattern.finditer(expected)]
            printed = [m.group(0) for m in mask.pattern.finditer(actual)]
            found.update((s, p) for s, p in zip(shown, printed, strict=False) if s != p)
        expected = mask.pattern.sub(mask.replacement, expected)
        actual = mask.pattern.sub(mask.replacement, actual)
    return found


def bind(command: str, bound: Mapping[str, str]) -> str:
    for shown, printed in bound.items():
        command = command.replace(shown, printed)
    return command


def difference(example: Example, actual: str) -> str:
    """ "" when the outputs match once masked, else a readable diff and the whole output."""
    want, got = masked(example.expected), masked(actual)
    if want == got:
        return ""
    diff = "\n".join(
        difflib.unified_diff(
            want.split("\n"), got.split("\n"), "shown (masked)", "printed (masked)", lineterm=""
        )
    )
    return f"{example}\n{diff}\n--- printed, as is:\n{actual}\n"


# --- running ----------------------------------------------------------------------------------------

# The command runs in bash with every assignment exported (set -a); the environment it leaves is read
# back, so `KEY=$(...)` in one example is $KEY in the next, as in one interactive shell.
_WRAPPER = 'set -a\neval "$1"\nrc=$?\nenv -0 > "$2"\nexit $rc\n'
_SHELL_OWN = frozenset({"PWD", "OLDPWD", "SHLVL", "_"})


@dataclass
class Shell:
    cwd: Path
    env: dict[str, str]
    bound: dict[str, str] = field(default_factory=dict)

    def run(self, command: str, timeout: float = 60.0) -> tuple[str, int]:
        env_file = self.cwd / ".example-env"
        proc = subprocess.run(
            ["bash", "-c", _WRAPPER, "example", bind(command, self.bound), str(env_file)],
            cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
            check=False,
        )  # fmt: skip
        if env_file.exists():
            pairs = (item.partition("=") for item in env_file.read_bytes().decode().split("\0") if item)
            self.env = {name: value for name, _, value in pairs if name not in _SHELL_OWN}
            env_file.unlink()
        return normalize(proc.stdout.decode(errors="replace")), proc.returncode


def base_env(path_first: Path) -> dict[str, str]:
    """This process's environment without any TGW_* setting (a developer's own must not leak into the
    examples), with ``path_first`` (the venv's bin: tgw) first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TGW_")}
    env["PATH"] = f"{path_first}{os.pathsep}{env.get('PATH', '')}"
    return env
