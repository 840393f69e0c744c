"""Building the auth stage for a process (``app.gateway.build_edge``), and the start-up
check that the models accept the priorities the tiers send."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from app.auth.stage import AuthStage, path_class
from app.clients.redis import AutoPipeline, make_redis
from app.settings import Settings, redact_url

logger = logging.getLogger(__name__)


def build_auth(settings: Settings, classify: Callable[[str], str] = path_class) -> AuthStage:
    """The auth stage for the request pipeline (``Pipeline(admission=...)``); its Redis client connects
    lazily, on the first request's loop. ``classify``: the paths' classes (``app.auth.stage.classifier``
    over the doors' route tables)."""
    retry_after_s = settings.server.retry_after_s
    # A held concurrency slot outlives the longest request (its Triton deadline and the drain) by a minute.
    slot_ttl_s = settings.triton.triton_timeout_s + settings.server.drain_s + 60.0
    longest = max([settings.streams.stream_max_duration_s] + [
        float(t.split(":")[3]) for t in settings.auth.auth_tiers if t.count(":") == 3
    ])  # fmt: skip
    stream_slot_ttl_s = longest + settings.server.drain_s + 60.0  # a stream's: its longest life
    if settings.auth.auth != "required":
        logger.warning(
            "authentication is OFF (TGW_AUTH=off): anyone who can reach %s:%d may use every model; "
            "set TGW_AUTH=required for anything but local development", settings.server.host,
            settings.server.port,
        )  # fmt: skip
        return AuthStage(settings.auth, retry_after_s=retry_after_s, slot_ttl_s=slot_ttl_s, classify=classify,
                         stream_slot_ttl_s=stream_slot_ttl_s)  # fmt: skip
    redis = make_redis(
        settings.auth_redis_address, settings.auth.auth_redis_timeout_s, settings.cache.redis_cluster
    )
    submit = None
    if not settings.cache.redis_cluster:
        auto = AutoPipeline(redis, settings.auth.auth_redis_timeout_s)
        submit = auto.submit
    stage = AuthStage(
        settings.auth,
        redis,
        submit,
        retry_after_s=retry_after_s,
        slot_ttl_s=slot_ttl_s,
        classify=classify,
        stream_slot_ttl_s=stream_slot_ttl_s,
    )
    logger.info("authentication required: API keys in %s, verified keys trusted %g s in process",
                redact_url(settings.auth_redis_address), settings.auth.auth_key_cache_s)  # fmt: skip
    return stage


async def stop_auth(stage: AuthStage) -> None:
    await stage.close()
    if stage.redis is not None:
        await stage.redis.aclose()


def check_priorities(stage: AuthStage, configs: dict[str, dict[str, Any]]) -> list[str]:
    """Problems with the priorities the tiers send, per model (Triton's JSON model config): a model
    without ``priority_levels`` ignores them; a priority above its levels is refused by Triton; an
    ensemble does not pass the priority to its steps. Returns the warnings (also logged)."""
    wanted = max(t.priority for t in stage.tiers.values())
    problems: list[str] = []
    for name, cfg in sorted(configs.items()):
        if cfg.get("platform") == "ensemble":
            problems.append(
                f"model {name} is an ensemble: Triton does not pass the request priority to "
                "its steps; give the steps priority_levels and a default_priority_level"
            )
            continue  # fmt: skip
        batching = cfg.get("dynamic_batching") or cfg.get("sequence_batching")
        levels = int((batching or {}).get("priority_levels", 0) or 0)
        if levels == 0:
            problems.append(f"model {name} has no priority_levels: the tiers' priorities are ignored")
        elif levels < wanted:
            problems.append(f"model {name} has priority_levels {levels} but a tier sends priority "
                            f"{wanted}: Triton refuses such requests")  # fmt: skip
    for line in problems:
        logger.warning("%s", line)
    return problems


def check_model_priorities(stage: AuthStage, triton: Any) -> asyncio.Task[list[str]]:
    """At start, in the background (never delays readiness): read every ready model's config from
    Triton and log what ``check_priorities`` finds. Only with TGW_AUTH=required (tiers in use)."""

    async def run() -> list[str]:
        if not stage.enabled:
            return []
        try:
            index = await triton.repository_index()
            configs = {}
            for entry in index:
                if entry.get("state") == "READY" and entry.get("name") not in configs:
                    configs[entry["name"]] = await triton.model_config(entry["name"])
        except Exception as exc:
            logger.warning("could not check the models' priority levels: %s", exc)
            return []
        return check_priorities(stage, configs)

    return asyncio.ensure_future(run())
