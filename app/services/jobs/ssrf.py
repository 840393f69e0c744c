"""SSRF guard for webhook URLs: only http(s), only ports 80/443 (plus ``TGW_WEBHOOK_ALLOWED_PORTS``), and the
host must resolve to public addresses only.

Checked at submit time and again right before each delivery; the delivery then connects to the address
vetted here (see ``webhooks.HttpxWebhookSender``), so a DNS answer that changes in between (rebinding)
cannot redirect it to an internal service.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata endpoints (most are also link-local/private; listed so the reason is explicit).
_METADATA = {
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("169.254.170.2"),
    ipaddress.ip_address("100.100.100.200"),
    ipaddress.ip_address("fd00:ec2::254"),
}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UnsafeURL(ValueError):
    """The webhook URL is not allowed; the message says why."""


@dataclass(frozen=True, slots=True)
class VettedTarget:
    scheme: str
    host: str  # as written in the URL (for the Host header and TLS SNI)
    port: int
    path: str  # path + query
    address: str  # the vetted IP to connect to


def unsafe_reason(ip: IPAddress) -> str | None:
    """Why this address must not be contacted, or None when it is a public unicast address."""
    if ip in _METADATA:
        return "a cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d on a dual-stack socket
            return unsafe_reason(ip.ipv4_mapped)
        embedded: IPAddress | None = ip.sixtofour
        if embedded is None and ip.teredo is not None:
            embedded = ip.teredo[1]
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = unsafe_reason(embedded)
            if inner:
                return f"{inner} (embedded in {ip})"
    checks = [
        ("loopback", ip.is_loopback),
        ("private", ip.is_private),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("unspecified", ip.is_unspecified),
    ]
    for name, hit in checks:
        if hit:
            return f"a {name} address"
    if not ip.is_global:
        return "not a globally routable address"
    return None


def literal_ip(host: str) -> IPAddress | None:
    """The address a host names literally, including legacy IPv4 forms such as ``2130706433``,
    ``0x7f.1`` or ``0177.0.0.1`` that ``inet_aton`` (and so many HTTP clients) accept."""
    h = host.strip("[]")
    try:
        return ipaddress.ip_address(h.split("%", 1)[0])
    except ValueError:
        pass
    if h and all(c in "0123456789abcdefxABCDEFX." for c in h) and any(c.isdigit() for c in h):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(h))
        except OSError:
            return None
    return None


def parse_url(url: str) -> tuple[str, str, int, str]:
    if not isinstance(url, str) or len(url) > 2048:
        raise UnsafeURL("expected a URL string of at most 2048 characters")
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:  # e.g. "http://[::1/": an unclosed IPv6 literal
        raise UnsafeURL(f"invalid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeURL(f"only http and https URLs are allowed, not {scheme or 'no scheme'!r}")
    if parts.username or parts.password:
        raise UnsafeURL("credentials in the URL are not allowed")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise UnsafeURL(f"invalid URL: {exc}") from None
    if not host:
        raise UnsafeURL("the URL has no host")
    port = port or (443 if scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port, path


DEFAULT_PORTS = frozenset({80, 443})


async def vet_url(
    url: str, allow_private: bool = False, allowed_ports: frozenset[int] | set[int] = frozenset()
) -> VettedTarget:
    """Parse, resolve and vet; returns where to connect. Raises ``UnsafeURL``. Only ports 80 and 443,
    and those in ``allowed_ports`` (``TGW_WEBHOOK_ALLOWED_PORTS``), may be targeted."""
    scheme, host, port, path = parse_url(url)
    if port not in DEFAULT_PORTS and port not in allowed_ports:
        raise UnsafeURL(f"port {port} is not allowed; expected 80, 443 or one of TGW_WEBHOOK_ALLOWED_PORTS")
    literal = literal_ip(host)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise UnsafeURL(f"the host {host!r} does not resolve: {exc}") from None
        addresses = []
        for info in infos:
            ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if ip not in addresses:
                addresses.append(ip)
        if not addresses:
            raise UnsafeURL(f"the host {host!r} does not resolve")
    if not allow_private:
        # Every address must be public: otherwise a round-robin answer could smuggle an internal one in.
        for ip in addresses:
            reason = unsafe_reason(ip)
            if reason:
                raise UnsafeURL(
                    f"the host {host!r} resolves to {ip}, {reason}; webhooks go to public addresses only"
                    " (a local receiver for development: TGW_WEBHOOK_ALLOW_PRIVATE=true on the gateway, and"
                    " its port in TGW_WEBHOOK_ALLOWED_PORTS)"
                )
    return VettedTarget(scheme, host, port, path, str(addresses[0]))
