"""Settings read from the environment (and an optional .env file), validated once."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_UPSTREAM_URL = "https://api.openai.com/v1"
STATE_DIR = Path(".omnigate")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names it and never echoes secrets."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Settings:
    """Everything the gateway reads from its environment."""

    database_url: str | None = None
    admin_database_url: str | None = None
    redis_url: str | None = None
    openai_api_key: str | None = None
    upstream_url: str = DEFAULT_UPSTREAM_URL
    first_token_timeout: float = 30.0
    idle_timeout: float = 30.0
    upstream_retries: int = 2
    master_keys: tuple[tuple[str, bytes], ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    trusted_proxies: tuple[Network, ...] = ()
    metrics_token: str | None = None
    cookie_secure: bool = True
    state_dir: Path = STATE_DIR
    # socket limits (issue 9 documents each); all overridable by environment
    max_frame_bytes: int = 64 * 1024
    handshake_timeout: float = 10.0
    first_frame_timeout: float = 10.0
    max_bad_frames: int = 10
    max_connections_per_ip: int = 50
    shutdown_grace: float = 20.0
    retention_interval: float = 3600.0
    # helper processes searching costly messages for PII (0: every search inline)
    redaction_helpers: int = 1
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def offline(self) -> bool:
        """True when no upstream key is configured and the built-in offline model answers."""
        return not self.openai_api_key


def _read_dotenv(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # its text can hold secrets: name the file only
        raise ConfigError(f"{path} is not valid UTF-8 text") from None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip().removeprefix("export ").strip()] = _dotenv_value(value)
    return values


def _dotenv_value(raw: str) -> str:
    """A .env value: a quoted one up to its closing quote, an unquoted one up to ` #`.

    As common .env readers do, a comment may follow the closing quote, or follow an
    unquoted value after whitespace (a `#` inside a value, as in `pa#ss`, is kept).
    """
    value = raw.strip()
    if value[:1] in ("'", '"'):
        end = value.find(value[0], 1)
        if end > 0 and (value[end + 1 :].strip() or "#").startswith("#"):
            return value[1:end]
    else:
        value = re.split(r"\s#", value, maxsplit=1)[0].rstrip()
    return value.strip("'\"")


def parse_master_keys(spec: str) -> tuple[tuple[str, bytes], ...]:
    """Parse `id:base64key[,id:base64key]`; each key must decode to 32 bytes."""
    keys: list[tuple[str, bytes]] = []
    # an entry is named by its position, never quoted: a swapped entry (key:id) puts
    # the key where the id belongs
    for n, part in enumerate(p.strip() for p in spec.split(",") if p.strip()):
        entry = f"OMNIGATE_MASTER_KEYS entry {n + 1}"
        key_id, sep, encoded = part.partition(":")
        if not sep or not key_id or not key_id.isascii() or not key_id.replace("-", "").isalnum():
            raise ConfigError(f"{entry} must look like id:base64key")
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{entry}: the key is not valid base64 (id:base64key)") from None
        if len(key) != 32:
            raise ConfigError(f"{entry}: the key must be 32 bytes (AES-256)")
        if any(k == key_id for k, _ in keys):
            raise ConfigError(f"{entry} repeats the id of an earlier entry")
        keys.append((key_id, key))
    if not keys:
        raise ConfigError("OMNIGATE_MASTER_KEYS is set but lists no key")
    return tuple(keys)


def parse_networks(spec: str) -> tuple[Network, ...]:
    """Parse comma-separated CIDRs or addresses."""
    nets: list[Network] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"OMNIGATE_TRUSTED_PROXIES entry {part!r} is not a CIDR") from None
    return tuple(nets)


REDIS_SCHEMES = ("redis", "rediss", "unix")


def parse_redis_url(url: str) -> str:
    """Check `OMNIGATE_REDIS_URL` as the Redis client will parse it; the URL, unchanged.

    The client connects lazily, so a malformed URL would otherwise surface only in
    each serving process; the message never echoes the URL (it may hold a password).
    """
    invalid = "OMNIGATE_REDIS_URL is not a valid Redis URL (redis://[:password@]host[:port][/db])"
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:  # an unbalanced "[" (IPv6)
        raise ConfigError(invalid) from None
    if scheme not in REDIS_SCHEMES:
        raise ConfigError(
            "OMNIGATE_REDIS_URL must be a redis://, rediss:// or unix:// URL "
            "(e.g. redis://localhost:6379/0)"
        )
    from redis.asyncio.connection import parse_url

    try:
        parse_url(url)
    except ValueError:
        raise ConfigError(invalid) from None
    return url


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds") from None
    if not 0 < value <= 86400:
        raise ConfigError(f"{name} must be more than 0 and at most 86400 seconds")
    return value


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false")


def load_settings(env: Mapping[str, str] | None = None, dotenv: Path | None = None) -> Settings:
    """Build Settings from the process environment, a .env file filling only unset names."""
    merged: dict[str, str] = _read_dotenv(dotenv or Path(".env"))
    merged.update(os.environ if env is None else env)
    e = merged
    master = e.get("OMNIGATE_MASTER_KEYS")
    url = e.get("OMNIGATE_UPSTREAM_URL") or DEFAULT_UPSTREAM_URL
    if not url.startswith(("http://", "https://")):
        raise ConfigError("OMNIGATE_UPSTREAM_URL must be an http(s) URL")
    redis_url = e.get("OMNIGATE_REDIS_URL") or None
    return Settings(
        database_url=e.get("OMNIGATE_DATABASE_URL") or None,
        admin_database_url=e.get("OMNIGATE_ADMIN_DATABASE_URL") or None,
        redis_url=parse_redis_url(redis_url) if redis_url else None,
        openai_api_key=e.get("OPENAI_API_KEY") or None,
        upstream_url=url.rstrip("/"),
        first_token_timeout=_float(e, "OMNIGATE_UPSTREAM_FIRST_TOKEN_TIMEOUT", 30.0),
        idle_timeout=_float(e, "OMNIGATE_UPSTREAM_IDLE_TIMEOUT", 30.0),
        upstream_retries=_int(e, "OMNIGATE_UPSTREAM_RETRIES", 2, 0, 10),
        # set but empty is a mistake (a secret store that returned nothing), not "unset":
        # the development key would silently take over
        master_keys=parse_master_keys(master) if master is not None else (),
        host=e.get("OMNIGATE_HOST") or "127.0.0.1",
        port=_int(e, "OMNIGATE_PORT", 8080, 0, 65535),
        trusted_proxies=parse_networks(e.get("OMNIGATE_TRUSTED_PROXIES", "")),
        metrics_token=e.get("OMNIGATE_METRICS_TOKEN") or None,
        cookie_secure=_bool(e, "OMNIGATE_COOKIE_SECURE", True),
        state_dir=Path(e.get("OMNIGATE_STATE_DIR") or STATE_DIR),
        max_frame_bytes=_int(e, "OMNIGATE_MAX_FRAME_BYTES", 64 * 1024, 1024, 16 * 1024 * 1024),
        handshake_timeout=_float(e, "OMNIGATE_HANDSHAKE_TIMEOUT", 10.0),
        first_frame_timeout=_float(e, "OMNIGATE_FIRST_FRAME_TIMEOUT", 10.0),
        max_bad_frames=_int(e, "OMNIGATE_MAX_BAD_FRAMES", 10, 1, 10000),
        max_connections_per_ip=_int(e, "OMNIGATE_MAX_CONNECTIONS_PER_IP", 50, 1, 1_000_000),
        shutdown_grace=_float(e, "OMNIGATE_SHUTDOWN_GRACE", 20.0),
        retention_interval=_float(e, "OMNIGATE_RETENTION_INTERVAL", 3600.0),
        redaction_helpers=_int(e, "OMNIGATE_REDACTION_HELPERS", 1, 0, 16),
    )
