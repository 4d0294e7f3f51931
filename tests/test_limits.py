"""Call-rate limits: the same contract in process and in Redis, and failing closed."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream
from redis.asyncio import Redis

from broker.config import StoreConfig, config_from_dict
from broker.errors import ConfigError, Denied, LimitUnavailable, RateLimited
from broker.limits import (
    Limit,
    LocalLimiter,
    RateLimiter,
    RedisLimiter,
    build_limiter,
)
from broker.principal import Principal
from tests.harness import free_port, install_manifest, write_config
from tests.idp import LocalIdP

REDIS_URL = "redis://127.0.0.1:6379/0"
ISSUER = "https://idp.test"
ALICE = Principal(subject="alice", issuer=ISSUER, client_id="agent-7")
BOB = Principal(subject="bob", issuer=ISSUER, client_id="agent-7")
NOW = 1_800_000_000.0

Factory = Callable[[Sequence[Limit]], RateLimiter]


async def drop_keys(prefix: str) -> None:
    client = Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@asynccontextmanager
async def redis_limiters(prefix: str) -> AsyncIterator[Factory]:
    """Limiters on the real Redis under ``prefix``, closed and cleaned up after."""
    made: list[RedisLimiter] = []

    def make(limits: Sequence[Limit]) -> RateLimiter:
        limiter = RedisLimiter.connect(limits, REDIS_URL, timeout=1.0, prefix=prefix)
        made.append(limiter)
        return limiter

    try:
        yield make
    finally:
        for limiter in made:
            await limiter.aclose()
        await drop_keys(prefix)


@pytest.fixture
def prefix() -> str:
    return f"broker-test:{uuid.uuid4().hex}:"


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
async def make_limiter(
    request: pytest.FixtureRequest, prefix: str
) -> AsyncIterator[Factory]:
    """Each contract test runs once in process and once against the real Redis."""
    if request.param == "local":
        yield LocalLimiter
        return
    async with redis_limiters(prefix) as make:
        yield make


async def admitted(
    limiter: RateLimiter, principal: Principal, tool: str, now: float, times: int
) -> int:
    """How many of ``times`` calls made at ``now`` get through."""
    count = 0
    for _ in range(times):
        try:
            await limiter.check(principal, tool, now)
        except RateLimited:
            continue
        count += 1
    return count


# ---- the contract, for both implementations ---------------------------------


async def test_calls_up_to_the_limit_pass_and_the_next_is_denied(
    make_limiter: Factory,
) -> None:
    """Three calls a minute: three pass, the fourth is denied as rate_limited."""
    limiter = make_limiter([Limit(per="principal", calls=3, seconds=60)])
    assert await admitted(limiter, ALICE, "demo.echo", NOW, 3) == 3
    with pytest.raises(RateLimited) as denied:
        await limiter.check(ALICE, "demo.echo", NOW + 1)
    assert denied.value.category == "rate_limited"
    assert isinstance(denied.value, Denied)


async def test_the_window_slides(make_limiter: Factory) -> None:
    """A call leaves the count exactly ``seconds`` after it was made."""
    limiter = make_limiter([Limit(per="principal", calls=2, seconds=60)])
    await limiter.check(ALICE, "demo.echo", NOW)
    await limiter.check(ALICE, "demo.echo", NOW + 30)
    with pytest.raises(RateLimited):
        await limiter.check(ALICE, "demo.echo", NOW + 59.5)
    await limiter.check(ALICE, "demo.echo", NOW + 60)
    with pytest.raises(RateLimited):
        await limiter.check(ALICE, "demo.echo", NOW + 89.5)


async def test_per_principal_counts_each_principal_over_all_tools(
    make_limiter: Factory,
) -> None:
    """One principal's calls to any tool use up its own count, not another's."""
    limiter = make_limiter([Limit(per="principal", calls=2, seconds=60)])
    await limiter.check(ALICE, "demo.echo", NOW)
    await limiter.check(ALICE, "demo.add", NOW)
    with pytest.raises(RateLimited):
        await limiter.check(ALICE, "demo.search_web", NOW)
    assert await admitted(limiter, BOB, "demo.echo", NOW, 3) == 2


async def test_per_tool_counts_every_principal_together(make_limiter: Factory) -> None:
    """Calls to one tool by anyone share its count; other tools are untouched."""
    limiter = make_limiter([Limit(per="tool", calls=2, seconds=60)])
    await limiter.check(ALICE, "demo.echo", NOW)
    await limiter.check(BOB, "demo.echo", NOW)
    with pytest.raises(RateLimited):
        await limiter.check(ALICE, "demo.echo", NOW)
    assert await admitted(limiter, BOB, "demo.add", NOW, 2) == 2


async def test_per_principal_and_tool_counts_each_pair(make_limiter: Factory) -> None:
    """With per = principal+tool, each principal has a count for each tool."""
    limiter = make_limiter([Limit(per="principal+tool", calls=1, seconds=60)])
    await limiter.check(ALICE, "demo.echo", NOW)
    with pytest.raises(RateLimited):
        await limiter.check(ALICE, "demo.echo", NOW)
    await limiter.check(ALICE, "demo.add", NOW)
    await limiter.check(BOB, "demo.echo", NOW)


async def test_a_limit_on_one_tool_leaves_the_others_alone(
    make_limiter: Factory,
) -> None:
    """A limit naming demo.transfer neither counts nor stops other tools."""
    limiter = make_limiter(
        [Limit(per="principal", calls=1, seconds=60, tool="demo.transfer")]
    )
    assert await admitted(limiter, ALICE, "demo.echo", NOW, 5) == 5
    await limiter.check(ALICE, "demo.transfer", NOW)
    with pytest.raises(RateLimited):
        await limiter.check(ALICE, "demo.transfer", NOW)


async def test_a_denied_call_uses_up_nothing(make_limiter: Factory) -> None:
    """A call one limit refuses is not counted against the other limits."""
    limiter = make_limiter(
        [
            Limit(per="principal", calls=3, seconds=60),
            Limit(per="tool", calls=1, seconds=60, tool="demo.transfer"),
        ]
    )
    assert await admitted(limiter, ALICE, "demo.transfer", NOW, 4) == 1
    assert await admitted(limiter, ALICE, "demo.echo", NOW, 4) == 2


async def test_the_same_subject_from_another_issuer_is_another_principal(
    make_limiter: Factory,
) -> None:
    """Subjects are counted per issuer: two identity providers, two principals."""
    limiter = make_limiter([Limit(per="principal", calls=1, seconds=60)])
    other = Principal(subject="alice", issuer="https://other.test", client_id="a")
    await limiter.check(ALICE, "demo.echo", NOW)
    await limiter.check(other, "demo.echo", NOW)
    with pytest.raises(RateLimited):
        await limiter.check(ALICE, "demo.echo", NOW)


# ---- Redis: replicas, atomicity, failing closed ------------------------------


@pytest.mark.redis
async def test_replicas_sharing_redis_share_the_count(prefix: str) -> None:
    """Two limiters on one Redis, as two replicas would be, count together."""
    limits = [Limit(per="principal", calls=4, seconds=60)]
    async with redis_limiters(prefix) as make:
        first, second = make(limits), make(limits)
        for limiter in (first, second, first, second):
            await limiter.check(ALICE, "demo.echo", NOW)
        for limiter in (first, second):
            with pytest.raises(RateLimited):
                await limiter.check(ALICE, "demo.echo", NOW)


@pytest.mark.redis
async def test_concurrent_calls_on_two_replicas_never_exceed_the_limit(
    prefix: str,
) -> None:
    """Forty calls at once through two replicas: exactly ten get through."""
    limits = [Limit(per="tool", calls=10, seconds=60)]
    outcomes: list[bool] = []

    async def call(limiter: RateLimiter) -> None:
        try:
            await limiter.check(ALICE, "demo.echo", NOW)
        except RateLimited:
            outcomes.append(False)
        else:
            outcomes.append(True)

    async with redis_limiters(prefix) as make:
        replicas = (make(limits), make(limits))
        async with anyio.create_task_group() as tasks:
            for n in range(40):
                tasks.start_soon(call, replicas[n % 2])
    assert (len(outcomes), sum(outcomes)) == (40, 10)


@pytest.mark.redis
async def test_redis_keys_name_no_subject_and_expire(prefix: str) -> None:
    """Counters in Redis are opaque names that expire with their window."""
    async with redis_limiters(prefix) as make:
        limiter = make([Limit(per="principal+tool", calls=5, seconds=30)])
        await limiter.check(ALICE, "demo.echo", NOW)
        client = Redis.from_url(REDIS_URL)
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
            ttls = [await client.pttl(key) for key in keys]
        finally:
            await client.aclose()
    assert len(keys) == 1
    assert b"alice" not in keys[0]
    assert b"echo" not in keys[0]
    assert 0 < ttls[0] <= 30_000


async def test_unreachable_redis_denies_quickly() -> None:
    """Nothing listening on the Redis port: the call is denied within the timeout."""
    limiter = RedisLimiter.connect(
        [Limit(per="principal", calls=5, seconds=60)],
        "redis://127.0.0.1:1/0",
        timeout=0.25,
    )
    started = time.monotonic()
    try:
        with pytest.raises(LimitUnavailable) as denied:
            await limiter.check(ALICE, "demo.echo", NOW)
    finally:
        await limiter.aclose()
    assert time.monotonic() - started < 1.0
    assert denied.value.category == "limit_unavailable"


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A loopback port that accepts connections and never answers; its number."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    # S610 mistakes anyio's typed attribute lookup for Django's QuerySet.extra.
    port: int = listener.extra(SocketAttribute.local_port)  # noqa: S610

    async def swallow(stream: SocketStream) -> None:
        async with stream:
            async for _ in stream:
                pass

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, swallow)
        try:
            yield port
        finally:
            tasks.cancel_scope.cancel()


async def test_redis_that_never_answers_denies_within_the_timeout() -> None:
    """A Redis that accepts and then says nothing: denied once the timeout passes."""
    async with silent_server() as port:
        limiter = RedisLimiter.connect(
            [Limit(per="principal", calls=5, seconds=60)],
            f"redis://127.0.0.1:{port}/0",
            timeout=0.3,
        )
        started = time.monotonic()
        try:
            with pytest.raises(LimitUnavailable):
                await limiter.check(ALICE, "demo.echo", NOW)
        finally:
            await limiter.aclose()
        elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 1.5


async def test_a_call_no_limit_applies_to_does_not_need_redis() -> None:
    """Only calls a limit applies to depend on Redis; others pass without it."""
    limiter = RedisLimiter.connect(
        [Limit(per="principal", calls=1, seconds=60, tool="demo.transfer")],
        "redis://127.0.0.1:1/0",
        timeout=0.25,
    )
    try:
        await limiter.check(ALICE, "demo.echo", NOW)
        with pytest.raises(LimitUnavailable):
            await limiter.check(ALICE, "demo.transfer", NOW)
    finally:
        await limiter.aclose()


# ---- configuration --------------------------------------------------------------


def config_with(**tables: Any) -> dict[str, Any]:
    return {
        "broker": {"resource": "https://broker.test/mcp", "development": True},
        **tables,
    }


def test_limits_tables_are_read_from_the_configuration() -> None:
    """[[limits]] tables become limits, in order, with every field kept."""
    config = config_from_dict(
        config_with(
            limits=[
                {"per": "principal", "calls": 10, "seconds": 60},
                {
                    "per": "principal+tool",
                    "tool": "demo.transfer",
                    "calls": 2,
                    "seconds": 3600,
                },
            ],
            store={"redis_url": "redis://cache:6379/2"},
        )
    )
    assert config.limits == (
        Limit(per="principal", calls=10, seconds=60),
        Limit(per="principal+tool", calls=2, seconds=3600, tool="demo.transfer"),
    )
    assert config.store.redis_url == "redis://cache:6379/2"


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"per": "principal"}, "array of tables"),
        ([{"per": "everyone", "calls": 1, "seconds": 1}], "per must be one of"),
        ([{"per": "tool", "calls": 0, "seconds": 1}], "calls must be"),
        ([{"per": "tool", "calls": 1.5, "seconds": 1}], "calls must be"),
        ([{"per": "tool", "calls": True, "seconds": 1}], "calls must be"),
        ([{"per": "tool", "calls": 1, "seconds": -1}], "seconds must be"),
        ([{"per": "tool", "calls": 1, "seconds": 1, "burst": 3}], "burst"),
        ([{"per": "tool", "calls": 1}], "bad [[limits]] #1"),
    ],
)
def test_bad_limits_stop_the_start(limits: Any, message: str) -> None:
    """A limit that is not well formed is a ConfigError naming what is wrong."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(config_with(limits=limits))


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ({"redis_url": "http://cache:6379"}, "redis_url"),
        ({"redis_timeout_seconds": 0}, "redis_timeout_seconds"),
        ({"redis_timeout_seconds": "fast"}, "redis_timeout_seconds"),
    ],
)
def test_bad_redis_settings_stop_the_start(store: Any, message: str) -> None:
    """A Redis URL of another scheme or a timeout that is not positive is refused."""
    with pytest.raises(ConfigError, match=message):
        config_from_dict(config_with(store=store))


def test_a_limit_on_a_tool_that_is_not_pinned_stops_the_start() -> None:
    """A misspelt tool name in a limit is refused rather than never applied."""
    limits = [Limit(per="tool", calls=1, seconds=1, tool="demo.transfr")]
    with pytest.raises(ConfigError, match=r"demo\.transfr"):
        build_limiter(limits, StoreConfig(), ["demo.transfer"])


def test_a_missing_redis_password_stops_the_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A password variable that the configuration names but is unset is refused."""
    monkeypatch.delenv("BROKER_TEST_REDIS_PASSWORD", raising=False)
    store = StoreConfig(
        redis_url=REDIS_URL, redis_password_env="BROKER_TEST_REDIS_PASSWORD"
    )
    with pytest.raises(ConfigError, match="BROKER_TEST_REDIS_PASSWORD"):
        build_limiter([], store, [])


async def test_the_store_setting_picks_the_implementation() -> None:
    """With a Redis URL limits are shared in Redis, without one kept in process."""
    assert isinstance(build_limiter([], StoreConfig(), []), LocalLimiter)
    shared = build_limiter([], StoreConfig(redis_url=REDIS_URL), [])
    await shared.aclose()
    assert isinstance(shared, RedisLimiter)


@pytest.mark.parametrize("command", ["check", "serve"])
def test_check_and_serve_refuse_a_limit_on_an_unpinned_tool(
    tmp_path: Path, live_idp: LocalIdP, command: str
) -> None:
    """`broker check` and `broker serve` both stop on a limit naming no pinned tool."""
    config = write_config(tmp_path, free_port(), live_idp.issuer, live_idp.jwks_url)
    install_manifest(tmp_path)
    limit = """
[[limits]]
per = "tool"
tool = "demo.transfr"
calls = 1
seconds = 1
"""
    config.write_text(config.read_text(encoding="utf-8") + limit, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "-c", str(config), command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "demo.transfr" in done.stderr
