"""Issue 19 item 3 against the real Triton and Redis: the failed-authentication lockout never refuses a
correct key because others failed from the same address, still throttles the wrong ones, and reads the
client's address from ``X-Forwarded-For`` only when the peer is a trusted proxy (``TGW_TRUSTED_PROXIES``)."""

from __future__ import annotations

import httpx
import pytest

from app.launcher import EmbeddedRedis, EmbeddedTriton
from tests.gateway_server import running_gateway
from tests.integration.test_auth import INFER, auth_settings, bearer, body, make_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _guess(i: int) -> dict[str, str]:
    return {"X-API-Key": f"tgw_{i:012x}_" + "G" * 43}  # well-formed, never issued


def test_a_correct_key_gets_through_a_locked_out_address(
    triton: EmbeddedTriton, redis_server: EmbeddedRedis
) -> None:
    with running_gateway(**auth_settings(triton, redis_server.url)) as url:  # default: 20 failures a minute
        with httpx.Client(base_url=url, timeout=20) as c:
            codes = [c.post(INFER, json=body(), headers=_guess(i)).status_code for i in range(24)]
            assert codes == [401] * 20 + [429] * 4, codes
            fresh = make_key(url)  # created after the lockout began: never verified by this process
            r = c.post(INFER, json=body(), headers=bearer(fresh))
            assert r.status_code == 200, r.text
            assert r.json()["outputs"]["OUTPUT0"] == [[1.0, 2.0]]
            # ... and again once its cache entry is gone (auth_key_cache_s is 1 s here): verified anew
            assert c.post(INFER, json=body(), headers=bearer(make_key(url))).status_code == 200
            # the guesser's wrong keys, a malformed key and no key at all are still throttled
            r = c.post(INFER, json=body(), headers=_guess(99))
            assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60, r.text
            assert "failed authentications" in r.json()["error"]["message"]
            assert c.post(INFER, json=body(), headers={"X-API-Key": "not-a-key"}).status_code == 429
            assert c.post(INFER, json=body()).status_code == 429


def test_forwarded_for_counts_only_from_a_trusted_proxy(
    triton: EmbeddedTriton, redis_server: EmbeddedRedis
) -> None:
    base = auth_settings(triton, redis_server.url, auth_failed_per_minute=3)
    # no trusted proxy (the default): X-Forwarded-For is ignored, so rotating it does not escape the limit
    with running_gateway(**base) as url, httpx.Client(base_url=url, timeout=20) as c:
        codes = [c.post(INFER, json=body(), headers={**_guess(i), "X-Forwarded-For": f"10.0.0.{i}"}).status_code
                 for i in range(6)]  # fmt: skip
        assert codes == [401, 401, 401, 429, 429, 429], codes
    # 127.0.0.1 (the test client) is a trusted proxy: each forwarded client has its own count
    with running_gateway(**base, trusted_proxies="127.0.0.1/32,10.9.0.0/16") as url:
        with httpx.Client(base_url=url, timeout=20) as c:
            one = {"X-Forwarded-For": "203.0.113.7"}
            codes = [c.post(INFER, json=body(), headers={**_guess(i), **one}).status_code for i in range(5)]
            assert codes == [401, 401, 401, 429, 429], codes
            other = {"X-Forwarded-For": "203.0.113.8"}
            assert c.post(INFER, json=body(), headers={**_guess(7), **other}).status_code == 401
            # a spoofed hop left of the real client does not help: the right-most untrusted address counts
            spoofed = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7, 10.9.0.1"}
            assert c.post(INFER, json=body(), headers={**_guess(8), **spoofed}).status_code == 429


def test_trusted_proxies_setting_is_validated() -> None:
    from pydantic import ValidationError

    from app.settings import Settings

    assert Settings(trusted_proxies="10.0.0.0/8, 192.168.1.5").server.trusted_proxies == [
        "10.0.0.0/8",
        "192.168.1.5",
    ]
    with pytest.raises(ValidationError, match="expected an IP address or CIDR"):
        Settings(trusted_proxies="10.0.0.0/8,proxy.local")
