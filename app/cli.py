"""``tgw``: the command line. ``tgw up`` runs the embedded stack (Redis + Triton + gateway) in the
foreground; ``tgw serve`` runs only the gateway against external Triton and Redis."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from pydantic import ValidationError

from app.launcher import EmbeddedRedis, EmbeddedTriton, LaunchError, ManagedProcess
from app.lifecycle import (
    DependencyUnavailable,
    GracefulServer,
    redact_url,
    run_workers,
    wait_for_dependencies,
)
from app.observability.logging import configure_logging, log_config
from app.server import raise_nofile_limit, server_config
from app.server import run as run_on_server_loop
from app.settings import Settings

logger = logging.getLogger("app.cli")

_SECRET_WORDS = ("secret", "password", "token")


def _setup_logging(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format, settings.log_repeat_interval_s)


def _shown_value(name: str, value: Any) -> str:
    if any(word in name for word in _SECRET_WORDS):
        return "<redacted>"
    if isinstance(value, str) and "://" in value:
        value = redact_url(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _load_settings() -> Settings:
    """Settings from the environment; on a bad value, say which variable, its value and why, exit 2."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
            if loc:
                var = f"TGW_{loc[0].upper()}"
                shown = _shown_value(loc[0], err.get("input"))
                lines.append(f"  {var}={shown}: {err['msg']}")
            else:
                lines.append(f"  {err['msg']}")
        header = "invalid settings (fix these environment variables):\n"
        sys.stderr.write(header + "\n".join(lines) + "\n")
        raise SystemExit(2) from None


def _uvicorn_config(settings: Settings, **extra: object) -> uvicorn.Config:
    """uvicorn with the server guards of ``app.server`` (timeouts, connection cap, uvloop)."""
    raise_nofile_limit()
    return server_config(
        "app.main:create_app",
        settings,
        factory=True,
        log_level=settings.log_level.lower(),
        log_config=log_config(settings.log_level, settings.log_format, settings.log_repeat_interval_s),
        access_log=False,  # app.access logs one structured line per request instead
        timeout_graceful_shutdown=int(settings.drain_s) or None,
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


async def _serve_with_children(settings: Settings, children: list[ManagedProcess]) -> int:
    """Serve the gateway; if a child server dies, stop everything and say which one and why."""
    server = GracefulServer(_uvicorn_config(settings), settings.shutdown_delay_s)
    failed: list[str] = []

    async def watch() -> None:
        while not server.should_exit:
            for child in children:
                if not child.alive():
                    failed.append(
                        f"{child.name} exited unexpectedly with code {child.returncode()}; "
                        f"last log lines ({child.log_path}):\n{child.log_tail()}"
                    )
                    server.should_exit = True
                    return
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch())
    try:
        await server.serve()
    finally:
        watcher.cancel()
    if failed:
        logger.error("stopping the stack: %s", failed[0])
        return 1
    return 0 if server.started else 1


def cmd_up(_: argparse.Namespace) -> int:
    settings = _load_settings()
    if "TGW_SHUTDOWN_DELAY_S" not in os.environ:  # dev stack, no load balancer: Ctrl-C acts at once
        settings = settings.model_copy(update={"shutdown_delay_s": 0.0})
    _setup_logging(settings)
    children: list[ManagedProcess] = []
    redis: EmbeddedRedis | None = None
    jobs_redis: EmbeddedRedis | None = None
    triton: EmbeddedTriton | None = None
    try:
        if settings.redis_url is None and settings.cache_enabled:
            # The cache evicts its least-recently-used answers beyond TGW_REDIS_MAXMEMORY ...
            redis = EmbeddedRedis(
                settings.redis_port, settings.state_dir / "redis", maxmemory=settings.redis_maxmemory,
                policy="allkeys-lru",
            )  # fmt: skip
            redis.start()
            children.append(redis.process)
        if settings.jobs_redis_url is None and settings.redis_url is None:
            # ... and jobs live in their own instance, which never evicts.
            jobs_redis = EmbeddedRedis(
                settings.jobs_redis_port, settings.state_dir / "redis-jobs", policy="noeviction",
                name="redis-server (jobs)",
            )  # fmt: skip
            jobs_redis.start()
            children.append(jobs_redis.process)
        if settings.triton_url is None:
            triton = EmbeddedTriton(
                settings.model_repository,
                settings.triton_http_port,
                settings.triton_grpc_port,
                settings.triton_metrics_port,
                settings.state_dir / "triton",
                model_config_name=settings.triton_model_config_name,
            )
            logger.info("starting Triton on %s (this takes a few seconds)", settings.model_repository)
            triton.start(timeout=settings.triton_startup_timeout_s)
            children.append(triton.process)
        # The gateway (and any uvicorn worker) reads its settings from the environment.
        if redis is not None:
            os.environ["TGW_REDIS_URL"] = redis.url
        if jobs_redis is not None:
            os.environ["TGW_JOBS_REDIS_URL"] = jobs_redis.url
        if triton is not None:
            os.environ["TGW_TRITON_URL"] = triton.grpc_url
            os.environ.setdefault("TGW_TRITON_HTTP_URL", triton.http_url)  # set it blank for gRPC inference
        os.environ.setdefault("TGW_WORKER_IN_PROCESS", "true")  # the embedded default runs jobs too
        logger.info("gateway on http://%s:%d", settings.host, settings.port)
        code = run_on_server_loop(_serve_with_children(settings, children))  # uvloop, as `tgw serve`
    except LaunchError as exc:
        logger.error("%s", exc)
        code = 1
    except KeyboardInterrupt:
        code = 0
    finally:
        if triton is not None:
            triton.stop()  # also its Python-backend stubs and shared-memory regions
        if redis is not None:
            redis.stop()
        if jobs_redis is not None:
            jobs_redis.stop()
    return code


def cmd_serve(_: argparse.Namespace) -> int:
    settings = _load_settings()
    _setup_logging(settings)
    if not _wait_for_dependencies(settings):
        return 1
    config = _uvicorn_config(settings, workers=settings.workers)
    if settings.workers > 1:
        with _multiprocess_metrics_dir():
            return run_workers(config)
    server = GracefulServer(config, settings.shutdown_delay_s)
    server.run()
    return 0 if server.started else 1


async def _run_worker(settings: Settings) -> int:
    """The gateway's core (``build_gateway``: same clients, same inference service) with a worker and the
    webhook dispatcher in it, and no web app. SIGTERM/SIGINT: stop reading, let running jobs finish."""
    from app.gateway import build_gateway

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with build_gateway(settings.model_copy(update={"worker_in_process": True, "drain_s": 0})) as gw:
        worker = gw.jobs.worker
        assert worker is not None
        logger.info("job worker %s running", worker.name)
        await stop.wait()
        logger.info("draining job worker (up to %.0f s)", settings.drain_s)
        await worker.drain(settings.drain_s)
    return 0


def cmd_worker(_: argparse.Namespace) -> int:
    settings = _load_settings()
    _setup_logging(settings)
    if not _wait_for_dependencies(settings):
        return 1
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port, addr=settings.host)
        logger.info("worker metrics on http://%s:%d/metrics", settings.host, settings.worker_metrics_port)
    code: int = run_on_server_loop(_run_worker(settings))
    return code


def cmd_bench(args: argparse.Namespace) -> int:
    from app.bench import runner

    return runner.run(runner.options_from(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tgw", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="embedded Redis + Triton + gateway, in the foreground").set_defaults(fn=cmd_up)
    sub.add_parser("serve", help="the gateway only (TGW_TRITON_URL, TGW_REDIS_URL)").set_defaults(
        fn=cmd_serve
    )
    sub.add_parser("worker", help="a job worker (TGW_TRITON_URL, TGW_REDIS_URL)").set_defaults(fn=cmd_worker)
    from app.convert.cli import add_parser as add_convert_parser

    add_convert_parser(sub)
    bench = sub.add_parser(
        "bench", help="benchmark: Triton direct vs the gateway (embedded stack, reports in bench-results/)"
    )
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
