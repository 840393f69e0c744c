"""The one place configuration lives: ``Settings`` reads ``TGW_*`` environment variables.

Built inside ``create_app()`` / the CLI, never at import time, and validated at start-up:
a bad value stops the process with a message naming the variable.

The settings come in groups, one per component that reads them (``settings.server``, ``.triton``,
``.cache``, ``.jobs``, ``.auth``, ``.embedded``, ``.observability``); each group is its own
pydantic-settings model, and a component is handed only its group. Every field reads ``TGW_<FIELD>``; a
field renamed for consistency also reads its old name (``validation_alias``: the new name wins when both
are set). ``Settings(field=...)`` still takes flat keywords (old names too) and routes each to its group,
and ``settings.updated(field=...)`` is the flat ``model_copy``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


_PLACEHOLDERS = ("change-me", "changeme", "change_me", "replace-me", "replaceme", "placeholder", "example",
                 "your-secret", "secret-here", "<")  # fmt: skip
MIN_SECRET_BITS = 96.0


def secret_bits(value: str) -> float:
    """Entropy estimate of a secret from its own character frequencies (Shannon, bits per character times
    length): 64 random hex characters give ~230, ``"x" * 40`` gives 0."""
    import math
    from collections import Counter

    counts = Counter(value)
    n = len(value)
    return -sum(c * math.log2(c / n) for c in counts.values())


def secret_problem(value: str) -> str | None:
    lowered = value.lower()
    for marker in _PLACEHOLDERS:
        if marker in lowered:
            return f"a placeholder (contains {marker!r}), not a secret"
    bits = secret_bits(value)
    if bits < MIN_SECRET_BITS:
        return f"too guessable (~{bits:.0f} bits by its character frequencies; {MIN_SECRET_BITS:.0f}+ needed)"
    return None


# Fields renamed for consistency: new field name -> the old one, whose TGW_ name stays accepted.
RENAMED: dict[str, str] = {}


def _renamed(new: str, old: str) -> AliasChoices:
    """``TGW_<NEW>``, else the old ``TGW_<OLD>`` (the field keeps reading the name deployments set)."""
    RENAMED[new] = old
    return AliasChoices(f"TGW_{new.upper()}", f"TGW_{old.upper()}")


def _check_redis_url(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return value


# Comma-separated lists (``TGW_X=a,b``) and Redis URLs, validated the same way wherever a group has one.
Csv = NoDecode, BeforeValidator(_split_csv)
RedisUrl = Annotated[str | None, AfterValidator(_check_redis_url)]


class _Group(BaseSettings):
    title: ClassVar[str] = ""  # its heading in the README
    # The environment first, then a `.env` file in the working directory (docs: README "Settings").
    model_config = SettingsConfigDict(
        env_prefix="TGW_", env_file=".env", env_file_encoding="utf-8", extra="ignore", validate_default=True,
        populate_by_name=True,
    )  # fmt: skip


class ServerSettings(_Group):
    """The HTTP and gRPC servers (app.server, app.lifecycle, the gRPC front door): listener, body and
    connection limits, drain."""

    title: ClassVar[str] = "Server"  # its heading in the README

    host: str = Field("127.0.0.1", description="address the gateway listens on (0.0.0.0 in containers)")
    port: int = Field(8080, ge=1, le=65535, description="gateway HTTP port")
    workers: int = Field(
        1, ge=1, le=64, description="gateway worker processes; unset: `tgw serve` one per usable core (CPU "
        "affinity and container quota, 1 to 16), `tgw up` half of them (Triton shares the machine; three "
        "quarters with its GPU configs)",
    )  # fmt: skip
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="413 above this request size")
    decode_processes: int = Field(
        1, ge=0, le=64, description="child processes per gateway worker that decode large request bodies "
        "(above 96 KiB) and encode large JSON answers off the event loop; 0 = in a thread of the worker",
    )  # fmt: skip
    loop_beat_ms: float = Field(
        50.0, ge=1.0, le=1000.0, description="heartbeat of the event-loop metrics "
        "(tgw_event_loop_busy_seconds, _lag_seconds); 5 tells every step over 5 ms apart from a busy loop, "
        "at ~3 % of a core per worker idle (50: ~0.5 %)",
    )  # fmt: skip
    server_timing: bool = Field(
        True, description="Server-Timing header (cache, queue, triton, total in ms) on infer answers"
    )
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent with 503 answers")
    drain_s: float = Field(30.0, ge=0, description="how long in-flight requests may finish on SIGTERM")
    shutdown_delay_s: float = Field(
        5.0, ge=0, le=600, description="on SIGTERM, /readyz is 503 this long before the listener closes"
    )
    startup_wait_s: float = Field(
        60.0, ge=0, description="`tgw serve` waits this long for Triton and Redis; 0 = do not wait"
    )
    startup_retry_interval_s: float = Field(2.0, gt=0, description="pause between start-up checks")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request head must arrive within this (from connect or its first byte); "
        "else the connection is closed (408 if a byte came)",
    )  # fmt: skip
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body must arrive within this in total after the head; else 408 "
        "and the connection is closed",
    )  # fmt: skip
    keepalive_timeout_s: int = Field(5, ge=1, description="idle keep-alive connections are closed after this")
    max_header_bytes: int = Field(65536, ge=1024, description="a longer request head is answered 431")
    max_connections: int = Field(
        0, ge=0, description="open connections per process; at the cap the longest-idle one is closed, or "
        "the new one refused (503); 0 = the file-descriptor limit less 10 % (at least 256)",
    )  # fmt: skip
    send_timeout_s: float = Field(
        30.0, gt=0, description="an answer must be drained within this once its client falls behind in "
        "reading; else the connection is dropped with what it buffered",
    )  # fmt: skip
    send_buffer_bytes: int = Field(
        1024 * 1024, ge=16384, description="output written ahead of a client that does not read, per "
        "connection; the rest of the answer waits (and holds the key's in-flight slot) until it drains",
    )  # fmt: skip
    send_buffer_total_bytes: int = Field(
        256 * 1024 * 1024, ge=1024 * 1024, description="answer bytes held for clients that fall behind, per "
        "process; past it the connection stalled longest is dropped",
    )  # fmt: skip
    body_discard_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="after an early answer (413) the rest of the request body is "
        "read and discarded up to this, so the client reads the answer instead of a reset",
    )  # fmt: skip
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated IPs/CIDRs of proxies whose X-Forwarded-For names "
        "the client (its address for the failed-authentication lockout and logs); unset = the peer address",
    )  # fmt: skip
    grpc_enabled: bool = Field(True, description="serve KServe v2 gRPC (inference.GRPCInferenceService)")
    grpc_port: int = Field(
        8081, ge=0, le=65535, description="gateway gRPC port (on TGW_HOST); 0 = any free port (tests)"
    )
    grpc_max_message_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="largest gRPC message received or sent (RESOURCE_EXHAUSTED)"
    )
    grpc_stream_max_in_flight: int = Field(
        32, ge=1, description="unanswered requests per ModelStreamInfer stream; at the bound the gateway "
        "stops reading the stream until answers are taken",
    )  # fmt: skip

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _check_proxies(cls, value: object) -> object:
        items = _split_csv(value)
        for item in items if isinstance(items, list) else []:
            if item == "*":  # every peer (only where nothing but the proxy can reach the gateway)
                continue
            try:
                ipaddress.ip_network(str(item), strict=False)
            except ValueError:
                raise ValueError(f"{item!r}: expected an IP address or CIDR, e.g. 10.0.0.0/8") from None
        return items


class TritonSettings(_Group):
    """The Triton clients (app.clients): addresses, deadlines, channels, retries, routing and ejection,
    batching, shared memory."""

    title: ClassVar[str] = "Triton and routing"  # its heading in the README

    triton_url: str | None = Field(
        None, description="gRPC address host:port of an external Triton; unset = start the embedded one"
    )
    triton_http_url: str | None = Field(
        None, description="[http[s]://]host:port of the same Triton's HTTP endpoint (IPv6 as [addr]:port): "
        "inference goes there (measured cheaper); unset = inference over gRPC too. `tgw up` sets it",
    )  # fmt: skip
    triton_urls: str | None = Field(
        None, description="comma-separated Tritons: `host:8001`, `grpc=host:8001;http=host:8000` or "
        "`dns:name:8001;http=8000` (every address of a headless Service); set = routed over all of them",
    )  # fmt: skip
    triton_timeout_s: float = Field(30.0, gt=0, description="per-call deadline for inference")
    triton_channels: int = Field(1, ge=1, le=32, description="gRPC channels, requests spread round-robin")
    triton_retries: int = Field(2, ge=0, le=10, description="retries on UNAVAILABLE (request not sent)")
    metadata_ttl_s: float = Field(5.0, ge=0, description="how long model metadata is cached")
    triton_resolve_interval_s: float = Field(10.0, gt=0, description="how often `dns:` names are resolved")
    triton_probe_interval_s: float = Field(1.0, gt=0, description="readiness probe interval per endpoint")
    triton_eject_after: int = Field(3, ge=1, description="consecutive failures that eject an endpoint")
    triton_eject_base_s: float = Field(
        1.0, gt=0, description="first ejection time; doubles per ejection in a row (at most 30 s)"
    )
    triton_slow_start_s: float = Field(5.0, ge=0, description="a returning endpoint's share grows over this")
    triton_retry_budget: float = Field(
        0.2, ge=0, le=1, description="retries on another endpoint allowed as a share of requests"
    )
    triton_grpc_keepalive_s: float = Field(
        360.0, ge=10, description="gRPC keepalive ping interval (Triton strikes pings < 300 s apart)"
    )
    triton_grpc_keepalive_without_calls: bool = Field(
        False, description="ping idle channels too (Triton rejects this unless started to permit it)"
    )
    batch_enabled: bool = Field(
        True, description="stack concurrent small requests into one Triton call (dynamic-batching models)"
    )
    batch_window_us: int = Field(
        0, ge=0, le=100_000,
        description="extra wait for a batch to fill; 0 = it takes what queued while a call was in flight",
    )  # fmt: skip
    batch_max_in_flight: int = Field(
        2, ge=1, le=64, validation_alias=_renamed("batch_max_in_flight", "batch_max_inflight"),
        description="batched Triton calls in flight per model",
    )  # fmt: skip
    triton_shm: Literal["off", "system", "cuda"] = Field(
        "off",
        description="system = inputs and outputs of at least TGW_SHM_MIN_BYTES (together) travel between "
        "gateway and Triton through POSIX shared memory, cuda = through CUDA IPC device memory "
        "(cuda-bindings and a visible GPU, else system); same host only",
    )
    shm_min_bytes: int = Field(
        256 * 1024, ge=1024, description="a call's tensors this large (together) travel through shared memory"
    )
    shm_regions: int = Field(8, ge=1, le=256, description="shared-memory regions per gateway process")
    shm_region_bytes: int = Field(
        4 * 1024 * 1024, ge=4096, description="size of each region: a larger call goes through the socket"
    )
    shm_cuda_device: int = Field(
        0, ge=0, description="GPU of the CUDA shared-memory regions (TGW_TRITON_SHM=cuda)"
    )

    @field_validator("triton_url")
    @classmethod
    def _strip_scheme(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        for prefix in ("grpc://", "http://"):
            if value.startswith(prefix):
                value = value[len(prefix) :]
        if ":" not in value:
            raise ValueError("expected host:port of Triton's gRPC endpoint, e.g. triton:8001")
        return value

    @field_validator("triton_http_url")
    @classmethod
    def _http_address(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if "://" not in value:
            value = f"http://{value}"
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError:
            port = None
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or port is None:
            raise ValueError(
                "expected [http[s]://]host:port of Triton's HTTP endpoint, e.g. triton:8000 or https://[::1]:8443"
            )
        return f"{parts.scheme}://{parts.netloc}"

    @field_validator("triton_urls")
    @classmethod
    def _check_triton_urls(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from app.clients.endpoints import parse_triton_urls

        parse_triton_urls(value)
        return value.strip()

    def grpc_address(self, embedded_grpc_port: int) -> str:
        """host:port of Triton's gRPC endpoint: the first of TGW_TRITON_URLS, TGW_TRITON_URL, else the
        embedded Triton's (on ``embedded_grpc_port``)."""
        if self.triton_urls:
            from app.clients.endpoints import parse_triton_urls

            first = parse_triton_urls(self.triton_urls)[0]
            return f"{first.dns_host}:{first.grpc_port}" if first.dns_host else first.address.grpc
        return self.triton_url or f"127.0.0.1:{embedded_grpc_port}"


class CacheSettings(_Group):
    """The response cache (app.services.cache): the cache's Redis, TTL, namespace, the in-process L1."""

    title: ClassVar[str] = "Response cache"  # its heading in the README

    cache_enabled: bool = Field(True, description="false = no Redis response cache at all (X-Cache: BYPASS)")
    cache_redis_url: RedisUrl = Field(
        None, validation_alias=_renamed("cache_redis_url", "redis_url"),
        description="redis:// URL of the cache's Redis; unset = start the embedded redis-server",
    )  # fmt: skip
    redis_cluster: bool = Field(False, description="the Redis URLs (cache, jobs, auth) are a Redis Cluster")
    cache_redis_timeout_s: float = Field(
        0.25, gt=0, validation_alias=_renamed("cache_redis_timeout_s", "redis_timeout_s"),
        description="bound on every cache operation",
    )  # fmt: skip
    cache_ttl_s: int = Field(3600, ge=1, description="lifetime of a cached answer in Redis")
    cache_namespace: str = Field(
        "tgw:cache:v1",
        min_length=1,
        description="key prefix; change it to orphan every cached answer at once",
    )
    cache_exclude_models: Annotated[list[str], *Csv] = Field(
        default_factory=list, description="comma-separated models never cached"
    )
    cache_max_value_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger answers are not cached")
    cache_read_min_hit_ratio: float = Field(
        0.01, ge=0, le=1, description="below this recent hit ratio a model's requests neither look in "
        "Redis nor store their answers there, but for 1 key in 16 (sampled by digest) and repeats; 0 = "
        "always (see docs/performance.md)",
    )  # fmt: skip
    l1_cache_entries: int = Field(
        4096, ge=0, description="hot answers kept in process in front of Redis; 0 = off"
    )
    l1_cache_bytes: int = Field(32 * 1024 * 1024, ge=0, description="bound on the in-process cache's values")
    l1_cache_ttl_s: float = Field(
        60.0, ge=0, description="an in-process entry lives at most this long (and never past its Redis TTL)"
    )


class JobsSettings(_Group):
    """Async jobs, their worker, webhooks and /v1/ws (app.services.jobs): the jobs Redis and limits."""

    title: ClassVar[str] = "Jobs, webhooks and WebSockets"  # its heading in the README

    jobs_redis_url: RedisUrl = Field(
        None, description="redis:// URL of the jobs Redis, an instance that never evicts (maxmemory-policy "
        "noeviction) apart from the cache's (allkeys-lru); unset = TGW_CACHE_REDIS_URL",
    )  # fmt: skip
    jobs_redis_timeout_s: float = Field(
        5.0, gt=0, validation_alias=_renamed("jobs_redis_timeout_s", "job_redis_timeout_s"),
        description="bound on job-store Redis calls",
    )  # fmt: skip
    job_ttl_s: int = Field(
        86400, ge=1, description="jobs, their results and idempotency keys expire after this"
    )
    job_max_attempts: int = Field(
        5, ge=1, description="a job failing this often goes to the dead-letter stream, status failed"
    )
    job_claim_idle_s: float = Field(
        30.0, gt=0, description="a job pending this long on a dead worker is reclaimed (XAUTOCLAIM)"
    )
    job_store_retry_s: float = Field(
        30.0, ge=0, description="a worker retries a job-store step this long while Redis is away (restart)"
    )
    job_max_body_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="413 above this job submission size (apart from TGW_MAX_BODY_BYTES)",
    )
    queue_max: int = Field(
        10000, ge=1, description="above this many pending jobs, submit answers 503 with Retry-After"
    )
    job_stream_max_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="a job on a decoupled model whose responses total more than "
        "this (as JSON) fails with payload_too_large, its request cancelled in Triton",
    )  # fmt: skip
    job_partial_interval_s: float = Field(
        0.02, ge=0, le=5, description="a decoupled job's partial results are pushed to its WebSocket "
        "subscribers in one event per this interval (every response, coalesced)",
    )  # fmt: skip
    job_worker_concurrency: int = Field(
        4, ge=1, le=256, validation_alias=_renamed("job_worker_concurrency", "worker_concurrency"),
        description="jobs one worker process runs at once",
    )  # fmt: skip
    job_worker_in_process: bool = Field(
        False, validation_alias=_renamed("job_worker_in_process", "worker_in_process"),
        description="run a job worker inside the gateway (tgw up: on)",
    )  # fmt: skip
    job_worker_metrics_port: int | None = Field(
        None, ge=1, le=65535, validation_alias=_renamed("job_worker_metrics_port", "worker_metrics_port"),
        description="`tgw worker` serves Prometheus metrics on this port when set",
    )  # fmt: skip
    webhook_secret: str | None = Field(None, description="whsec_<base64>; several separated by spaces")
    webhook_allow_private: bool = Field(
        False, description="development and tests only: allow webhooks to loopback/private addresses"
    )
    webhook_allowed_ports: Annotated[list[Annotated[int, Field(ge=1, le=65535)]], *Csv] = Field(
        default_factory=list, description="comma-separated ports webhooks may target besides 80 and 443"
    )
    webhook_schedule_s: Annotated[list[float], *Csv] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0],
        description="comma-separated delays between webhook attempts (default ~27 h over 8 attempts)",
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=120, description="bound on one whole delivery (connect, send, answer)"
    )
    webhook_first_byte_s: float = Field(
        5.0, gt=0, le=120, description="a receiver's status and headers must arrive within this (from the "
        "start of the delivery); the body is then read for at most 1 s",
    )  # fmt: skip
    webhook_progress_interval_s: float = Field(
        1.0,
        gt=0,
        description="a job that asks for job.progress webhooks gets at most one per this "
        "interval, carrying every partial result since the previous one",
    )
    webhook_max_response_bytes: int = Field(65536, ge=0, description="response bytes read from a receiver")
    webhook_concurrency: int = Field(
        32, ge=1, le=1024, description="webhook deliveries in flight per dispatcher"
    )
    webhook_max_per_host: int = Field(
        4, ge=1, description="deliveries in flight to one receiver host; more wait for a slot of their own"
    )
    ws_max_frame_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger client frames: error")
    ws_max_in_flight: int = Field(32, ge=1, description="concurrent requests per /v1/ws socket")
    ws_send_queue: int = Field(256, ge=1, description="frames buffered per socket before it is dropped")
    ws_heartbeat_s: float = Field(20.0, gt=0, description="heartbeat frame interval on idle sockets")


class AuthSettings(_Group):
    """Keys, limits and tenants (app.auth): the key store, tiers, defaults of new keys."""

    title: ClassVar[str] = "Keys, limits and tenants"  # its heading in the README

    auth: Literal["required", "off"] = Field(
        "off", description="required = every route but /healthz, /readyz needs a key; off = open (refused "
        "on a non-loopback TGW_HOST unless TGW_AUTH_OFF_ALLOW_PUBLIC); images, compose and k8s set required",
    )  # fmt: skip
    auth_off_allow_public: bool = Field(
        False, description="allow TGW_AUTH=off on a non-loopback address (you have auth in front of it)"
    )
    key_pepper: str | None = Field(
        None, min_length=32, description="server secret keys are HMAC-SHA256'd with (32+ random chars: "
        "placeholders and guessable values are refused, e.g. `openssl rand -hex 32`); required "
        "with TGW_AUTH=required and for `tgw keys`; changing it invalidates every key",
    )  # fmt: skip
    admin_token: str | None = Field(
        None, min_length=32, description="admin credential (Bearer/X-API-Key) for /metrics, /v1/admin/*, "
        "/v2/repository/*, /v1/jobs/stats; keys of tier `admin` work too",
    )  # fmt: skip
    auth_redis_url: RedisUrl = Field(
        None, description="redis:// URL of the key store and limits; it must never evict keys (not an "
        "allkeys-lru cache): unset = the jobs Redis (TGW_JOBS_REDIS_URL) if set, else TGW_CACHE_REDIS_URL",
    )  # fmt: skip
    auth_redis_timeout_s: float = Field(0.25, gt=0, description="bound on every key/limit Redis call")
    auth_tiers: Annotated[list[str], *Csv] = Field(
        default_factory=lambda: ["high:1:60", "standard:2:30"],
        description="tier:triton_priority:max_timeout_s[:max_stream_s], comma-separated; priority 1 is "
        "Triton's highest; max_stream_s bounds a stream's life (default TGW_STREAM_MAX_DURATION_S)",
    )
    auth_default_tier: str = Field("standard", description="tier of a key created without --tier")
    auth_default_rps: float = Field(20.0, gt=0, description="request rate of a key created without --rps")
    auth_default_burst: int = Field(40, ge=1, description="burst of a key created without --burst")
    auth_default_concurrency: int = Field(
        16, ge=0, description="in-flight requests per key (0 = unbounded) unless --concurrency"
    )
    auth_default_daily_quota: int = Field(0, ge=0, description="requests per UTC day per key; 0 = none")
    auth_key_cache_s: float = Field(
        5.0, ge=0, le=60, description="a verified key is trusted in process this long: revocation bound"
    )
    auth_stale_key_s: float = Field(
        600.0, ge=0, description="Redis down: keys verified within this long keep working (local limits)"
    )
    auth_failed_per_minute: int = Field(
        20, ge=1, description="failed authentications per client address per minute before 429"
    )
    auth_ws_per_key: int = Field(8, ge=1, description="open WebSockets per key (across replicas)")
    auth_ws_ticket_s: int = Field(30, ge=5, le=300, description="lifetime of a single-use WebSocket ticket")
    cache_scope: Literal["shared", "tenant"] = Field(
        "shared", description="shared (default) or tenant: one cached answer per tenant (docs/auth.md)"
    )
    usage_enabled: bool = Field(
        True, description="meter every inference request per tenant and key in Redis (TGW_AUTH_REDIS_URL's "
        "instance) and enforce monthly budgets (docs/usage.md)",
    )  # fmt: skip
    usage_flush_interval_s: float = Field(
        1.0, gt=0, le=60, description="usage counters are written to Redis this often (and at a graceful "
        "stop): a killed process loses at most this much of its metering",
    )  # fmt: skip
    usage_retention_days: int = Field(
        90, ge=1, le=3650, description="hourly usage buckets are kept this long"
    )

    @field_validator("key_pepper", "admin_token")
    @classmethod
    def _real_secret(cls, value: str | None) -> str | None:
        """Refuse the deploy files' placeholders and values a guesser could reach (see secret_problem)."""
        if value is None:
            return None
        problem = secret_problem(value)
        if problem:
            raise ValueError(f"{problem}; generate one with `openssl rand -hex 32`")
        return value

    @field_validator("auth_tiers")
    @classmethod
    def _check_tiers(cls, value: list[str]) -> list[str]:
        for item in value:
            parts = item.split(":")
            ok = len(parts) in (3, 4) and parts[0] and parts[1].isdigit() and int(parts[1]) >= 1
            try:
                ok = ok and all(float(p) > 0 for p in parts[2:])
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(
                    f"{item!r}: expected tier:priority:max_timeout_s[:max_stream_s], e.g. standard:2:30:600"
                )
        return value

    @model_validator(mode="after")
    def _default_tier_known(self) -> AuthSettings:
        if self.auth_default_tier not in {t.split(":")[0] for t in self.auth_tiers}:
            raise ValueError(f"TGW_AUTH_DEFAULT_TIER={self.auth_default_tier!r} is not in TGW_AUTH_TIERS")
        return self


class EmbeddedSettings(_Group):
    """The embedded stack of `tgw up` (app.launcher): ports, model repository, state dir, start-up."""

    title: ClassVar[str] = "Embedded stack (`tgw up`)"  # its heading in the README

    state_dir: Path = Field(PROJECT_ROOT / ".tgw", description="where the embedded stack keeps its files")
    model_repository: Annotated[list[Path], *Csv] = Field(
        default_factory=lambda: [PROJECT_ROOT / "model_repository"],
        description="comma-separated model repositories for the embedded Triton",
    )
    triton_model_config_name: str = Field(
        "auto",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="embedded Triton loads configs/<name>.pbtxt where a model has one; auto = `gpu` where "
        "a GPU is visible (and PyTorch installed), else `cpu`",
    )
    triton_startup_timeout_s: float = Field(
        120.0, gt=0, description="how long `tgw up` waits for the embedded Triton to load every model"
    )
    embedded_tritons: int = Field(
        1, ge=1, le=16, description="`tgw up`: embedded Tritons on consecutive ports, all routed to"
    )
    triton_http_port: int = Field(8000, ge=1, le=65535, description="embedded Triton HTTP port")
    triton_grpc_port: int = Field(8001, ge=1, le=65535, description="embedded Triton gRPC port")
    triton_metrics_port: int = Field(8002, ge=1, le=65535, description="embedded Triton metrics port")
    cache_redis_port: int = Field(
        6379, ge=1, le=65535, validation_alias=_renamed("cache_redis_port", "redis_port"),
        description="embedded cache Redis port",
    )  # fmt: skip
    cache_redis_maxmemory: str = Field(
        "256mb", pattern=r"^\d+(?:[kmg]b?)?$",
        validation_alias=_renamed("cache_redis_maxmemory", "redis_maxmemory"),
        description="maxmemory of the embedded cache Redis (evicts least-recently-used answers beyond it)",
    )  # fmt: skip
    jobs_redis_port: int = Field(6380, ge=1, le=65535, description="embedded jobs Redis port (`tgw up`)")
    supervise_max_restarts: int = Field(
        5, ge=0, description="`tgw up` restarts a dead child; this many crashes within 60 s stop the stack"
    )

    def embedded_triton_ports(self, i: int) -> tuple[int, int, int]:
        """HTTP, gRPC and metrics ports of the i-th embedded Triton (each next one 3 ports higher)."""
        return self.triton_http_port + 3 * i, self.triton_grpc_port + 3 * i, self.triton_metrics_port + 3 * i


class StreamSettings(_Group):
    """Streamed answers (app.services.streams): what a stream may buffer, how long it may last, which
    completed streams the cache keeps."""

    title: ClassVar[str] = "Streaming"  # its heading in the README

    stream_buffer_responses: int = Field(
        256, ge=1, description="responses one stream holds for a consumer that reads slower than Triton "
        "answers; past it the stream is cancelled in Triton and ends with a stream_overflow error",
    )  # fmt: skip
    stream_buffer_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="bound on the bytes of those held responses (the same end)"
    )
    stream_max_duration_s: float = Field(
        600.0, gt=0, description="longest a stream may last, for tiers that do not set their own "
        "(TGW_AUTH_TIERS' fourth field); past it the stream is cancelled in Triton (504 triton_timeout)",
    )  # fmt: skip
    stream_cache_max_bytes: int = Field(
        1024 * 1024, ge=0, description="a completed stream whose responses total at most this is cached "
        "and replayed to an identical request; 0 = streams are never cached",
    )  # fmt: skip


class TrafficSettings(_Group):
    """Traffic policies (app.services.traffic): canary weights, shadow traffic, promotion and rollback. The
    policies live in the keys' Redis (TGW_AUTH_REDIS_URL, else the jobs', else the cache's)."""

    title: ClassVar[str] = "Traffic policies"  # its heading in the README

    traffic_enabled: bool = Field(
        True, description="apply the models' traffic policies (tgw traffic, /v1/admin/models/{m}/traffic)"
    )
    traffic_poll_interval_s: float = Field(
        0.5, gt=0, le=5, description="how often each replica checks the policies' revision in Redis (a "
        "change applies everywhere within about this) and flushes the evidence it gathered",
    )  # fmt: skip
    traffic_shadow_max_in_flight: int = Field(
        8, ge=1, description="shadow calls under way per replica; a sampled request past it is not shadowed "
        "(counted as dropped)",
    )  # fmt: skip
    traffic_evaluate_interval_s: float = Field(
        1.0, gt=0, description="how often the replica holding the lease tests promote/rollback conditions"
    )
    traffic_lease_s: float = Field(
        5.0, gt=0, description="the evaluation lease: another replica takes over this long after its holder "
        "stopped renewing it",
    )  # fmt: skip
    traffic_latency_samples: int = Field(
        1000, ge=10, description="latency samples kept per version for the p99 of promote/rollback conditions"
    )


class ObservabilitySettings(_Group):
    """Logs, metrics and tracing (app.observability)."""

    title: ClassVar[str] = "Observability"  # its heading in the README

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL"
    )
    log_format: Literal["json", "text"] = Field("json", description="json (one object per line) or text")
    log_repeat_interval_s: float = Field(
        10.0, ge=0, description="a warning or error from one place is logged once per interval, the next "
        "line carrying repeated=<count>; 0 = off",
    )  # fmt: skip
    access_log_sample: float = Field(
        1.0, ge=0, le=1, description="share of answered requests (status below 400) written to the access "
        "log, evenly spaced; errors and refusals are always logged; 0 = errors only",
    )  # fmt: skip
    metrics_enabled: bool = Field(True, description="serve GET /metrics (Prometheus)")
    otel_endpoint: str | None = Field(None, description="OTLP/gRPC endpoint, e.g. http://otel-collector:4317")
    otel_service_name: str = Field("triton-gateway", description="service.name of the OpenTelemetry resource")

    @field_validator("otel_endpoint")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value.strip() if value and value.strip() else None


GROUPS: dict[str, type[_Group]] = {
    "server": ServerSettings,
    "triton": TritonSettings,
    "cache": CacheSettings,
    "jobs": JobsSettings,
    "auth": AuthSettings,
    "embedded": EmbeddedSettings,
    "streams": StreamSettings,
    "traffic": TrafficSettings,
    "observability": ObservabilitySettings,
}


class SettingField(NamedTuple):
    env: str  # TGW_<FIELD>
    group: str
    name: str
    info: FieldInfo
    old_env: str | None  # the name it had before a rename, still accepted


def setting_fields() -> Iterator[SettingField]:
    """Every setting, group by group: its variable, group, field and the old variable where renamed."""
    for group, model in GROUPS.items():
        for name, info in model.model_fields.items():
            old = RENAMED.get(name)
            old_env = f"TGW_{old.upper()}" if old else None
            yield SettingField(f"TGW_{name.upper()}", group, name, info, old_env)


# Flat keyword (field name, or the old name of a renamed field) -> (group, field).
_FLAT: dict[str, tuple[str, str]] = {}
for _f in setting_fields():
    _FLAT[_f.name] = (_f.group, _f.name)
    if _f.old_env:
        _FLAT[_f.old_env.removeprefix("TGW_").lower()] = (_f.group, _f.name)


def env_names() -> set[str]:
    """Every TGW_* name a setting reads (the old names of renamed ones included)."""
    return {n for f in setting_fields() for n in (f.env, f.old_env) if n}


def _route(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat keywords -> keywords per group (unknown ones are ignored, as the environment's are)."""
    routed: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    for key, value in values.items():
        if key in _FLAT:
            group, name = _FLAT[key]
            routed[group][name] = value
    return routed


class Settings(BaseModel):
    """Every group, each read from the environment (then `.env`) on construction.

    ``Settings()`` reads all of them; ``Settings(port=9000, redis_url=...)`` takes flat keywords (a field's
    name, or the old name of a renamed one) and routes each to its group, where it wins over the
    environment; a group may also be given whole (``Settings(cache=CacheSettings(...))``). ``_env_file``
    and the other ``_``-keywords of pydantic-settings go to every group. Errors of all groups are raised
    together, each located at its field (or the variable it was read from), as one flat Settings did.
    """

    server: ServerSettings
    triton: TritonSettings
    cache: CacheSettings
    jobs: JobsSettings
    auth: AuthSettings
    embedded: EmbeddedSettings
    streams: StreamSettings
    traffic: TrafficSettings
    observability: ObservabilitySettings

    def __init__(self, **values: Any) -> None:
        options = {k: values.pop(k) for k in list(values) if k.startswith("_")}
        # A group given whole (a model or a dict); `auth="required"` is the field TGW_AUTH, not the group.
        given = {g: values.pop(g) for g in GROUPS if isinstance(values.get(g), dict | _Group)}
        routed = _route(values)
        groups: dict[str, Any] = {}
        errors: list[Any] = []
        for name, model in GROUPS.items():
            if isinstance(given.get(name), model):
                groups[name] = given[name]
                continue
            kwargs = {**(given.get(name) or {}), **routed[name]}
            try:
                groups[name] = model(**options, **kwargs)
            except ValidationError as exc:
                errors += exc.errors(include_url=False)
        if errors:
            details = [{"type": e["type"], "loc": e["loc"], "input": e["input"], "ctx": e.get("ctx", {})}
                       for e in errors]  # fmt: skip
            raise ValidationError.from_exception_data("Settings", details)  # type: ignore[arg-type]
        super().__init__(**groups)

    def updated(self, **changes: Any) -> Settings:
        """A copy with flat ``changes`` (field names, as ``Settings(...)`` takes them) in their groups;
        not validated again, like ``model_copy``."""
        routed = _route(changes)
        return self.model_copy(update={
            g: getattr(self, g).model_copy(update=c) for g, c in routed.items() if c
        })  # fmt: skip

    @model_validator(mode="after")
    def _distinct_ports(self) -> Settings:
        if self.triton.triton_url is None and self.triton.triton_urls is None:
            ports = [self.server.port]
            for i in range(self.embedded.embedded_tritons):
                ports += list(self.embedded.embedded_triton_ports(i))
            if self.server.grpc_enabled and self.server.grpc_port:
                ports.append(self.server.grpc_port)
            if self.cache.cache_redis_url is None:
                ports.append(self.embedded.cache_redis_port)
            if self.jobs.jobs_redis_url is None:
                ports.append(self.embedded.jobs_redis_port)
            if len(set(ports)) != len(ports):
                raise ValueError(f"the gateway and the embedded servers need distinct ports, got {ports}")
        return self

    @model_validator(mode="after")
    def _auth_off_only_on_loopback(self) -> Settings:
        auth, host = self.auth, self.server.host
        if auth.auth == "off" and not auth.auth_off_allow_public and not is_loopback(host):
            raise ValueError(
                f"TGW_AUTH=off on the non-loopback address {host!r} would expose every model to "
                "anyone: set TGW_AUTH=required (and TGW_KEY_PEPPER), or TGW_AUTH_OFF_ALLOW_PUBLIC=true "
                "if something in front of the gateway authenticates"
            )
        return self

    @property
    def triton_grpc_address(self) -> str:
        return self.triton.grpc_address(self.embedded.triton_grpc_port)

    @property
    def cache_redis_address(self) -> str:
        return self.cache.cache_redis_url or f"redis://127.0.0.1:{self.embedded.cache_redis_port}/0"

    @property
    def jobs_redis_address(self) -> str:
        """Where jobs live: TGW_JOBS_REDIS_URL, else the cache's Redis (one instance: see docs/deploy.md)."""
        return self.jobs.jobs_redis_url or self.cache_redis_address

    @property
    def auth_redis_address(self) -> str:
        """Keys and limits live where nothing is evicted: TGW_AUTH_REDIS_URL, else the jobs Redis."""
        return self.auth.auth_redis_url or self.jobs_redis_address


def env_of(loc: tuple[int | str, ...]) -> str | None:
    """The variable a validation error's location names: a field (``port``), or the name it was read
    under (``tgw_redis_url``, an alias); None for a check across fields."""
    import os

    names = [str(p) for p in loc if not isinstance(p, int)]
    if not names:
        return None
    var = names[0].upper() if names[0].lower().startswith("tgw_") else f"TGW_{names[0].upper()}"
    old = RENAMED.get(var.removeprefix("TGW_").lower())
    if old and var not in os.environ and f"TGW_{old.upper()}" in os.environ:
        return f"TGW_{old.upper()}"  # read under its old name (pydantic names the first alias)
    return var


def settings_markdown() -> str:
    """The README's settings tables (``python -m app.settings``): one per group, in the order of this file."""
    rows: list[str] = []
    for group, model in GROUPS.items():
        if rows:
            rows.append("")
        rows += [f"#### {model.title} (`settings.{group}`)", ""]
        rows += ["| variable | default | meaning |", "|---|---|---|"]
        for f in setting_fields():
            if f.group != group:
                continue
            info = f.info
            default = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
            if isinstance(default, list):
                default = ",".join(str(d) for d in default)
            shown = "unset" if default in (None, "") else str(default).replace(f"{PROJECT_ROOT}/", "")
            alias = f" (also read as `{f.old_env}`)" if f.old_env else ""
            rows.append(f"| `{f.env}`{alias} | `{shown}` | {info.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    sys.stdout.write(settings_markdown() + "\n")


def redact_url(url: str) -> str:
    """``url`` with its password shown as ``***`` (for logs and messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
