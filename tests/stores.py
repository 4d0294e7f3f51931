"""Where contract tests keep an audit record, and how each kind is tampered with.

A backing is one record: a SQLite file, or a set of keys under a prefix of
its own in the Redis on 127.0.0.1:6379. It opens stores on that record and
changes it behind their backs, as someone with access to the file or to
Redis could: editing, deleting or exchanging entries, moving the head.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import pytest
from redis import Redis
from redis.exceptions import RedisError

from broker.audit import AuditEntry, SqliteStore, Store
from broker.audit_redis import AuditKeys, RedisStore, field

REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_TIMEOUT = 0.5
KINDS = ("sqlite", pytest.param("redis", marks=pytest.mark.redis))

_LISTS = {"reasons", "errors", "data_classes", "groups", "scopes"}
_HASHES = {"prev_hash", "entry_hash"}
_COLUMNS = set(AuditEntry.__dataclass_fields__) | _HASHES


class Backing(Protocol):
    kind: str

    def open(self) -> Store:
        """A new store on this record."""

    def store_table(self) -> dict[str, Any]:
        """The ``[store]`` table of a broker that keeps its record here."""

    def hashes(self, seq: int) -> tuple[str, str]:
        """The stored prev_hash and entry_hash of entry ``seq``."""

    def edit(self, seq: int, **fields: Any) -> None:
        """Change what entry ``seq`` says (hashes included, if named)."""

    def delete(self, *seqs: int) -> None:
        """Remove entries entirely."""

    def swap(self, first: int, second: int) -> None:
        """Exchange two whole entries, hashes and all."""

    def garble(self, seq: int) -> None:
        """Leave entry ``seq`` in a form that no longer reads as an entry."""

    def drop_head(self) -> None:
        """Remove the stored head."""

    def move_head(self, seq: int) -> None:
        """Point the stored head's sequence number at ``seq``."""


class SqliteBacking:
    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path

    def open(self) -> SqliteStore:
        return SqliteStore(self.path)

    def store_table(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def hashes(self, seq: int) -> tuple[str, str]:
        with sqlite3.connect(self.path) as db:
            row = db.execute(
                "SELECT prev_hash, entry_hash FROM audit_entries WHERE seq = ?", (seq,)
            ).fetchone()
        return str(row[0]), str(row[1])

    def edit(self, seq: int, **fields: Any) -> None:
        unknown = set(fields) - _COLUMNS
        if unknown:
            raise ValueError(f"not columns: {unknown}")
        for name, value in fields.items():
            # Column names come from the check above, never from a test's data.
            statement = f"UPDATE audit_entries SET {name} = ? WHERE seq = ?"  # noqa: S608
            self._run((statement, (_column(name, value), seq)))

    def delete(self, *seqs: int) -> None:
        self._run(*(("DELETE FROM audit_entries WHERE seq = ?", (s,)) for s in seqs))

    def swap(self, first: int, second: int) -> None:
        move = "UPDATE audit_entries SET seq = ? WHERE seq = ?"
        self._run((move, (-1, first)), (move, (first, second)), (move, (second, -1)))

    def garble(self, seq: int) -> None:
        statement = "UPDATE audit_entries SET reasons = 'not json' WHERE seq = ?"
        self._run((statement, (seq,)))

    def drop_head(self) -> None:
        self._run(("DELETE FROM audit_head", ()))

    def move_head(self, seq: int) -> None:
        self._run(("UPDATE audit_head SET seq = ?", (seq,)))

    def _run(self, *statements: tuple[str, tuple[object, ...]]) -> None:
        with sqlite3.connect(self.path) as db:
            for statement, params in statements:
                db.execute(statement, params)


def _column(name: str, value: Any) -> object:
    if name in _LISTS:
        return json.dumps(list(value))
    if name == "arguments":
        return json.dumps(value)
    if name == "shadow":
        return int(value)
    return value


class RedisBacking:
    kind = "redis"

    def __init__(self, client: Redis, prefix: str) -> None:
        self.prefix = prefix
        self.keys = AuditKeys(prefix)
        self._redis = client

    def open(self) -> RedisStore:
        return RedisStore.connect(REDIS_URL, timeout=REDIS_TIMEOUT, prefix=self.prefix)

    def store_table(self) -> dict[str, Any]:
        return {
            "type": "redis",
            "redis_url": REDIS_URL,
            "redis_key_prefix": self.prefix,
            "redis_timeout_seconds": REDIS_TIMEOUT,
        }

    def hashes(self, seq: int) -> tuple[str, str]:
        row = self._row(seq)
        return row["prev_hash"], row["entry_hash"]

    def edit(self, seq: int, **fields: Any) -> None:
        row = self._row(seq)
        for name, value in fields.items():
            if name in _HASHES:
                row[name] = value
            else:
                row["entry"][name] = list(value) if name in _LISTS else value
        self._put(seq, row)

    def delete(self, *seqs: int) -> None:
        for seq in seqs:
            self._remove(seq)

    def swap(self, first: int, second: int) -> None:
        rows = self._row(first), self._row(second)
        self.delete(first, second)
        self._put(first, rows[1])
        self._put(second, rows[0])

    def garble(self, seq: int) -> None:
        row = self._row(seq)
        row["entry"]["reasons"] = "not json"
        self._put(seq, row)

    def drop_head(self) -> None:
        self._redis.delete(self.keys.head)

    def move_head(self, seq: int) -> None:
        self._redis.hset(self.keys.head, "seq", seq)

    def remove_everything(self) -> None:
        keys = list(self._redis.scan_iter(match=f"{self.prefix}*"))
        if keys:
            self._redis.delete(*keys)

    def _row(self, seq: int) -> dict[str, Any]:
        raw = self._redis.hget(self.keys.entries, field(seq))
        if raw is None:
            raise KeyError(f"no entry #{seq}")
        row: dict[str, Any] = json.loads(str(raw))
        return row

    def _put(self, seq: int, row: dict[str, Any]) -> None:
        """Write ``row`` as entry ``seq``, indexed by its time and outcome."""
        name, entry = field(seq), row["entry"]
        self._remove(seq)
        self._redis.hset(self.keys.entries, name, json.dumps(row))
        self._redis.zadd(self.keys.chain, {name: seq})
        self._redis.zadd(self.keys.time(), {name: entry["time"]})
        self._redis.zadd(self.keys.time(entry["outcome"]), {name: entry["time"]})

    def _remove(self, seq: int) -> None:
        name = field(seq)
        self._redis.hdel(self.keys.entries, name)
        for key in (self.keys.chain, self.keys.time()):
            self._redis.zrem(key, name)
        for outcome in ("allow", "deny"):
            self._redis.zrem(self.keys.time(outcome), name)


def redis_client() -> Redis:
    """The test Redis, or a failed test (never a skip) if it does not answer."""
    client = Redis.from_url(REDIS_URL, socket_timeout=2, decode_responses=True)
    try:
        client.ping()
    except RedisError as exc:
        client.close()
        pytest.fail(f"Redis at {REDIS_URL} is not answering: {exc}")
    return client


@contextmanager
def redis_backing() -> Iterator[RedisBacking]:
    """A record of its own in the test Redis, its keys removed afterwards."""
    client = redis_client()
    backing = RedisBacking(client, f"test:{uuid.uuid4().hex}:")
    try:
        yield backing
    finally:
        backing.remove_everything()
        client.close()


@contextmanager
def opened_backing(kind: str, tmp_path: Path) -> Iterator[Backing]:
    if kind == "sqlite":
        yield SqliteBacking(tmp_path / "audit.db")
        return
    with redis_backing() as backing:
        yield backing
