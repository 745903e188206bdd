"""Client IP resolution behind proxies, and IP anonymization.

``anonymize_ip`` returns the stored value as a plain ``str | None``; ``anonymize``
wraps the same result in an ``IPDecision`` carrying the rule ("ip.truncate",
"ip.hash", "ip.drop", "ip.full", or "ip.unknown" when there was no address),
for callers that log or count why a value looks the way it does.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SECONDS_PER_DAY = 86_400
HASH_HEX_CHARS = 16


def _unwrap(ip: IPAddress) -> IPAddress:
    # ::ffff:a.b.c.d is an IPv4 client seen through a dual-stack socket; treat it as IPv4
    # so truncation, hashing and trust checks behave the same either way.
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            return ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    return ip


def parse_ip(value: str) -> IPAddress | None:
    """Parse an address literal (zone id stripped, IPv4-mapped unwrapped); None if invalid."""
    text = value.strip()
    if not text or len(text) > 100:
        return None
    try:
        return _unwrap(ipaddress.ip_address(text))
    except ValueError:
        return None


def _parse_xff_entry(entry: str) -> IPAddress | None:
    # Some proxies append ports: "[2001:db8::1]:443" or "203.0.113.7:1234"; both forms are
    # unambiguous, so accept them. Anything else is malformed.
    text = entry.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1 :] and not _is_port(text[end + 1 :])):
            return None
        return parse_ip(text[1:end])
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit() or not _is_port(":" + port):
            return None
        ip = parse_ip(host)
        return ip if isinstance(ip, ipaddress.IPv4Address) else None
    return parse_ip(text)


def _is_port(text: str) -> bool:
    return text.startswith(":") and text[1:].isdigit() and 0 < int(text[1:]) < 65536


def _trusted(ip: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(ip.version == net.version and ip in net for net in trusted)


def client_ip(
    peer: str | None, xff_values: Sequence[str], trusted: Sequence[IPNetwork]
) -> IPAddress | None:
    """Return the client: the peer, or the X-Forwarded-For hop a trusted peer vouches for.

    Several header lines are one list, joined in order (RFC 9110 §5.3). The list is
    walked from the right: each trusted hop vouches for the one before it, and the first
    untrusted hop is the client. Entries left of it were written by the client and may be
    anything, so they are never parsed. An entry at or right of the client that does not
    parse (an empty one included) means a proxy we trust wrote something we cannot read:
    the peer is used.
    """
    peer_ip = parse_ip(peer) if peer else None
    if peer_ip is None:
        return None
    # Only a trusted proxy may speak for someone else.
    if not _trusted(peer_ip, trusted):
        return peer_ip
    furthest = peer_ip
    for entry in reversed(",".join(xff_values).split(",")):
        ip = _parse_xff_entry(entry)
        if ip is None:
            return peer_ip
        if not _trusted(ip, trusted):
            return ip
        furthest = ip
    # Every hop is one of our proxies: the furthest one is the best we know.
    return furthest


def parse_trusted_proxies(spec: str) -> tuple[IPNetwork, ...]:
    """Parse ``OMNIGATE_TRUSTED_PROXIES``: comma-separated CIDRs or addresses."""
    nets: list[IPNetwork] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError as exc:
            raise ValueError(
                f"invalid trusted proxy {item!r}: expected an IP address or CIDR such as "
                f"10.0.0.0/8 or 2001:db8::/32 with no host bits set ({exc})"
            ) from None
        if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped:
            # Addresses are unwrapped before checks, so a mapped range would never match.
            raise ValueError(f"invalid trusted proxy {item!r}: write IPv4 ranges as IPv4")
        nets.append(net)
    return tuple(nets)


@dataclass(frozen=True)
class IPDecision:
    """The value to keep for an address and the rule that produced it."""

    value: str | None
    rule: str


def anonymize_ip(ip: IPAddress | str | None, mode: str, salt: bytes | None = None) -> str | None:
    """Return the anonymized form of ``ip`` for ``mode`` (None for drop or no address)."""
    return anonymize(ip, mode, salt).value


def anonymize(ip: IPAddress | str | None, mode: str, salt: bytes | None = None) -> IPDecision:
    """Anonymize ``ip`` per ``mode`` and say which rule applied."""
    if mode not in ("truncate", "hash", "drop", "full"):
        raise ValueError(f"unknown ip mode {mode!r}")
    if mode == "hash" and not salt:
        # A hash without a secret salt is reversible by enumerating the address space.
        raise ValueError("ip mode 'hash' requires a salt")
    addr = parse_ip(ip) if isinstance(ip, str) else (_unwrap(ip) if ip is not None else None)
    if addr is None:
        return IPDecision(None, "ip.unknown")
    rule = f"ip.{mode}"
    if mode == "drop":
        return IPDecision(None, rule)
    if mode == "full":
        return IPDecision(str(addr), rule)
    if mode == "hash":
        assert salt is not None
        digest = hmac.new(salt, addr.packed, hashlib.sha256).hexdigest()
        return IPDecision("h:" + digest[:HASH_HEX_CHARS], rule)
    prefix = 24 if addr.version == 4 else 48
    net = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
    return IPDecision(str(net.network_address), rule)


def day_of(timestamp: float) -> int:
    """Return the UTC day number of a Unix timestamp (the SaltRing's clock)."""
    return int(timestamp // SECONDS_PER_DAY)


_CHAIN_NEXT = b"omnigate ip salt chain: next day"
_CHAIN_SALT = b"omnigate ip salt chain: salt"


class SaltChain:
    """Daily salts that several processes derive alike, and none can derive backwards.

    A hash chain: ``key(d + 1) = HMAC(key(d), "next day")``, ``salt(d) = HMAC(key(d),
    "salt")``. Processes handed the same ``(day, key)`` derive the same salt for every
    day from then on, so a worker of ``--workers N`` hashes an address as its siblings
    do (one stored value, one rate-limit key). ``advance_to`` overwrites the key: what a
    process holds afterwards yields no salt of an earlier day, so a salt destroyed by
    its ``SaltRing`` stays destroyed. Never stored: it lives in memory and travels
    only from the supervisor to the workers it starts.
    """

    def __init__(self, day: int, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("a salt chain key must be at least 32 bytes")
        self._day = day
        self._key = key

    @classmethod
    def new(cls, day: int, random_bytes: Callable[[int], bytes]) -> SaltChain:
        """A fresh chain starting at ``day``."""
        return cls(day, random_bytes(32))

    @property
    def day(self) -> int:
        """The earliest day whose salt can still be derived."""
        return self._day

    def state(self) -> tuple[int, bytes]:
        """``(day, key)``, to hand to another process (never to a log or a file)."""
        return self._day, self._key

    def advance_to(self, day: int) -> None:
        """Forget every day before ``day``; a day already forgotten changes nothing."""
        while self._day < day:
            self._key = _chain_next(self._key)
            self._day += 1

    def salt_for(self, day: int) -> bytes:
        """The salt of ``day`` (32 bytes), without moving the chain."""
        if day < self._day:
            raise ValueError(f"salt for day {day} is no longer derivable")
        key = self._key
        for _ in range(day - self._day):
            key = _chain_next(key)
        return hmac.new(key, _CHAIN_SALT, hashlib.sha256).digest()


def _chain_next(key: bytes) -> bytes:
    return hmac.new(key, _CHAIN_NEXT, hashlib.sha256).digest()


class SaltRing:
    """Daily-rotated HMAC salts, destroyed 48 hours after their day starts.

    Pure logic: randomness comes from the injected callable (``os.urandom`` in
    production) and time from the day numbers the caller passes in. With a
    ``chain`` the salts come from it instead, so processes sharing the chain agree;
    destroying a day also moves the chain past it.
    """

    KEEP_DAYS = 2

    def __init__(
        self,
        random_bytes: Callable[[int], bytes],
        size: int = 32,
        *,
        chain: SaltChain | None = None,
    ) -> None:
        if size < 16:
            raise ValueError("salt size must be at least 16 bytes")
        if chain is not None and size != 32:
            raise ValueError("a chain's salts are 32 bytes")
        self._random = random_bytes
        self._size = size
        self._chain = chain
        self._salts: dict[int, bytes] = {}
        self._floor: int | None = None  # days below this were destroyed

    def salt_for(self, day: int) -> bytes:
        """Return the salt of ``day``, creating it on first use."""
        if self._floor is not None and day < self._floor:
            # Recreating it would silently yield a different salt; say it is gone instead.
            raise ValueError(f"salt for day {day} was destroyed")
        salt = self._salts.get(day)
        if salt is None:
            salt = self._chain.salt_for(day) if self._chain else self._random(self._size)
            if len(salt) != self._size:
                raise ValueError("random source returned the wrong number of bytes")
            self._salts[day] = salt
        return salt

    def expire(self, now_day: int) -> list[int]:
        """Destroy salts whose day began 48 h or more ago; return the destroyed days."""
        floor = now_day - self.KEEP_DAYS + 1
        gone = [d for d in self._salts if d < floor]
        for d in gone:
            del self._salts[d]
        self._floor = floor if self._floor is None else max(self._floor, floor)
        if self._chain is not None:
            self._chain.advance_to(self._floor)
        return sorted(gone)

    def days(self) -> tuple[int, ...]:
        """Return the days whose salt is still held."""
        return tuple(sorted(self._salts))
