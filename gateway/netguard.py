"""Where a tenant-supplied upstream may send the gateway: public addresses only.

A tenant's own upstream URL makes the gateway send requests on the tenant's behalf
(server-side request forgery). The URL is checked when it is set (admin_tenant), and
every connection to it goes through `PublicOnlyResolver`, so a name re-pointed
afterwards at a private address (DNS rebinding) reaches nothing either.

ALLOW_HTTP is a development and test switch, never for production: it accepts plain
http AND turns the private-address checks off, so that the tests' fake upstream on
http://127.0.0.1 can be used.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

log = logging.getLogger("omnigate.upstream")

ALLOW_HTTP = False
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable, including the IPv4 address inside a mapped, 6to4 or NAT64 one."""
    if isinstance(addr, ipaddress.IPv6Address):
        inner = addr.ipv4_mapped or addr.sixtofour
        if inner is None and addr in _NAT64:
            inner = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if inner is not None and not inner.is_global:
            return False
    return addr.is_global


def public_text(host: str) -> bool:
    """`is_public` for an address written as text (a zone suffix ignored); False if not one."""
    try:
        return is_public(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        return False


class PublicOnlyResolver(AbstractResolver):
    """Resolves as usual, then keeps only the public addresses; none left is an error."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The public addresses of `host`; OSError when it has none."""
        found = await self._inner.resolve(host, port, family)
        public = [r for r in found if public_text(r["host"])]
        if not public:
            # the host name is the tenant's configuration, not visitor data, but stays out
            log.warning("tenant upstream refused: its name resolves to no public address")
            raise OSError("the upstream host resolves to no public address")
        return public

    async def close(self) -> None:
        """Close the wrapped resolver."""
        await self._inner.close()
