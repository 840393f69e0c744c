"""Webhook signing (checked by the reference Standard Webhooks library) and the SSRF address rules."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from app.services.jobs.ssrf import UnsafeURL, literal_ip, parse_url, unsafe_reason, vet_url
from app.services.jobs.webhooks import _retry_after, parse_secrets, sign

SECRET_A = "whsec_" + base64.b64encode(b"a" * 32).decode()
SECRET_B = "whsec_" + base64.b64encode(b"b" * 24).decode()


def test_signature_verifies_with_standardwebhooks_for_every_rotated_secret() -> None:
    keys = parse_secrets(f"{SECRET_A} {SECRET_B}")
    body = b'{"type":"job.succeeded","data":{"id":"x"}}'
    import time

    ts = int(time.time())
    headers = {
        "webhook-id": "msg_x",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(keys, "msg_x", ts, body),
    }
    for secret in (SECRET_A, SECRET_B):
        assert Webhook(secret).verify(body, headers) == {"type": "job.succeeded", "data": {"id": "x"}}
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"c" * 32).decode()).verify(body, headers)
    with pytest.raises(ValueError):
        parse_secrets("whsec_not*base64")


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
        "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254",
        "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "2002:7f00:1::", "2002:a00:1::",
        "2001:0:4136:e378:8000:63bf:80ff:fffe", "64:ff9b::7f00:1", "100.100.100.200",
    ],
)  # fmt: skip
def test_internal_addresses_are_refused(ip: str) -> None:
    assert unsafe_reason(ipaddress.ip_address(ip)) is not None


@pytest.mark.parametrize("ip", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(ip: str) -> None:
    assert unsafe_reason(ipaddress.ip_address(ip)) is None


@pytest.mark.parametrize(
    "host", ["2130706433", "0x7f.1", "0177.0.0.1", "0x7f000001", "127.1", "[::ffff:7f00:1]"]
)
def test_encoded_ipv4_forms_are_decoded(host: str) -> None:
    ip = literal_ip(host)
    assert ip is not None and unsafe_reason(ip) is not None


async def test_vet_url_rules() -> None:
    for url in [
        "ftp://example.com/x",
        "file:///etc/passwd",
        "http://user:pw@8.8.8.8/",
        "http:///x",
        "gopher://a",
    ]:
        with pytest.raises(UnsafeURL):
            await vet_url(url)
    with pytest.raises(UnsafeURL, match="port 8443 is not allowed"):
        await vet_url("https://8.8.8.8:8443/hook?x=1")
    for url in ["http://8.8.8.8:6379/", "http://8.8.8.8:22/", "https://[::1/", "http://[::1/"]:
        with pytest.raises(UnsafeURL):
            await vet_url(url)
    assert (await vet_url("http://8.8.8.8/")).port == 80
    target = await vet_url("https://8.8.8.8:8443/hook?x=1", allowed_ports={8443})
    assert (target.scheme, target.host, target.port, target.path, target.address) == (
        "https",
        "8.8.8.8",
        8443,
        "/hook?x=1",
        "8.8.8.8",
    )
    with pytest.raises(UnsafeURL, match="loopback"):
        await vet_url("http://localhost:9/", allowed_ports={9})
    with pytest.raises(UnsafeURL, match="port 9 is not allowed"):  # private allowed, the port is not
        await vet_url("http://localhost:9/", allow_private=True)
    target = await vet_url("http://localhost:9/", allow_private=True, allowed_ports={9})
    assert target.address in ("127.0.0.1", "::1")
    assert parse_url("http://EXAMPLE.com")[1:] == ("example.com", 80, "/")


def test_retry_after_parsing() -> None:
    assert _retry_after("7") == 7.0
    assert _retry_after(None) is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


async def test_sender_vets_again_at_delivery_time() -> None:
    import httpx

    from app.services.jobs.webhooks import HttpxWebhookSender

    async with httpx.AsyncClient() as client:
        result = await HttpxWebhookSender(client, False, 1024, 5.0, frozenset({9})).send(
            "http://localhost:9/x", b"{}", {}
        )
    assert result.refused and result.status_code is None and "loopback" in (result.error or "")
