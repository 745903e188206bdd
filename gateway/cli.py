"""`omnigate` command line: serve, migrate, tenant create (and the privacy jobs as they land)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import NoReturn

import orjson

from gateway.config import ConfigError, Settings, load_settings
from gateway.db import DatabaseError, create_pool, migrate
from gateway.embedded import APP_ROLE, start_embedded, with_user
from policies import PolicyError


class UsageError(Exception):
    """A user mistake: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    p = _Parser(prog="omnigate", description="Privacy-enforcing gateway for AI chat widgets")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--demo", action="store_true", help="ensure the demo tenant")
    sub.add_parser("migrate", help="apply database migrations")
    tenant = sub.add_parser("tenant", help="manage tenants")
    tsub = tenant.add_subparsers(dest="tenant_command", required=True, parser_class=_Parser)
    create = tsub.add_parser("create", help="create a tenant")
    create.add_argument("--name", required=True)
    create.add_argument("--origin", action="append", required=True, dest="origins")
    return p


def resolve_database(settings: Settings) -> tuple[Settings, str | None]:
    """Fill in the embedded server when no database is configured; returns (settings, owner URL)."""
    if settings.database_url:
        return settings, settings.admin_database_url
    owner = settings.admin_database_url or start_embedded(settings.state_dir / "pgdata")
    return replace(settings, database_url=with_user(owner, APP_ROLE)), owner


async def _migrate(settings: Settings, owner: str | None) -> list[str]:
    if owner is None:
        raise ConfigError("OMNIGATE_ADMIN_DATABASE_URL is needed to migrate")
    return await migrate(owner, settings.database_url)


async def _tenant_create(settings: Settings, name: str, origins: list[str]) -> dict[str, str]:
    from gateway.provision import create_tenant

    assert settings.database_url
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        return (await create_tenant(pool, name, origins)).as_json()
    finally:
        await pool.close()


async def _ensure_demo(settings: Settings, host: str, port: int) -> None:
    from gateway.provision import ensure_demo_tenant

    assert settings.database_url
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        created = await ensure_demo_tenant(
            pool, [f"http://127.0.0.1:{port}", f"http://localhost:{port}"]
        )
    finally:
        await pool.close()
    if created is not None:
        sys.stderr.write(f"demo tenant created; its admin key (shown once): {created.admin_key}\n")
    sys.stderr.write(f"demo widget: http://{host}:{port}/demo\n")


def run(argv: Sequence[str] | None = None) -> int:
    """Run a command; raises the typed errors that `main` turns into one line."""
    args = build_parser().parse_args(argv)
    settings = load_settings()
    if args.command == "migrate":
        settings, owner = resolve_database(settings)
        applied = asyncio.run(_migrate(settings, owner))
        print(orjson.dumps({"applied": applied}).decode())
        return 0
    if args.command == "tenant":
        name = args.name.strip()
        if not 1 <= len(name) <= 200:
            raise UsageError("--name must be 1-200 characters")
        settings, owner = resolve_database(settings)
        if owner is not None:
            asyncio.run(_migrate(settings, owner))
        print(orjson.dumps(asyncio.run(_tenant_create(settings, name, args.origins))).decode())
        return 0
    if args.command == "serve":
        from gateway.server import serve

        host = args.host or settings.host
        port = settings.port if args.port is None else args.port
        if not 0 <= port <= 65535:
            raise UsageError("--port must be 0-65535")
        if args.workers < 1:
            raise UsageError("--workers must be at least 1")
        settings, owner = resolve_database(replace(settings, host=host, port=port))
        if owner is not None:
            asyncio.run(_migrate(settings, owner))
        if args.demo:
            asyncio.run(_ensure_demo(settings, host, port))
        serve(settings, workers=args.workers)
        return 0
    raise UsageError(f"unknown command {args.command}")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: user mistakes print one clear line and exit non-zero."""
    try:
        code = run(argv)
    except UsageError as exc:
        sys.stderr.write(f"omnigate: error: {exc}\n")
        code = 2
    except PolicyError as exc:
        details = "; ".join(f"{e['field']}: {e['message']}" for e in exc.errors)
        sys.stderr.write(f"omnigate: error: invalid policy: {details}\n")
        code = 2
    except (ConfigError, DatabaseError) as exc:
        sys.stderr.write(f"omnigate: error: {exc}\n")
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
