"""argparse types of the bench's command lines: a wrong value is one usage line, exit 2.

Shared by `python -m bench` and `python -m bench.floor`, so both refuse the same things
the same way, before anything starts.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from urllib.parse import urlsplit

DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/test"


def at_least(lo: int) -> Callable[[str], int]:
    """A whole number of at least `lo`."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {n}")
        return n

    return parse


def milliseconds(value: str) -> float:
    """A duration in milliseconds, 0 to 60,000."""
    try:
        ms = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds, got {value!r}") from None
    if not 0 <= ms <= 60_000:
        raise argparse.ArgumentTypeError(f"must be between 0 and 60000, got {value}")
    return ms


def server_url(value: str) -> str:
    """A PostgreSQL URL (an owner or superuser: the bench creates databases there)."""
    if urlsplit(value).scheme not in ("postgresql", "postgres"):
        raise argparse.ArgumentTypeError(
            "expected postgresql://user@host[:port]/database (an owner or superuser)"
        )
    return value


def redis_url(value: str) -> str:
    """A Redis URL."""
    if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        raise argparse.ArgumentTypeError("expected redis://host[:port]/db")
    return value
