"""Opening the audit store that ``[store] type`` names, and asking if it answers.

A Redis that does not answer at start does not stop the broker: it starts,
says so loudly, reports itself not ready, and denies every call until the
record can be written again, since no call may go ahead unrecorded. Refusing
to start instead would turn a short Redis outage into replicas that stay
down after Redis is back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from broker.audit import SqliteStore, Store
from broker.audit_redis import RedisStore
from broker.config import StoreConfig, redis_password
from broker.errors import ConfigError, RecordFailed

log = logging.getLogger("broker.audit")

Probe = Callable[[], None]


def open_store(config: StoreConfig) -> Store:
    """The configured store; ConfigError if it cannot be set up at all."""
    if config.type == "redis":
        return _redis(config)
    return SqliteStore(config.path)


def _redis(config: StoreConfig) -> RedisStore:
    try:
        return RedisStore.connect(
            config.redis_url,
            password=redis_password(config),
            timeout=config.redis_timeout_seconds,
            prefix=config.redis_key_prefix,
        )
    except ValueError as exc:
        # The message is the client's and never repeats the URL, which may
        # carry a password despite the advice to keep it in the environment.
        raise ConfigError(f"[store] redis_url cannot be used: {exc}") from exc


def probe_for(store: Store) -> Probe:
    """What readiness calls to learn whether entries can be written now.

    It raises RecordFailed when they cannot. A SQLite file on local disk has
    nothing to ask ahead of a write, so its probe always passes.
    """
    if isinstance(store, RedisStore):
        return store.ping
    return _always


def _always() -> None:
    return None


def say_if_unreachable(probe: Probe) -> None:
    """Log an ERROR at start if the store does not answer."""
    try:
        probe()
    except RecordFailed as exc:
        log.error(
            "AUDIT STORE UNREACHABLE: %s. The broker starts but denies every "
            "call until the record can be written again; /readyz says so.",
            exc.detail,
        )
