"""The address guard: a webhook URL must be http(s) and resolve to public addresses only, so a tenant cannot make
the service call its own internals (the metadata service at 169.254.169.254, a database on 10.0.0.5, the API on
127.0.0.1) unless the deployment allows it (``CTPD_WEBHOOK_ALLOW_PRIVATE_TARGETS``: one machine, or a test with
a local receiver).

The URL is checked when an endpoint is created or changed, and again before each delivery (DNS can change).
A delivery then connects to the very address that passed the check (:func:`pinned_request`), not to whatever
a second lookup answers: a name that resolves to a public address for the check and to 127.0.0.1 for the
connection (DNS rebinding) gets nowhere.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

MAX_URL_LENGTH = 2048
ALLOW_SETTING = "CTPD_WEBHOOK_ALLOW_PRIVATE_TARGETS"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]


class TargetRefused(ValueError):
    """The URL is not one the service may call; the message names the value and the fix."""


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str  # as written, without brackets
    port: int
    addresses: tuple[str, ...]  # the addresses that passed the guard; empty when private targets are allowed


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (A and AAAA), in the resolver's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def why_not_public(address: IPAddress) -> str | None:
    """Why the service may not call ``address`` ("loopback", "private", ...), or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None:
            reason = why_not_public(embedded)
            if reason is not None:
                return f"{reason} (an IPv4 address inside IPv6)"
    checks = (
        ("loopback", address.is_loopback), ("link-local", address.is_link_local),
        ("multicast", address.is_multicast), ("unspecified", address.is_unspecified),
        ("unique-local" if isinstance(address, ipaddress.IPv6Address) and address in _UNIQUE_LOCAL else "private",
         address.is_private),
        ("reserved", address.is_reserved), ("not globally routable", not address.is_global),
    )
    return next((reason for reason, hit in checks if hit), None)


_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")


def check_url(url: str, *, allow_private: bool, resolver: Resolver = resolve) -> Target:
    """The target of ``url``, or :class:`TargetRefused` naming what is wrong and the fix."""
    if len(url) > MAX_URL_LENGTH:
        raise TargetRefused(f"url: longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise TargetRefused(f"url {url!r}: not a valid URL ({error}); use https://host[:port]/path") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise TargetRefused(f"url {url!r}: the scheme must be https (or http), not {parts.scheme or 'missing'!r}")
    host = parts.hostname
    if not host:
        raise TargetRefused(f"url {url!r}: no host; use https://host[:port]/path")
    port = port or (443 if scheme == "https" else 80)
    if allow_private:
        return Target(url, scheme, host, port, ())
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = list(resolver(host, port))
        except (OSError, ValueError) as error:  # ValueError: a NUL, or a label IDNA refuses
            raise TargetRefused(f"url {url!r}: the host {host!r} does not resolve ({error}); use a name with a "
                                "public DNS record") from None
        if not addresses:
            raise TargetRefused(f"url {url!r}: the host {host!r} resolves to no address")
    for address in addresses:
        reason = why_not_public(ipaddress.ip_address(address.split("%", 1)[0]))
        if reason is not None:
            shown = host if literal is not None else f"{host} (resolves to {address})"
            raise TargetRefused(
                f"url {url!r}: {shown} is not a public address ({reason}); the service calls only public "
                f"addresses, so a tenant cannot reach the service's own network. Use a public address, or set "
                f"{ALLOW_SETTING}=true where every endpoint is trusted (one machine, a test with a local receiver)")
    return Target(url, scheme, host, port, tuple(addresses))


def pinned_request(client: httpx.Client, target: Target, content: bytes, headers: dict[str, str]) -> httpx.Request:
    """A POST of ``content`` to the target that connects to the checked address (``target.addresses[0]``) while
    naming the host as written (``Host`` header; for https, TLS SNI and the certificate check). Without checked
    addresses (private targets allowed) it is a plain POST to the URL."""
    if not target.addresses:
        return client.build_request("POST", target.url, content=content, headers=headers)
    url = httpx.URL(target.url)
    address = target.addresses[0]
    default_port = 443 if target.scheme == "https" else 80
    host_header = url.netloc.decode("ascii").rpartition("@")[2]  # host[:port] as written, without userinfo
    extensions: dict[str, Any] = {"sni_hostname": target.host} if target.scheme == "https" else {}
    return client.build_request(
        "POST", url.copy_with(host=address, port=None if target.port == default_port else target.port),
        content=content, headers={**headers, "Host": host_header}, extensions=extensions,
    )
