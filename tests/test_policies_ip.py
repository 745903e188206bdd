"""Client IP resolution behind proxies, anonymization and daily salts."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import itertools

import pytest

from policies import (
    IPDecision,
    SaltChain,
    SaltRing,
    anonymize,
    anonymize_ip,
    client_ip,
    day_of,
    parse_ip,
    parse_trusted_proxies,
)

TRUSTED = parse_trusted_proxies("10.0.0.0/8, 2001:db8:ffff::/48, 192.0.2.1")


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("203.0.113.7", [], "203.0.113.7"),
        ("2001:db8:1::7", [], "2001:db8:1::7"),
        ("::ffff:203.0.113.7", [], "203.0.113.7"),
        ("fe80::1%eth0", [], "fe80::1"),
        (None, [], None),
        ("not-an-ip", [], None),
        # Untrusted peers cannot speak for anyone else.
        ("203.0.113.7", ["198.51.100.1"], "203.0.113.7"),
        ("2001:db8:1::7", ["198.51.100.1"], "2001:db8:1::7"),
        # A trusted proxy vouches for the hop on its left.
        ("10.0.0.5", ["198.51.100.1"], "198.51.100.1"),
        ("::ffff:10.0.0.5", ["198.51.100.1"], "198.51.100.1"),
        ("2001:db8:ffff::2", ["2001:db8:1::9"], "2001:db8:1::9"),
        ("10.0.0.5", ["2001:db8:1::9"], "2001:db8:1::9"),
        # Chains: skip trusted hops from the right; spoofed left-most entries are ignored.
        ("10.0.0.5", ["6.6.6.6, 198.51.100.1, 10.0.0.9"], "198.51.100.1"),
        ("10.0.0.5", ["1.1.1.1, 6.6.6.6, 198.51.100.1, 192.0.2.1, 10.1.2.3"], "198.51.100.1"),
        ("10.0.0.5", ["10.9.9.9, 198.51.100.1"], "198.51.100.1"),
        ("10.0.0.5", ["::ffff:198.51.100.1"], "198.51.100.1"),
        ("10.0.0.5", ["fe80::abcd%eth1"], "fe80::abcd"),
        ("10.0.0.5", ["[2001:db8:1::9]:443"], "2001:db8:1::9"),
        ("10.0.0.5", ["198.51.100.1:5555"], "198.51.100.1"),
        ("10.0.0.5", ["  198.51.100.1  "], "198.51.100.1"),
        # All hops trusted: the furthest proxy is the best we know.
        ("10.0.0.5", ["10.0.0.8, 10.0.0.9"], "10.0.0.8"),
        # Several XFF header lines are one list, in order (RFC 9110 section 5.3).
        ("10.0.0.5", ["198.51.100.1", "6.6.6.6"], "6.6.6.6"),
        ("10.0.0.5", ["6.6.6.6, 198.51.100.1", "10.0.0.9"], "198.51.100.1"),
        ("10.0.0.5", ["garbage", "198.51.100.1"], "198.51.100.1"),
        ("10.0.0.5", ["", "198.51.100.1"], "198.51.100.1"),
        # Whatever the client wrote left of its own hop is never parsed (nginx's
        # proxy_add_x_forwarded_for appends the client to the header it sent).
        ("10.0.0.5", ["garbage, 198.51.100.7"], "198.51.100.7"),
        ("10.0.0.5", ["unknown, , [::1, 198.51.100.7, 10.0.0.9"], "198.51.100.7"),
        ("10.0.0.5", ["garbage, 198.51.100.7, 10.0.0.9, 192.0.2.1"], "198.51.100.7"),
        # Malformed entries at or right of the client: use the peer.
        ("10.0.0.5", ["198.51.100.1, garbage"], "10.0.0.5"),
        ("10.0.0.5", ["198.51.100.1", "garbage"], "10.0.0.5"),
        ("10.0.0.5", ["198.51.100.1, garbage, 10.0.0.9"], "10.0.0.5"),
        ("10.0.0.5", ["garbage, 10.0.0.9"], "10.0.0.5"),
        ("10.0.0.5", ["198.51.100.1,,10.0.0.9"], "10.0.0.5"),
        ("10.0.0.5", [""], "10.0.0.5"),
        ("10.0.0.5", ["unknown"], "10.0.0.5"),
        ("10.0.0.5", ["999.1.1.1"], "10.0.0.5"),
        ("10.0.0.5", ["[2001:db8::1"], "10.0.0.5"),
        ("10.0.0.5", ["198.51.100.1:99999"], "10.0.0.5"),
        ("10.0.0.5", ["2001:db8::1:80:80:80:80:80:80"], "10.0.0.5"),
    ],
    ids=[
        "v4-peer",
        "v6-peer",
        "v4-mapped-peer",
        "zone-peer",
        "no-peer",
        "bad-peer",
        "untrusted-v4-with-xff",
        "untrusted-v6-with-xff",
        "trusted-one-hop",
        "trusted-mapped-peer",
        "trusted-v6",
        "v4-proxy-v6-client",
        "chain-spoofed-left",
        "chain-long",
        "chain-trusted-client-side",
        "xff-mapped",
        "xff-zone",
        "xff-v6-port",
        "xff-v4-port",
        "xff-spaces",
        "all-trusted",
        "several-xff-lines",
        "several-xff-lines-chain",
        "client-garbage-line-left",
        "empty-line-left",
        "client-garbage-left",
        "client-garbage-several-left",
        "client-garbage-left-two-proxies",
        "malformed-entry",
        "malformed-entry-own-line",
        "malformed-between-proxies",
        "malformed-client-hop",
        "empty-entry",
        "empty-header",
        "unknown-token",
        "bad-octet",
        "unclosed-bracket",
        "bad-port",
        "too-many-groups",
    ],
)
def test_client_ip(peer: str | None, xff: list[str], expected: str | None) -> None:
    got = client_ip(peer, xff, TRUSTED)
    assert (None if got is None else str(got)) == expected


def test_client_ip_without_trusted_proxies_ignores_xff() -> None:
    assert str(client_ip("10.0.0.5", ["198.51.100.1"], ())) == "10.0.0.5"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", ()),
        ("10.0.0.0/8", ("10.0.0.0/8",)),
        ("10.0.0.1, ::1 ,2001:db8::/32,", ("10.0.0.1/32", "::1/128", "2001:db8::/32")),
    ],
    ids=["empty", "one", "mixed"],
)
def test_parse_trusted_proxies(spec: str, expected: tuple[str, ...]) -> None:
    assert tuple(str(n) for n in parse_trusted_proxies(spec)) == expected


@pytest.mark.parametrize(
    "spec",
    ["10.0.0.0/33", "10.0.0.1/8", "proxy.internal", "::ffff:10.0.0.0/104"],
    ids=["bad-prefix", "host-bits", "hostname", "mapped-range"],
)
def test_parse_trusted_proxies_errors(spec: str) -> None:
    with pytest.raises(ValueError, match="invalid trusted proxy"):
        parse_trusted_proxies(spec)


SALT = b"s" * 32


@pytest.mark.parametrize(
    ("ip", "mode", "expected"),
    [
        ("203.0.113.77", "truncate", "203.0.113.0"),
        ("2001:db8:abcd:12:1:2:3:4", "truncate", "2001:db8:abcd::"),
        ("::ffff:203.0.113.77", "truncate", "203.0.113.0"),
        ("fe80::1%eth0", "truncate", "fe80::"),
        ("203.0.113.77", "drop", None),
        ("203.0.113.77", "full", "203.0.113.77"),
        ("::ffff:203.0.113.77", "full", "203.0.113.77"),
        (None, "truncate", None),
        ("nonsense", "full", None),
    ],
    ids=[
        "v4-truncate",
        "v6-truncate",
        "mapped-truncate",
        "zone-truncate",
        "drop",
        "full",
        "mapped-full",
        "none",
        "invalid",
    ],
)
def test_anonymize_ip(ip: str | None, mode: str, expected: str | None) -> None:
    assert anonymize_ip(ip, mode, SALT) == expected
    if ip is not None and parse_ip(ip) is not None:
        assert anonymize_ip(ipaddress.ip_address(ip.split("%")[0]), mode, SALT) == expected


def test_hash_mode() -> None:
    value = anonymize_ip("203.0.113.77", "hash", SALT)
    want = hmac.new(SALT, ipaddress.IPv4Address("203.0.113.77").packed, hashlib.sha256)
    assert value == "h:" + want.hexdigest()[:16]
    # Mapped and plain IPv4 hash alike; different salts give unlinkable values.
    assert anonymize_ip("::ffff:203.0.113.77", "hash", SALT) == value
    assert anonymize_ip("203.0.113.77", "hash", b"t" * 32) != value
    assert anonymize_ip("203.0.113.78", "hash", SALT) != value


@pytest.mark.parametrize("salt", [None, b""], ids=["none", "empty"])
def test_hash_requires_salt(salt: bytes | None) -> None:
    with pytest.raises(ValueError, match="salt"):
        anonymize_ip("203.0.113.77", "hash", salt)


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown ip mode"):
        anonymize_ip("203.0.113.77", "mask")


@pytest.mark.parametrize(
    ("ip", "mode", "decision"),
    [
        ("203.0.113.77", "truncate", IPDecision("203.0.113.0", "ip.truncate")),
        ("203.0.113.77", "drop", IPDecision(None, "ip.drop")),
        ("203.0.113.77", "full", IPDecision("203.0.113.77", "ip.full")),
        (None, "full", IPDecision(None, "ip.unknown")),
    ],
    ids=["truncate", "drop", "full", "unknown"],
)
def test_anonymize_rule(ip: str | None, mode: str, decision: IPDecision) -> None:
    assert anonymize(ip, mode) == decision


def make_ring() -> SaltRing:
    counter = itertools.count(1)
    return SaltRing(lambda n: bytes([next(counter)]) * n)


def test_salt_ring_rotates_daily_and_is_stable_within_a_day() -> None:
    ring = make_ring()
    s10 = ring.salt_for(10)
    assert ring.salt_for(10) == s10
    assert len(s10) == 32
    assert ring.salt_for(11) != s10
    assert ring.days() == (10, 11)


def test_salt_ring_destroys_after_48h() -> None:
    ring = make_ring()
    ring.salt_for(10)
    ring.salt_for(11)
    assert ring.expire(11) == []  # day 10's salt is 24-48 h old: still needed
    assert ring.expire(12) == [10]
    assert ring.days() == (11,)
    with pytest.raises(ValueError, match="destroyed"):
        ring.salt_for(10)
    assert ring.expire(20) == [11]
    assert ring.days() == ()


def test_salt_ring_rejects_bad_random_source() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        SaltRing(lambda n: b"x" * n, size=8)
    ring = SaltRing(lambda n: b"x")
    with pytest.raises(ValueError, match="wrong number"):
        ring.salt_for(1)


def test_salt_chains_with_one_state_agree_on_every_day() -> None:
    supervisor = SaltChain.new(10, lambda n: b"\x07" * n)
    worker = SaltChain(*supervisor.state())  # what a worker is handed
    later = SaltChain(*supervisor.state())
    assert [worker.salt_for(d) for d in (10, 11, 40)] == [later.salt_for(d) for d in (10, 11, 40)]
    assert len({worker.salt_for(d) for d in range(10, 20)}) == 10  # a new salt each day
    assert all(len(worker.salt_for(d)) == 32 for d in (10, 11))
    other = SaltChain.new(10, lambda n: b"\x08" * n)
    assert other.salt_for(10) != worker.salt_for(10)  # another launch, another chain


def test_a_salt_chain_cannot_go_back() -> None:
    chain = SaltChain.new(10, lambda n: b"\x07" * n)
    s12 = chain.salt_for(12)
    day, key = chain.state()
    chain.advance_to(12)
    assert chain.day == 12 and chain.salt_for(12) == s12
    # the key it holds now is not the one that could derive days 10 and 11
    assert chain.state()[1] != key and chain.state()[0] == 12 > day
    with pytest.raises(ValueError, match="no longer derivable"):
        chain.salt_for(11)
    chain.advance_to(5)  # a clock set back does not rewind it
    assert chain.day == 12
    with pytest.raises(ValueError, match="at least 32"):
        SaltChain(1, b"short")


def test_a_ring_on_a_chain_takes_its_salts_and_moves_it_on_expiry() -> None:
    chain = SaltChain.new(10, lambda n: b"\x07" * n)
    twin = SaltChain(*chain.state())
    ring = SaltRing(lambda n: pytest.fail("a chained ring draws no randomness"), chain=chain)
    assert ring.salt_for(11) == twin.salt_for(11)
    assert ring.expire(12) == []  # day 11's salt is kept until day 13 starts
    assert chain.day == 11  # but nothing before day 11 can be derived any more
    assert ring.expire(13) == [11]
    assert chain.day == 12
    with pytest.raises(ValueError, match="destroyed"):
        ring.salt_for(11)
    with pytest.raises(ValueError, match="32 bytes"):
        SaltRing(lambda n: b"x" * n, size=16, chain=chain)


def test_day_of() -> None:
    assert day_of(0) == 0
    assert day_of(86_399.9) == 0
    assert day_of(86_400) == 1
