"""Call gateway.retention.run_retention once, filling its parameters by name (bench helper)."""

from __future__ import annotations

import asyncio
import inspect
import sys
from typing import Any

import orjson


async def _main() -> int:
    from gateway.config import load_settings
    from gateway.crypto import KeyRing
    from gateway.db import create_pool
    from gateway.retention import run_retention

    settings = load_settings()
    assert settings.database_url
    pool = await create_pool(settings.database_url, min_size=1, max_size=4)
    keyring = KeyRing(settings.master_keys)
    known: dict[str, Any] = {"pool": pool, "settings": settings, "keyring": keyring}
    kwargs: dict[str, Any] = {}
    for name, p in inspect.signature(run_retention).parameters.items():
        if name in known:
            kwargs[name] = known[name]
        elif p.default is inspect.Parameter.empty:
            sys.stderr.write(f"cannot fill run_retention parameter {name!r}\n")
            return 3
    try:
        out = run_retention(**kwargs)
        if inspect.isawaitable(out):
            out = await out
    finally:
        await pool.close()
    print(orjson.dumps(out, default=str).decode())
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(_main()))
