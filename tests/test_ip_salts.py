"""A gateway destroys expired IP salts on its own clock, not only when a visitor comes by."""

from __future__ import annotations

import pytest

from gateway.appkeys import SERVICES
from gateway.visitor import today
from tests.conftest import Gateway


async def test_a_started_gateway_has_destroyed_the_salts_older_than_48_hours(
    offline_gateway: Gateway,
) -> None:
    # no visitor has come by: the expiry ran at start (and runs every minute)
    salts = offline_gateway.server.app[SERVICES].salts
    assert salts is not None
    # two days ago is gone for good: refused, never answered with a new salt
    with pytest.raises(ValueError, match="destroyed"):
        salts.salt_for(today() - 2)
    assert len(salts.salt_for(today())) == 32
