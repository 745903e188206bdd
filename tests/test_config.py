"""Settings from the environment and .env: one line naming the variable, never its secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, Settings, load_settings

# a 32-byte key without its "=" padding, so that it passes for a key id
SECRET_KEY = "a2FrYWthaWthaWthaWthaWthaWthaWthaWthaWthaWs"
GOOD = f"k1:{SECRET_KEY}="


def settings(tmp_path: Path, dotenv: str | bytes | None = None, **env: str) -> Settings:
    path = tmp_path / ".env"
    if isinstance(dotenv, bytes):
        path.write_bytes(dotenv)
    elif dotenv is not None:
        path.write_text(dotenv)
    return load_settings(env, dotenv=path)


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        (f"{SECRET_KEY}:k1", "entry 1"),  # id and key swapped
        (f"{GOOD},{SECRET_KEY}:k2", "entry 2"),
        (f"{SECRET_KEY}:YWJj", "entry 1"),  # base64, but not 32 bytes
        (f"{SECRET_KEY}:{SECRET_KEY}=,{SECRET_KEY}:{SECRET_KEY}=", "entry 2"),  # id twice
    ],
    ids=["swapped", "second-swapped", "short-key", "repeated-id"],
)
def test_a_bad_master_key_entry_is_named_by_position_never_quoted(
    tmp_path: Path, spec: str, says: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        settings(tmp_path, OMNIGATE_MASTER_KEYS=spec)
    message = str(refused.value)
    assert "OMNIGATE_MASTER_KEYS" in message and says in message
    assert SECRET_KEY not in message and SECRET_KEY[:12] not in message


@pytest.mark.parametrize(
    ("env", "dotenv"),
    [
        ({"OMNIGATE_MASTER_KEYS": ""}, None),
        ({"OMNIGATE_MASTER_KEYS": " , "}, None),
        ({}, "OMNIGATE_MASTER_KEYS=\n"),
        ({}, 'OMNIGATE_MASTER_KEYS=""\n'),
    ],
    ids=["empty", "only-commas", "empty-in-dotenv", "empty-quoted-in-dotenv"],
)
def test_master_keys_set_but_empty_is_refused(
    tmp_path: Path, env: dict[str, str], dotenv: str | None
) -> None:
    """Not a silent fallback to the development key file."""
    with pytest.raises(ConfigError, match="OMNIGATE_MASTER_KEYS is set but lists no key"):
        settings(tmp_path, dotenv, **env)


def test_master_keys_unset_is_the_development_fallback(tmp_path: Path) -> None:
    assert settings(tmp_path).master_keys == ()


REDIS_PASSWORD = "s3cr3tRedisPw"


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{REDIS_PASSWORD}@[::1:6379/0",
        f"redis://:{REDIS_PASSWORD}@[::1]:99999/0",
    ],
    ids=["unbalanced-bracket", "port-out-of-range"],
)
def test_a_malformed_redis_url_names_the_variable_not_the_password(
    tmp_path: Path, url: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        settings(tmp_path, OMNIGATE_REDIS_URL=url)
    message = str(refused.value)
    assert "OMNIGATE_REDIS_URL" in message and REDIS_PASSWORD not in message


def test_a_dotenv_that_is_not_utf8_is_one_line_naming_it(tmp_path: Path) -> None:
    secret = "caf\xe9-master-key"
    with pytest.raises(ConfigError) as refused:
        settings(tmp_path, f"OMNIGATE_METRICS_TOKEN={secret}\n".encode("latin-1"))
    message = str(refused.value)
    assert ".env" in message and "UTF-8" in message and "master-key" not in message


@pytest.mark.parametrize(
    ("line", "port"),
    [
        ('OMNIGATE_PORT="8081" # local', 8081),
        ("OMNIGATE_PORT='8082'   # local", 8082),
        ('OMNIGATE_PORT="8083"#local', 8083),
        ("OMNIGATE_PORT=8084 # local", 8084),
        ("OMNIGATE_PORT=8085\t# local", 8085),
        ('export OMNIGATE_PORT="8086"', 8086),
        ("OMNIGATE_PORT=8087", 8087),
    ],
    ids=["double", "single", "no-space", "unquoted", "unquoted-tab", "export", "plain"],
)
def test_dotenv_values_may_carry_an_inline_comment(tmp_path: Path, line: str, port: int) -> None:
    assert settings(tmp_path, line + "\n").port == port


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("OMNIGATE_METRICS_TOKEN=pa#ss", "pa#ss"),  # no whitespace before '#': the value's
        ('OMNIGATE_METRICS_TOKEN="pa #ss" # why', "pa #ss"),  # quoted: kept as written
    ],
    ids=["hash-inside-unquoted", "hash-inside-quoted"],
)
def test_a_hash_inside_a_dotenv_value_is_kept(tmp_path: Path, line: str, value: str) -> None:
    assert settings(tmp_path, line + "\n").metrics_token == value


def test_a_seconds_setting_accepts_the_bound_its_message_states(tmp_path: Path) -> None:
    day = settings(tmp_path, OMNIGATE_RETENTION_INTERVAL="86400")
    assert day.retention_interval == 86400.0
    with pytest.raises(ConfigError) as refused:
        settings(tmp_path, OMNIGATE_RETENTION_INTERVAL="86401")
    assert "OMNIGATE_RETENTION_INTERVAL" in str(refused.value)
    assert "at most 86400" in str(refused.value)
