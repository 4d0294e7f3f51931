"""Waiting on a running broker: polling a condition, reading its readiness."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx2

from tests.harness import RunningBroker

WAIT_SECONDS = 20.0


async def until(check: Callable[[], Any], what: str = "condition") -> Any:
    """Poll ``check`` until it returns something true, and return that."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await anyio.sleep(0.05)
    raise AssertionError(f"{what} not reached within {WAIT_SECONDS:g}s")


def readyz(broker: RunningBroker) -> tuple[int, dict[str, Any]]:
    """The status code and body of the broker's /readyz."""
    response = httpx2.get(broker.origin + "/readyz", timeout=5.0)
    body: dict[str, Any] = response.json()
    return response.status_code, body
