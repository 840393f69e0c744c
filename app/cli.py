"""``tgw``: the command line. ``tgw up`` runs the embedded stack (Redis + Triton + gateway) in the
foreground; ``tgw serve`` runs only the gateway against external Triton and Redis."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Iterator

import uvicorn
from pydantic import ValidationError

from app.launcher import EmbeddedRedis, EmbeddedTriton, LaunchError, ManagedProcess
from app.settings import Settings

logger = logging.getLogger("app.cli")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        lines = [f"  TGW_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()]
        sys.stderr.write("invalid settings:\n" + "\n".join(lines) + "\n")
        raise SystemExit(2) from None


def _uvicorn_config(settings: Settings, **extra: object) -> uvicorn.Config:
    return uvicorn.Config(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=int(settings.drain_s) or None,
        **extra,  # type: ignore[arg-type]
    )


class GatewayServer(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM/SIGINT it handled is not re-raised once it has stopped:
    the caller still has children to stop and an exit code to return."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


async def _serve_with_children(settings: Settings, children: list[ManagedProcess]) -> int:
    """Serve the gateway; if a child server dies, stop everything and say which one and why."""
    server = GatewayServer(_uvicorn_config(settings))
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
    _setup_logging(settings.log_level)
    children: list[ManagedProcess] = []
    redis: EmbeddedRedis | None = None
    triton: EmbeddedTriton | None = None
    try:
        if settings.redis_url is None and settings.cache_enabled:
            redis = EmbeddedRedis(settings.redis_port, settings.state_dir / "redis")
            redis.start()
            children.append(redis.process)
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
        if triton is not None:
            os.environ["TGW_TRITON_URL"] = triton.grpc_url
        logger.info("gateway on http://%s:%d", settings.host, settings.port)
        code = asyncio.run(_serve_with_children(settings, children))
    except LaunchError as exc:
        logger.error("%s", exc)
        code = 1
    except KeyboardInterrupt:
        code = 0
    finally:
        for child in reversed(children):
            child.stop()
    return code


def cmd_serve(_: argparse.Namespace) -> int:
    settings = _load_settings()
    _setup_logging(settings.log_level)
    if settings.workers > 1:
        uvicorn.run(
            "app.main:create_app", factory=True, host=settings.host, port=settings.port,
            workers=settings.workers, log_level=settings.log_level.lower(), loop="uvloop", http="httptools",
            timeout_graceful_shutdown=int(settings.drain_s) or None,
        )  # fmt: skip
        return 0
    server = GatewayServer(_uvicorn_config(settings))
    server.run()
    return 0 if server.started else 1


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
