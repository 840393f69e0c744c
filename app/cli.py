"""``tgw``: the command line. ``tgw up`` runs the embedded stack (Redis + Triton + gateway) in the
foreground; ``tgw serve`` runs only the gateway against external Triton and Redis."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from app.cli_common import SECRET_WORDS, dotenv_values, load_settings, preflight, unknown_variables
from app.launcher import EmbeddedRedis, EmbeddedTriton, LaunchError, ManagedProcess, StackState
from app.observability.logging import configure_logging, log_config
from app.server import (
    DependencyUnavailable,
    GracefulServer,
    raise_nofile_limit,
    run_workers,
    server_config,
    wait_for_dependencies,
)
from app.server import run as run_on_server_loop
from app.settings import Settings, redact_url, setting_fields

logger = logging.getLogger("app.cli")


def _setup_logging(settings: Settings) -> None:
    obs = settings.observability
    configure_logging(obs.log_level, obs.log_format, obs.log_repeat_interval_s)


def config_rows(settings: Settings) -> list[tuple[str, str, str]]:
    """(variable, effective value, where it came from) for every setting; secrets redacted."""
    from_file = dotenv_values()
    rows = []
    for setting in setting_fields():
        var, name = setting.env, setting.name
        names = (var, setting.old_env) if setting.old_env else (var,)
        source = ("environment" if any(n in os.environ for n in names)
                  else ".env" if any(n in from_file for n in names) else "default")  # fmt: skip
        value = getattr(getattr(settings, setting.group), name)
        if any(word in name for word in SECRET_WORDS):
            shown = "<unset>" if value in (None, "") else "<redacted>"
        else:
            shown = redact_url(value) if isinstance(value, str) and "://" in value else str(value)
        rows.append((var, shown, source))
    return rows


def cmd_doctor(_: argparse.Namespace) -> int:
    from app import doctor

    return doctor.run(load_settings)


def cmd_config(args: argparse.Namespace) -> int:
    settings = load_settings()
    rows = config_rows(settings)
    width = max(len(var) for var, _, _ in rows)
    for var, shown, source in rows:
        sys.stdout.write(f"{var:<{width}}  {shown}  ({source})\n")
    for warning in unknown_variables():
        sys.stderr.write(warning + "\n")
    return 0


def _check_before_start(settings: Settings, command: str, serving: bool = True) -> None:
    for warning in unknown_variables():
        logger.warning("%s", warning)
    problems = preflight(settings, serving)
    if problems:
        sys.stderr.write(f"tgw {command}: cannot start:\n" + "".join(f"  {p}\n" for p in problems))
        raise SystemExit(2)


def _uvicorn_config(settings: Settings, **extra: object) -> uvicorn.Config:
    """uvicorn with the server guards of ``app.server`` (timeouts, connection cap, uvloop)."""
    raise_nofile_limit()
    obs = settings.observability
    return server_config(
        "app.main:create_app",
        settings.server,
        factory=True,
        log_level=obs.log_level.lower(),
        log_config=log_config(obs.log_level, obs.log_format, obs.log_repeat_interval_s),
        access_log=False,  # app.access logs one structured line per request instead
        timeout_graceful_shutdown=int(settings.server.drain_s) or None,
        **extra,
    )


def _wait_for_dependencies(settings: Settings) -> bool:
    try:
        asyncio.run(wait_for_dependencies(settings))
    except DependencyUnavailable as exc:
        logger.error("cannot start: %s", exc)
        return False
    return True


@contextmanager
def _multiprocess_metrics_dir() -> Iterator[None]:
    """Prometheus multiprocess mode for uvicorn workers: a fresh directory for the samples, removed at exit.
    A directory given in PROMETHEUS_MULTIPROC_DIR is emptied at start instead (stale samples)."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        os.makedirs(given, exist_ok=True)
        for name in os.listdir(given):
            if name.endswith(".db"):
                os.remove(os.path.join(given, name))
        yield
        return
    path = tempfile.mkdtemp(prefix="tgw-prometheus-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    try:
        yield
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Supervised:
    """A child of ``tgw up`` and how to start it again (same ports, same files)."""

    name: str
    process: ManagedProcess
    restart: Callable[[], None]  # blocking: starts the server and waits until it is ready
    crashes: deque[float] = field(default_factory=deque)
    restarting: bool = False
    restarts: int = 0


async def _supervise(
    settings: Settings,
    children: list[Supervised],
    spawner: ThreadPoolExecutor | None,
    stopping: Callable[[], bool],
    give_up: Callable[[Supervised, str], None],
) -> None:
    """Start a child that died again with a growing pause (meanwhile the gateway serves: Redis down = cache
    bypass, one Triton down = the others); more than ``TGW_SUPERVISE_MAX_RESTARTS`` crashes of one child
    within 60 s: ``give_up``. Runs until ``stopping()``."""
    tasks: set[asyncio.Task[None]] = set()

    async def restart(child: Supervised, pause: float) -> None:
        try:
            await asyncio.sleep(pause)
            logger.warning("restarting %s (restart %d)", child.name, child.restarts + 1)
            await asyncio.get_running_loop().run_in_executor(spawner, child.restart)
            child.restarts += 1
            logger.warning("%s is back (pid %s)", child.name, child.process.pid)
        except LaunchError as exc:  # counted as another crash by the watcher, which tries again
            logger.error("restarting %s failed: %s", child.name, exc)
        finally:
            child.restarting = False

    try:
        while not stopping():
            for child in children:
                if child.restarting or child.process.alive():
                    continue
                now = time.monotonic()
                child.crashes.append(now)
                while child.crashes and now - child.crashes[0] > 60.0:
                    child.crashes.popleft()
                code = child.process.returncode()
                if len(child.crashes) > settings.embedded.supervise_max_restarts:
                    times = len(child.crashes)
                    give_up(child, f"exited unexpectedly with code {code} ({times} times in 60 s)")
                    return
                pause = min(0.5 * 2 ** (len(child.crashes) - 1), 10.0)
                logger.error(
                    "%s exited unexpectedly with code %s; restarting it in %.1f s; last log lines:\n%s",
                    child.name, code, pause, child.process.log_tail(5),
                )  # fmt: skip
                child.restarting = True
                task = asyncio.create_task(restart(child, pause))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.sleep(0.5)
    finally:
        for task in list(tasks):
            task.cancel()


def _gave_up(child: Supervised, why: str) -> str:
    return f"{child.name} {why}; last log lines ({child.process.log_path}):\n{child.process.log_tail()}"


async def _serve_with_children(
    settings: Settings, children: list[Supervised], spawner: ThreadPoolExecutor | None = None
) -> int:
    """Serve the gateway in this process, supervising the children (``_supervise``)."""
    server = GracefulServer(_uvicorn_config(settings), settings.server.shutdown_delay_s)
    failed: list[str] = []

    def give_up(child: Supervised, why: str) -> None:
        failed.append(_gave_up(child, why))
        server.should_exit = True

    watcher = asyncio.create_task(
        _supervise(settings, children, spawner, lambda: server.should_exit, give_up)
    )
    try:
        await server.serve()
    finally:
        watcher.cancel()
    if failed:
        logger.error("stopping the stack: %s", failed[0])
        return 1
    return 0 if server.started else 1


def _serve_workers_with_children(
    settings: Settings, workers: int, children: list[Supervised], spawner: ThreadPoolExecutor
) -> int:
    """``workers`` gateway processes (uvicorn's supervisor, as ``tgw serve``), the children supervised from a
    thread; a child that gives up stops the supervisor."""
    import threading

    failed: list[str] = []
    started = threading.Event()
    holder: list[Any] = []

    def on_supervisor(supervisor: Any) -> None:
        holder.append(supervisor)
        started.set()

    def stopping() -> bool:
        return bool(holder) and holder[0].should_exit.is_set()

    def give_up(child: Supervised, why: str) -> None:
        failed.append(_gave_up(child, why))
        holder[0].should_exit.set()

    def watch() -> None:
        started.wait()
        asyncio.run(_supervise(settings, children, spawner, stopping, give_up))

    watcher = threading.Thread(target=watch, name="tgw-supervise", daemon=True)
    watcher.start()
    with _multiprocess_metrics_dir():
        code = run_workers(_uvicorn_config(settings, workers=workers), on_supervisor=on_supervisor)
    started.set()
    watcher.join(timeout=5)
    if failed:
        logger.error("stopping the stack: %s", failed[0])
        return 1
    return code


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, bounded by a container's CPU quota (cgroup v2
    ``cpu.max``, or v1 ``cpu.cfs_quota_us``), rounded up."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = period = 0.0
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            quota, period = float(text[0]), float(text[1])
    except (OSError, ValueError, IndexError):
        try:
            quota = float(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            period = float(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    if quota > 0 and period > 0:
        cores = min(cores, max(1, math.ceil(quota / period)))
    return max(1, cores)


def serve_workers(settings: Settings) -> int:
    """TGW_WORKERS when set; else one per usable core, 1 to 16 (Triton on other machines: each worker's
    event loop is one core's work; docs/scaling.md, "Workers")."""
    if "workers" in settings.server.model_fields_set:
        return settings.server.workers
    return max(1, min(16, usable_cores()))


def up_workers(settings: Settings) -> int:
    """TGW_WORKERS when set; else, beside the embedded Triton, half the cores this process may use (one on
    a 2-core machine: Triton needs the other), three quarters where Triton runs the GPU configs (its models
    need little CPU there: on 16 cores 12 workers served 2.6x Triton direct's misses and 4.6x its hits at
    c=256, 8 workers 1.6x and 2.3x; docs/scaling.md, "Workers"), at most 16."""
    if "workers" in settings.server.model_fields_set:
        return settings.server.workers
    from app.launcher import resolve_model_config_name

    gpu = resolve_model_config_name(settings.embedded.triton_model_config_name) == "gpu"
    cores = usable_cores()
    return max(1, min(16, cores * 3 // 4 if gpu else cores // 2))


def cmd_up(_: argparse.Namespace) -> int:
    settings = load_settings()
    if "TGW_SHUTDOWN_DELAY_S" not in os.environ:  # dev stack, no load balancer: Ctrl-C acts at once
        settings = settings.updated(shutdown_delay_s=0.0)
    _setup_logging(settings)
    _check_before_start(settings, "up")
    children: list[Supervised] = []
    redis: EmbeddedRedis | None = None
    jobs_redis: EmbeddedRedis | None = None
    tritons: list[EmbeddedTriton] = []
    # Children are started (and restarted) from these threads, which live as long as the stack: a child
    # gets PR_SET_PDEATHSIG, and Linux sends it when the *thread* that forked it ends.
    embedded = settings.embedded
    spawner = ThreadPoolExecutor(max_workers=embedded.embedded_tritons + 2, thread_name_prefix="tgw-spawn")
    try:
        if settings.cache.cache_redis_url is None and settings.cache.cache_enabled:
            # The cache evicts its least-recently-used answers beyond TGW_CACHE_REDIS_MAXMEMORY ...
            redis = EmbeddedRedis(
                embedded.cache_redis_port, embedded.state_dir / "redis",
                maxmemory=embedded.cache_redis_maxmemory,
                policy="allkeys-lru",
            )  # fmt: skip
            redis.start()
            children.append(Supervised("redis-server", redis.process, redis.restart))
        if settings.jobs.jobs_redis_url is None and settings.cache.cache_redis_url is None:
            # ... and jobs live in their own instance, which never evicts.
            jobs_redis = EmbeddedRedis(
                embedded.jobs_redis_port, embedded.state_dir / "redis-jobs", policy="noeviction",
                name="redis-server (jobs)",
            )  # fmt: skip
            jobs_redis.start()
            children.append(Supervised("redis-server (jobs)", jobs_redis.process, jobs_redis.restart))
        if settings.triton.triton_url is None and settings.triton.triton_urls is None:
            count = embedded.embedded_tritons
            for i in range(count):
                http_port, grpc_port, metrics_port = embedded.embedded_triton_ports(i)
                tritons.append(EmbeddedTriton(
                    embedded.model_repository, http_port, grpc_port, metrics_port,
                    embedded.state_dir / ("triton" if count == 1 else f"triton-{i}"),
                    model_config_name=embedded.triton_model_config_name,
                ))  # fmt: skip
            logger.info("starting %d Triton(s) on %s (this takes a few seconds)",
                        count, embedded.model_repository)  # fmt: skip
            for future in [spawner.submit(t.start, embedded.triton_startup_timeout_s) for t in tritons]:
                future.result()
            for i, triton in enumerate(tritons):
                name = "tritonserver" if count == 1 else f"tritonserver-{i}"
                children.append(Supervised(name, triton.process, triton.restart))
        # The gateway (and any uvicorn worker) reads its settings from the environment.
        if redis is not None:
            os.environ["TGW_REDIS_URL"] = redis.url
        if jobs_redis is not None:
            os.environ["TGW_JOBS_REDIS_URL"] = jobs_redis.url
        if len(tritons) == 1:
            os.environ["TGW_TRITON_URL"] = tritons[0].grpc_url
            os.environ.setdefault("TGW_TRITON_HTTP_URL", tritons[0].http_url)  # blank: gRPC inference
        elif tritons:  # several: routed over all of them (app.clients.routed), inference over HTTP
            os.environ["TGW_TRITON_URLS"] = ",".join(
                f"grpc={t.grpc_url};http={t.http_url.removeprefix('http://')}" for t in tritons
            )
        os.environ.setdefault("TGW_WORKER_IN_PROCESS", "true")  # the embedded default runs jobs too
        # `tgw keys` & co. in another shell read the addresses from here (StackState).
        addresses = ("TGW_REDIS_URL", "TGW_JOBS_REDIS_URL", "TGW_AUTH_REDIS_URL", "TGW_TRITON_URL",
                     "TGW_TRITON_URLS", "TGW_TRITON_HTTP_URL", "TGW_REDIS_CLUSTER")  # fmt: skip
        env = {k: os.environ[k] for k in addresses if os.environ.get(k)}
        env["TGW_PORT"], env["TGW_GRPC_PORT"] = str(settings.server.port), str(settings.server.grpc_port)
        state_file = StackState(os.getpid(), env).write(settings.embedded.state_dir)
        logger.info("stack addresses in %s (tgw keys and other commands read them)", state_file)
        workers = up_workers(settings)
        logger.info("gateway on http://%s:%d (%d worker process%s; TGW_WORKERS)", settings.server.host,
                    settings.server.port, workers, "" if workers == 1 else "es")  # fmt: skip
        if settings.server.grpc_enabled:
            logger.info("gateway gRPC (KServe v2) on %s:%d", settings.server.host, settings.server.grpc_port)
        if workers > 1:
            code = _serve_workers_with_children(settings, workers, children, spawner)
        else:  # uvloop, as `tgw serve`
            code = run_on_server_loop(_serve_with_children(settings, children, spawner))
    except LaunchError as exc:
        logger.error("%s", exc)
        code = 1
    except KeyboardInterrupt:
        code = 0
    finally:
        StackState.remove(settings.embedded.state_dir, os.getpid())
        # The gateway has drained; its servers stop together (each waits for its own exit).
        stops = [triton.stop for triton in tritons]  # also its Python-backend stubs and shm regions
        stops += [server.stop for server in (redis, jobs_redis) if server is not None]
        with ThreadPoolExecutor(max_workers=len(stops) or 1, thread_name_prefix="tgw-stop") as stopper:
            for future in [stopper.submit(stop) for stop in stops]:
                future.result()
        spawner.shutdown(wait=False, cancel_futures=True)
    return code


def cmd_serve(_: argparse.Namespace) -> int:
    settings = load_settings()
    _setup_logging(settings)
    _check_before_start(settings, "serve")
    if not _wait_for_dependencies(settings):
        return 1
    workers = serve_workers(settings)
    config = _uvicorn_config(settings, workers=workers)
    if workers > 1:
        with _multiprocess_metrics_dir():
            return run_workers(config)
    server = GracefulServer(config, settings.server.shutdown_delay_s)
    server.run()
    return 0 if server.started else 1


async def _run_worker(settings: Settings) -> int:
    """The gateway's core (``build_gateway``: same clients, same inference service) with a worker and the
    webhook dispatcher in it, and no web app: no door is built or started (no gRPC door, no auth stage: the
    edge of a process that serves no request). SIGTERM/SIGINT: stop reading, let running jobs finish."""
    from app.gateway import build_gateway

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with build_gateway(settings.updated(job_worker_in_process=True, drain_s=0)) as gw:
        worker = gw.jobs.worker
        assert worker is not None
        logger.info("job worker %s running", worker.name)
        await stop.wait()
        logger.info("draining job worker (up to %.0f s)", settings.server.drain_s)
        gw.jobs.begin_drain()  # no new job, no new webhook claim
        await worker.drain(settings.server.drain_s)
    return 0


def cmd_worker(_: argparse.Namespace) -> int:
    settings = load_settings()
    _setup_logging(settings)
    _check_before_start(settings, "worker", serving=False)
    if not _wait_for_dependencies(settings):
        return 1
    if settings.jobs.job_worker_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.jobs.job_worker_metrics_port, addr=settings.server.host)
        logger.info("worker metrics on http://%s:%d/metrics", settings.server.host,
                    settings.jobs.job_worker_metrics_port)  # fmt: skip
    code: int = run_on_server_loop(_run_worker(settings))
    return code


def cmd_bench(args: argparse.Namespace) -> int:
    from app.bench import runner

    return runner.run(runner.options_from(args))


UP_HELP = """The whole stack for development, in the foreground (what `make run` starts):
  redis-server (response cache)   127.0.0.1:6379   TGW_CACHE_REDIS_PORT; allkeys-lru within
                                                   TGW_CACHE_REDIS_MAXMEMORY
  redis-server (jobs and keys)    127.0.0.1:6380   TGW_JOBS_REDIS_PORT; noeviction, AOF
  tritonserver on TGW_MODEL_REPOSITORY   HTTP :8000, gRPC :8001, metrics :8002 (TGW_TRITON_*_PORT)
  the gateway                     TGW_HOST:TGW_PORT (127.0.0.1:8080), gRPC :8081 (TGW_GRPC_PORT)
Setting TGW_CACHE_REDIS_URL or TGW_TRITON_URL uses that server instead of starting one. State and logs live
in TGW_STATE_DIR (.tgw/: redis/redis.log, redis-jobs/redis.log, triton/triton.log, stack.json with the
addresses for `tgw keys`). A child that dies is restarted (TGW_SUPERVISE_MAX_RESTARTS). Ctrl-C or
SIGTERM stops them all. Auth is off unless TGW_AUTH=required (then TGW_KEY_PEPPER is needed).
Every setting: README.md, "Settings"."""
SERVE_HELP = """The gateway alone, against external Triton(s) and Redis: TGW_TRITON_URL (or TGW_TRITON_URLS,
several), TGW_TRITON_HTTP_URL (inference over HTTP), TGW_CACHE_REDIS_URL (cache), TGW_JOBS_REDIS_URL (jobs
and keys; never evicting). Serves HTTP on TGW_HOST:TGW_PORT and gRPC on TGW_GRPC_PORT with TGW_WORKERS
processes; waits up to TGW_STARTUP_WAIT_S for its dependencies. Images, Compose and k8s run this with
TGW_AUTH=required (TGW_KEY_PEPPER, TGW_ADMIN_TOKEN). Every setting: README.md, "Settings"."""
WORKER_HELP = """A job worker without a web server: reads the job streams in TGW_JOBS_REDIS_URL (else
TGW_CACHE_REDIS_URL), runs each job against TGW_TRITON_URL(S) with TGW_JOB_WORKER_CONCURRENCY in
flight, delivers webhooks; metrics on TGW_JOB_WORKER_METRICS_PORT when set. SIGTERM: stop reading, let running
jobs finish (TGW_DRAIN_S)."""


BENCH_HELP = """Starts its own stack (embedded Triton and Redis, the gateway as `tgw serve`) on free loopback
ports and measures Triton direct against the gateway with the same model and payloads, side by side,
in one run. Defaults: both models, every target, 5 concurrency levels, 1 s warm-up + 4 s per level, wrk
cross-check, a memory soak of up to 180 s: a full run takes about 8 minutes on 2 cores (docs/
performance.md); `--quick` a few seconds. Reports: bench-results/results.{json,csv,md,png} (the plot
only where matplotlib is installed: `make bench` installs it)."""


class BenchHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, each option with its default."""


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("triton-gateway")
    except PackageNotFoundError:  # run from a source tree that was never installed
        release = "unknown"
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="tgw", description=__doc__, formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"tgw (triton-gateway) {release}")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="embedded Redis + Triton + gateway, in the foreground",
                        description=UP_HELP, formatter_class=raw)  # fmt: skip
    up.set_defaults(fn=cmd_up)
    serve = sub.add_parser("serve", help="the gateway only (TGW_TRITON_URL, TGW_REDIS_URL)",
                           description=SERVE_HELP, formatter_class=raw)  # fmt: skip
    serve.set_defaults(fn=cmd_serve)
    worker = sub.add_parser("worker", help="a job worker (TGW_TRITON_URL, TGW_REDIS_URL)",
                            description=WORKER_HELP, formatter_class=raw)  # fmt: skip
    worker.set_defaults(fn=cmd_worker)
    doctor = sub.add_parser(
        "doctor", help="is the stack up, where, which Redis holds keys and jobs (and its eviction policy), "
        "Triton and models ready, settings that look wrong",
    )  # fmt: skip
    doctor.set_defaults(fn=cmd_doctor)
    config = sub.add_parser("config", help="the effective settings (`tgw config show`)")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    config_sub.add_parser(
        "show", help="every setting's effective value and where it came from (environment, .env, default)"
    ).set_defaults(fn=cmd_config)
    from app.convert.cli import add_parser as add_convert_parser

    add_convert_parser(sub)
    from app.auth.cli import add_parser as add_keys_parser

    add_keys_parser(sub)
    from app.auth.usage_cli import add_parser as add_usage_parser

    add_usage_parser(sub)

    from app.traffic_cli import add_parser as add_traffic_parser

    add_traffic_parser(sub)
    bench = sub.add_parser(
        "bench", help="benchmark: Triton direct vs the gateway (embedded stack, reports in bench-results/)",
        description=BENCH_HELP, formatter_class=BenchHelpFormatter,
    )  # fmt: skip
    from app.bench.runner import add_arguments

    add_arguments(bench)
    bench.set_defaults(fn=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.fn(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
