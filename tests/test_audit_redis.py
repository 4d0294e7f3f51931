"""The audit record in Redis: one chain for many replicas, fast failure without Redis.

What every store does is tested, on Redis too, in test_audit, test_chain and
test_retention.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from broker import audit_redis
from broker.audit import AuditEntry, SqliteStore
from broker.audit_redis import RedisStore
from broker.config import StoreConfig, config_from_dict
from broker.errors import ConfigError, RecordFailed
from broker.stores import open_store
from tests.redis_support import redis_server
from tests.stores import RedisBacking, redis_backing

pytestmark = pytest.mark.redis

TIMEOUT = 0.3


def _entry(decision_id: str, time: float = 1.0, outcome: str = "allow") -> AuditEntry:
    return AuditEntry(
        decision_id=decision_id,
        time=time,
        method="tools/call",
        outcome=outcome,
        category="allowed" if outcome == "allow" else "forbidden",
    )


@pytest.fixture
def kept() -> Iterator[RedisBacking]:
    with redis_backing() as backing:
        yield backing


def test_replicas_writing_at_once_form_one_chain(kept: RedisBacking) -> None:
    """Four stores, three threads each, writing at once: one chain, nothing lost."""
    stores = [kept.open() for _ in range(4)]

    def write(store: RedisStore, name: str) -> None:
        for n in range(50):
            store.record(_entry(f"{name}-{n}", float(n)))

    threads = [
        threading.Thread(target=write, args=(store, f"r{r}t{t}"))
        for r, store in enumerate(stores)
        for t in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    result = stores[0].verify()
    count = stores[1].count()
    names = {entry.decision_id for entry in stores[2].entries(limit=10_000)}
    for store in stores:
        store.close()
    assert (result.intact, result.checked) == (True, 600)
    assert count == 600
    assert len(names) == 600


def test_an_unreachable_redis_fails_at_once() -> None:
    """Nothing listening: RecordFailed with the reason, well inside the timeout."""
    store = RedisStore.connect("redis://127.0.0.1:1/0", timeout=TIMEOUT)

    started = time.monotonic()
    with pytest.raises(RecordFailed) as failure:
        store.record(_entry("d-1"))

    assert time.monotonic() - started < TIMEOUT
    assert failure.value.decision_id == "d-1"
    assert "d-1 not written: ConnectionError" in failure.value.detail


def test_a_redis_that_never_answers_fails_within_the_timeout() -> None:
    """A listener that accepts and stays silent turns into RecordFailed, not a hang."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        store = RedisStore.connect(f"redis://127.0.0.1:{port}/0", timeout=TIMEOUT)

        started = time.monotonic()
        with pytest.raises(RecordFailed) as failure:
            store.record(_entry("d-1"))
        elapsed = time.monotonic() - started

    assert elapsed < TIMEOUT * 2
    assert "Timeout" in failure.value.detail


def test_recording_resumes_once_a_stalled_redis_answers_again() -> None:
    """While Redis is stopped records fail in time; once it runs, the chain goes on."""
    with redis_server() as server:
        store = RedisStore.connect(server.url, timeout=TIMEOUT)
        store.record(_entry("before", 1.0))
        server.process.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        try:
            with pytest.raises(RecordFailed, match="Timeout"):
                store.record(_entry("stalled", 2.0))
        finally:
            server.process.send_signal(signal.SIGCONT)
        elapsed = time.monotonic() - started
        store.record(_entry("after", 3.0))
        names = [entry.decision_id for entry in store.entries()]
        result = store.verify()
        store.close()

    assert elapsed < TIMEOUT * 2
    # Redis may still run the stalled write once it resumes: the record then
    # holds an entry for a call that was denied, never the other way round.
    assert names in (["before", "after"], ["before", "stalled", "after"])
    assert result.intact


def test_a_record_that_went_back_is_logged(
    kept: RedisBacking, caplog: pytest.LogCaptureFixture
) -> None:
    """Entries vanishing (a Redis restart) are logged as an ERROR; recording goes on."""
    store = kept.open()
    for n in range(3):
        store.record(_entry(f"d{n}"))
    kept.remove_everything()

    with caplog.at_level(logging.ERROR, logger="broker.audit"):
        store.record(_entry("after"))

    assert "AUDIT RECORD WENT BACK from entry #3 to #0" in caplog.text
    assert store.count() == 1
    assert store.verify().intact
    store.close()


def test_every_key_is_under_the_prefix() -> None:
    """Recording, pruning and verifying touch no key outside the configured prefix."""
    with redis_server() as server:
        store = RedisStore.connect(server.url, timeout=TIMEOUT, prefix="tenant-a:")
        store.record(_entry("d1", 1.0, "allow"))
        store.record(_entry("d2", 2.0, "deny"))
        store.record(_entry("d3", 3.0, "allow"))
        store.prune(1.5, now=10.0)
        assert store.verify().intact
        store.close()
        keys = set(server.client().keys("*"))

    names = {"head", "entries", "chain", "time", "time:allow", "time:deny"}
    names.add("checkpoints")
    assert keys == {f"tenant-a:audit:{name}" for name in names}


def test_verify_and_prune_go_page_by_page(
    kept: RedisBacking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With pages of two, a long chain still verifies, prunes, and shows a break."""
    monkeypatch.setattr(audit_redis, "PAGE", 2)
    store = kept.open()
    for n in range(1, 8):
        store.record(_entry(f"d{n}", float(n)))

    assert (store.verify().intact, store.verify().checked) == (True, 7)
    checkpoint = store.prune(5.0, now=10.0)
    assert checkpoint is not None
    assert (checkpoint.through_seq, checkpoint.pruned, store.count()) == (4, 4, 3)
    assert store.verify().intact
    kept.delete(6)
    assert store.verify().broken_at == 7
    store.close()


def test_a_prune_while_verify_walks_is_not_a_break(
    kept: RedisBacking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries pruned by another replica mid-walk make verify start over, not fail."""
    monkeypatch.setattr(audit_redis, "PAGE", 2)
    store, other = kept.open(), kept.open()
    for n in range(1, 9):
        store.record(_entry(f"d{n}", float(n)))
    read_page = store._page
    pruned: list[Any] = []

    def page_after_a_prune(*args: Any, **kwargs: Any) -> Any:
        if not pruned:
            pruned.append(other.prune(5.0, now=10.0))
        return read_page(*args, **kwargs)

    monkeypatch.setattr(store, "_page", page_after_a_prune)
    result = store.verify()
    store.close()
    other.close()

    assert pruned[0] is not None
    assert (result.intact, result.since_seq, result.checked) == (True, 4, 4)


def test_the_password_comes_from_the_variable_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Redis that requires a password accepts the one in the named variable."""
    monkeypatch.setenv("TEST_AUDIT_REDIS_PASSWORD", "not-in-the-toml")
    with redis_server(options=("--requirepass", "not-in-the-toml")) as server:
        config = StoreConfig(
            type="redis",
            redis_url=server.url,
            redis_password_env="TEST_AUDIT_REDIS_PASSWORD",
        )
        with_password = open_store(config)
        without = open_store(replace(config, redis_password_env=""))
        with_password.record(_entry("d1"))
        with pytest.raises(RecordFailed, match="Authentication"):
            without.record(_entry("d2"))
        count = with_password.count()

    assert count == 1


def test_an_unset_password_variable_stops_the_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Naming a variable that is not set is a configuration error naming it."""
    monkeypatch.delenv("TEST_AUDIT_REDIS_PASSWORD", raising=False)
    config = StoreConfig(
        type="redis",
        redis_url="redis://127.0.0.1:6379/0",
        redis_password_env="TEST_AUDIT_REDIS_PASSWORD",
    )

    with pytest.raises(ConfigError, match="TEST_AUDIT_REDIS_PASSWORD"):
        open_store(config)


def test_the_store_type_picks_the_store(tmp_path: Path) -> None:
    """``type`` chooses SQLite or Redis; the prefix and timeout reach the store."""
    redis = open_store(
        StoreConfig(
            type="redis",
            redis_url="redis://127.0.0.1:6379/0",
            redis_key_prefix="elsewhere:",
            redis_timeout_seconds=0.7,
        )
    )
    sqlite = open_store(StoreConfig(path=str(tmp_path / "audit.db")))

    assert isinstance(redis, RedisStore)
    assert (redis.keys.prefix, redis.timeout) == ("elsewhere:", 0.7)
    assert isinstance(sqlite, SqliteStore)
    redis.close()
    sqlite.close()


def _config(store: dict[str, Any]) -> Any:
    return config_from_dict(
        {
            "broker": {"resource": "http://127.0.0.1:1/mcp", "development": True},
            "store": store,
        }
    )


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ({"type": "redis"}, "needs redis_url"),
        ({"type": "redis", "redis_url": "http://x"}, "redis_url must be"),
        ({"type": "postgres"}, "not supported"),
        ({"redis_key_prefix": ""}, "redis_key_prefix"),
        ({"redis_key_prefix": "a b:"}, "redis_key_prefix"),
        ({"redis_key_prefix": 7}, "redis_key_prefix"),
    ],
)
def test_a_bad_redis_store_table_is_refused(
    store: dict[str, Any], message: str
) -> None:
    """A Redis store without a URL, or with an unusable prefix, stops the start."""
    with pytest.raises(ConfigError, match=message):
        _config(store)


def test_a_redis_store_table_is_read() -> None:
    """The Redis keys of ``[store]`` come through as written."""
    config = _config(
        {
            "type": "redis",
            "redis_url": "rediss://cache.internal:6380/2",
            "redis_password_env": "AUDIT_REDIS_PASSWORD",
            "redis_key_prefix": "broker-eu:",
            "redis_timeout_seconds": 0.5,
        }
    )

    assert config.store.type == "redis"
    assert config.store.redis_url == "rediss://cache.internal:6380/2"
    assert config.store.redis_key_prefix == "broker-eu:"
    assert config.store.redis_timeout_seconds == 0.5
