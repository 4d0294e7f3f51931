"""Call-rate limits, counted in this process or, across replicas, in Redis.

Each ``[[limits]]`` table in the configuration allows at most ``calls`` tool
calls in any window of ``seconds``, counted per principal, per tool, or per
principal and tool together, and optionally only for the one ``tool`` named::

    [[limits]]
    per = "principal+tool"
    tool = "demo.transfer"
    calls = 10
    seconds = 60

The window slides: a call is admitted when fewer than ``calls`` admitted
calls fall in the ``seconds`` before it. A call is admitted only if every
limit that applies has room, and is then counted against all of them in one
step, so a denied call uses up nothing and two replicas cannot both take the
last place.

A limit that cannot be checked denies: Redis down, refusing, or slower than
its timeout is ``LimitUnavailable``, never a pass. A call that no limit
applies to never touches Redis.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from broker import redis_clients
from broker.errors import ConfigError, LimitUnavailable, RateLimited
from broker.principal import Principal

if TYPE_CHECKING:
    from broker.config import StoreConfig

SCOPES = ("principal", "tool", "principal+tool")
KEY_PREFIX = "broker:"

# KEYS: one sorted set of admitted calls per limit that applies.
# ARGV: now, a member naming this call, then calls and seconds for each key.
# Returns 0 when the call is admitted, else the position of a full limit.
_ADMIT = """
local now = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local seconds = tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - seconds)
  if redis.call('ZCARD', key) >= tonumber(ARGV[1 + 2 * i]) then
    return i
  end
end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[2])
  redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[2 + 2 * i]) * 1000))
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Limit:
    """At most ``calls`` calls in any ``seconds``, counted ``per`` scope."""

    per: str
    calls: int
    seconds: float
    tool: str = ""  # a qualified tool name; empty means every tool

    def applies_to(self, tool: str) -> bool:
        return not self.tool or self.tool == tool

    def counter(self, principal: Principal, tool: str) -> str:
        """The name of the count this call goes to, the same on every replica.

        Hashed, so that subjects never appear in Redis key names.
        """
        parts = [self.per, self.tool, str(self.calls), repr(float(self.seconds))]
        if self.per in ("principal", "principal+tool"):
            parts += [principal.issuer, principal.subject]
        if self.per in ("tool", "principal+tool"):
            parts.append(tool)
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]

    def describe(self) -> str:
        where = f" on {self.tool}" if self.tool else ""
        return f"{self.calls} calls per {self.seconds:g}s per {self.per}{where}"


class RateLimiter(Protocol):
    """Admits a tool call or raises RateLimited or LimitUnavailable."""

    async def check(self, principal: Principal, tool: str, now: float) -> None: ...

    async def aclose(self) -> None: ...


def limits_from_config(raw: object) -> tuple[Limit, ...]:
    """The ``[[limits]]`` tables, checked; ConfigError names the table at fault."""
    if not isinstance(raw, list):
        raise ConfigError("limits must be an array of tables: [[limits]]")
    return tuple(_limit(f"[[limits]] #{n}", t) for n, t in enumerate(raw, 1))


def _limit(where: str, table: object) -> Limit:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - set(Limit.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}")
    try:
        limit = Limit(**table)
    except TypeError as exc:
        raise ConfigError(f"bad {where}: {exc}") from exc
    if limit.per not in SCOPES:
        raise ConfigError(f"{where} per must be one of: {', '.join(SCOPES)}")
    if not _positive(limit.calls) or not isinstance(limit.calls, int):
        raise ConfigError(f"{where} calls must be a whole number > 0")
    if not _positive(limit.seconds):
        raise ConfigError(f"{where} seconds must be a number > 0")
    if not isinstance(limit.tool, str):
        raise ConfigError(f"{where} tool must be a qualified tool name")
    return limit


def _positive(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and value > 0


def applicable(
    limits: Sequence[Limit], principal: Principal, tool: str
) -> list[tuple[Limit, str]]:
    """Each limit that applies to this call, with the counter it goes to."""
    return [(li, li.counter(principal, tool)) for li in limits if li.applies_to(tool)]


class LocalLimiter:
    """Limits counted in this process alone: one broker on the embedded store."""

    def __init__(self, limits: Sequence[Limit]) -> None:
        self.limits = tuple(limits)
        self._windows: dict[str, deque[float]] = {}
        self._longest = max((li.seconds for li in self.limits), default=0.0)
        self._swept = 0.0

    async def check(self, principal: Principal, tool: str, now: float) -> None:
        # No await between looking and counting: nothing else runs in between.
        self._sweep(now)
        admitted: list[deque[float]] = []
        for limit, counter in applicable(self.limits, principal, tool):
            window = self._windows.setdefault(counter, deque())
            while window and window[0] <= now - limit.seconds:
                window.popleft()
            if len(window) >= limit.calls:
                raise RateLimited(f"limit of {limit.describe()} reached")
            admitted.append(window)
        for window in admitted:
            window.append(now)

    def _sweep(self, now: float) -> None:
        """Forget counters with no call in the longest window (idle principals)."""
        if now - self._swept < self._longest:
            return
        self._swept = now
        cutoff = now - self._longest
        idle = [c for c, w in self._windows.items() if not w or w[-1] <= cutoff]
        for counter in idle:
            del self._windows[counter]

    async def aclose(self) -> None:
        self._windows.clear()


class RedisLimiter:
    """Limits counted in Redis, shared by every replica that uses it."""

    def __init__(
        self,
        limits: Sequence[Limit],
        client: Redis,
        *,
        timeout: float,
        prefix: str = KEY_PREFIX,
    ) -> None:
        self.limits = tuple(limits)
        self.timeout = timeout
        self.prefix = prefix
        self._client = client
        self._admit = client.register_script(_ADMIT)

    @classmethod
    def connect(
        cls,
        limits: Sequence[Limit],
        url: str,
        *,
        password: str | None = None,
        timeout: float,
        prefix: str = KEY_PREFIX,
    ) -> RedisLimiter:
        """A limiter on the Redis at ``url``; connections open on first use."""
        client = redis_clients.asynchronous(
            url, password=password, timeout=timeout, decode=False
        )
        return cls(limits, client, timeout=timeout, prefix=prefix)

    async def check(self, principal: Principal, tool: str, now: float) -> None:
        counted = applicable(self.limits, principal, tool)
        if not counted:
            return
        keys = [f"{self.prefix}limit:{counter}" for _, counter in counted]
        args: list[Any] = [repr(now), uuid.uuid4().hex]
        for limit, _ in counted:
            args += [limit.calls, repr(float(limit.seconds))]
        full = await self._run(keys, args)
        if full:
            limit = counted[int(full) - 1][0]
            raise RateLimited(f"limit of {limit.describe()} reached")

    async def _run(self, keys: list[str], args: list[Any]) -> Any:
        try:
            with anyio.fail_after(self.timeout):
                return await self._admit(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise LimitUnavailable(f"Redis did not count the call: {reason}") from exc

    async def aclose(self) -> None:
        await self._client.aclose()


def check_tools(limits: Iterable[Limit], known_tools: Iterable[str]) -> None:
    """ConfigError for a limit on a tool that is not pinned.

    A misspelt name would otherwise be a limit that never applies.
    """
    known = set(known_tools)
    for limit in limits:
        if limit.tool and limit.tool not in known:
            raise ConfigError(f"[[limits]] names {limit.tool!r}, which is not pinned")


def build_limiter(
    limits: Sequence[Limit], store: StoreConfig, known_tools: Iterable[str]
) -> RateLimiter:
    """Redis when ``[store] redis_url`` is set, this process otherwise."""
    check_tools(limits, known_tools)
    if not store.redis_url:
        return LocalLimiter(limits)
    # Imported here: the configuration module reads limits from this one.
    from broker.config import redis_password

    return RedisLimiter.connect(
        limits,
        store.redis_url,
        password=redis_password(store),
        timeout=store.redis_timeout_seconds,
        prefix=store.redis_key_prefix,
    )
