"""Redis clients that fail fast: one timeout per connect and per reply, no retry.

Every Redis the broker talks to (the record, the approvals, the call-rate
counts) sits on the path of a decision, and a decision that cannot be
checked is a denial. A retry would only stretch the wait before the same
denial, so none is made.
"""

from __future__ import annotations

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry


def blocking(url: str, *, password: str | None, timeout: float) -> Redis:
    """A client answering with strings; ValueError if ``url`` cannot be parsed."""
    return Redis.from_url(
        url,
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


def asynchronous(
    url: str, *, password: str | None, timeout: float, decode: bool = True
) -> AsyncRedis:
    """The same for asyncio; ``decode`` False leaves replies as bytes."""
    return AsyncRedis.from_url(
        url,
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=AsyncRetry(NoBackoff(), 0),
        decode_responses=decode,
    )
