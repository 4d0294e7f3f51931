"""Forwarded requests each get a downstream session of their own, up to a bound."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import anyio
import mcp.types as types
from mcp import Client

from broker.downstream import Downstream
from broker.manifest import load_manifest
from tests.harness import DEMO_MANIFEST


async def test_concurrent_requests_never_share_a_session_and_stay_bounded() -> None:
    manifest = replace(load_manifest(DEMO_MANIFEST), max_sessions=3)
    downstream = Downstream(manifest, call_timeout=30.0)
    in_flight: Counter[int] = Counter()
    used: set[int] = set()
    overlaps: list[int] = []

    async def slow(client: Client) -> types.CallToolResult:
        key = id(client)
        in_flight[key] += 1
        overlaps.append(in_flight[key])
        used.add(key)
        try:
            return await client.call_tool("slow", {"seconds": 0.2})
        finally:
            in_flight[key] -= 1

    results: list[types.CallToolResult] = []

    async def one() -> None:
        results.append(await downstream.forward("tools/call", slow, None))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(downstream.supervise)
        with anyio.fail_after(20):
            await downstream.wait_connected()
            async with anyio.create_task_group() as calls:
                for _ in range(7):
                    calls.start_soon(one)
        downstream.stop()
        tasks.cancel_scope.cancel()
    assert [r.is_error for r in results] == [False] * 7
    assert max(overlaps) == 1  # no session carried two requests at once
    assert 2 <= len(used) <= 3
