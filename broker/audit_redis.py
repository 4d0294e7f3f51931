"""The audit record in Redis: one chain shared by every replica that points at it.

Entries are chained exactly as in SQLite (``broker.chain``), whichever
replica wrote each one, and ``verify`` walks them the same way. The keys,
all under the configured prefix (``broker:`` by default)::

    audit:head          hash: ``seq`` and ``hash`` of the last entry
    audit:entries       hash: one field per entry, its sequence number padded
                        to 20 digits, holding the JSON object
                        {prev_hash, entry_hash, entry}
    audit:chain         sorted set of those fields, scored by sequence number
    audit:time          the same fields scored by time; audit:time:allow and
                        audit:time:deny hold one outcome each
    audit:checkpoints   list of checkpoints as JSON, the newest last

The padding makes entries of the same time sort by sequence number within a
score, the order SQLite reads them in. Every Redis error, a refused
connection and a timeout included, becomes RecordFailed, so a dead or slow
Redis denies calls within the configured timeout instead of holding them.

An entry is as durable as Redis makes it: it outlives a Redis restart only
with append-only persistence on, and a power cut only with ``appendfsync
always``. A replica that finds fewer entries than it wrote says so loudly.
Commands need Redis 6.2 or later; Redis Cluster is not supported.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from broker import chain, redis_clients
from broker.audit import AuditEntry
from broker.chain import Checkpoint, Head, Link, Verification
from broker.errors import RecordFailed

log = logging.getLogger("broker.audit")

KEY_PREFIX = "broker:"
OUTCOMES = ("allow", "deny")

# How many entries one read of the chain, or one step of a prune, handles:
# each is one short script, so Redis never stalls on a long record.
PAGE = 500

# Appending. The entry's hash covers the hash of the entry before it, so the
# tail must be read and the entry written as one step across replicas. Lua in
# Redis has SHA-1 but no SHA-256, and hashing in one place (broker.chain) is
# what makes the chain mean the same in every store; so the client hashes and
# the script only checks and writes. Given the tail the client hashed
# against, it writes the entry, its indexes and the new head, or, if another
# replica moved the tail first, writes nothing and answers the tail it
# found; the client hashes again against that and retries. Unlike
# WATCH/MULTI/EXEC this is one round trip and needs no connection of its
# own, and each store remembers the tail it last wrote, so a replica that
# is not contended never reads the head on its own.
#
# Every lost try means another entry was written, so the chain always moves
# on, but one writer can keep losing; it gives up with RecordFailed once the
# store's timeout has passed. One chain takes about one entry per round trip
# to Redis, for all replicas together. (A turn that a losing writer could
# claim was tried and dropped: with more writers than cores, a holder that
# was not scheduled stalled everyone, halving throughput with no better
# worst case.)
#
# KEYS: head, entries, chain, time, time of this outcome
# ARGV: expected seq, expected hash, new seq, field, new hash, row, time, genesis
# Returns nil once written, or the tail {seq, hash} the entry must follow.
_APPEND = """
local head = redis.call('HMGET', KEYS[1], 'seq', 'hash')
local seq = tonumber(head[1]) or 0
local hash = head[2] or ARGV[8]
local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
if last[2] and tonumber(last[2]) > seq then
  -- The head was moved back or removed: follow the last entry, as SQLite
  -- does, so recording goes on and verify reports the break.
  seq = tonumber(last[2])
  local raw = redis.call('HGET', KEYS[2], last[1]) or ''
  local ok, row = pcall(cjson.decode, raw)
  hash = ''
  if ok and type(row) == 'table' and type(row.entry_hash) == 'string' then
    hash = row.entry_hash
  end
end
if seq ~= tonumber(ARGV[1]) or hash ~= ARGV[2] then
  return {seq, hash}
end
if redis.call('HSETNX', KEYS[2], ARGV[4], ARGV[6]) == 0 then
  return redis.error_reply('entry #' .. ARGV[3] .. ' exists: the record was altered')
end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[7], ARGV[4])
redis.call('ZADD', KEYS[5], ARGV[7], ARGV[4])
redis.call('HSET', KEYS[1], 'seq', ARGV[3], 'hash', ARGV[5])
return false
"""

# One page of the chain with the latest checkpoint, read in one step, so that
# a prune between two pages is seen (the checkpoint changes) rather than
# taken for entries removed behind the record's back.
# KEYS: checkpoints, chain, entries
# ARGV: after seq, up to seq, count
# Returns {latest checkpoint, seq, row, seq, row, ...}; a missing row is nil.
_PAGE = """
local found = redis.call('ZRANGE', KEYS[2], '(' .. ARGV[1], ARGV[2],
  'BYSCORE', 'LIMIT', 0, ARGV[3], 'WITHSCORES')
local reply = {redis.call('LINDEX', KEYS[1], -1)}
for i = 1, #found, 2 do
  table.insert(reply, found[i + 1])
  table.insert(reply, redis.call('HGET', KEYS[3], found[i]))
end
return reply
"""

# A checkpoint is added only if nothing it was computed from has changed:
# the latest checkpoint, the row it takes its hash from, the number of
# entries it stands for. Otherwise another replica pruned meanwhile.
# KEYS: checkpoints, chain, entries
# ARGV: latest checkpoint ('' if none), field, row, through seq, pruned, checkpoint
_CHECKPOINT = """
if (redis.call('LINDEX', KEYS[1], -1) or '') ~= ARGV[1]
    or redis.call('HGET', KEYS[3], ARGV[2]) ~= ARGV[3]
    or redis.call('ZCOUNT', KEYS[2], '-inf', ARGV[4]) ~= tonumber(ARGV[5]) then
  return 0
end
redis.call('RPUSH', KEYS[1], ARGV[6])
return 1
"""

# Removes up to a page of entries at or before a checkpoint; 0 when done.
# KEYS: entries, chain, time, time:allow, time:deny
# ARGV: through seq, count
_DROP = """
local fields = redis.call('ZRANGE', KEYS[2], '-inf', ARGV[1],
  'BYSCORE', 'LIMIT', 0, ARGV[2])
if #fields == 0 then
  return 0
end
redis.call('HDEL', KEYS[1], unpack(fields))
for i = 2, 5 do
  redis.call('ZREM', KEYS[i], unpack(fields))
end
return #fields
"""

# How often verify starts again because a prune moved the checkpoint.
VERIFY_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class AuditKeys:
    """The names of the record's keys under one prefix."""

    prefix: str

    @property
    def head(self) -> str:
        return f"{self.prefix}audit:head"

    @property
    def entries(self) -> str:
        return f"{self.prefix}audit:entries"

    @property
    def chain(self) -> str:
        return f"{self.prefix}audit:chain"

    @property
    def checkpoints(self) -> str:
        return f"{self.prefix}audit:checkpoints"

    def time(self, outcome: str | None = None) -> str:
        """The time index of every entry, or of those with ``outcome``."""
        base = f"{self.prefix}audit:time"
        return base if outcome is None else f"{base}:{outcome}"


def field(seq: int) -> str:
    """The name an entry is kept under."""
    return f"{seq:020d}"


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """Where a walk of the chain starts and ends, read in one step."""

    checkpoint: str | None
    start: Head
    head: Head
    end: int


class _Pruned(Exception):
    """The record was pruned during a walk of the chain; walk it again."""


class RedisStore:
    """Audit entries in Redis, appended to one chain by any number of replicas.

    Calls are synchronous, like SQLite's, and bounded by the client's socket
    timeouts; ``connect`` sets both to the configured timeout and turns off
    the client's own retries, which would only stretch a denial.
    """

    def __init__(
        self, client: Redis, *, prefix: str = KEY_PREFIX, timeout: float = 1.0
    ) -> None:
        self.keys = AuditKeys(prefix)
        # How long one record may keep retrying while other replicas write.
        self.timeout = timeout
        self._client: Redis | None = client
        self._lock = threading.Lock()
        # The tail this store last wrote: the first guess for the next entry.
        self._tail = chain.START
        self._append = client.register_script(_APPEND)
        self._page = client.register_script(_PAGE)
        self._checkpoint = client.register_script(_CHECKPOINT)
        self._drop = client.register_script(_DROP)

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        password: str | None = None,
        timeout: float,
        prefix: str = KEY_PREFIX,
    ) -> RedisStore:
        """A store on the Redis at ``url``; nothing connects before first use.

        ValueError if the URL cannot be parsed.
        """
        client = redis_clients.blocking(url, password=password, timeout=timeout)
        return cls(client, prefix=prefix, timeout=timeout)

    def record(self, entry: AuditEntry) -> None:
        failure = f"audit entry {entry.decision_id} not written"
        body = _body(entry, failure)
        with _mapped(failure, entry.decision_id), self._lock:
            if self._append_entry(entry, body):
                return
        raise RecordFailed(
            f"{failure}: other replicas kept the chain's head moving "
            f"for {self.timeout:g}s",
            decision_id=entry.decision_id,
        )

    def entries(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        outcome: str | None = None,
        limit: int = 1000,
    ) -> list[AuditEntry]:
        if limit <= 0:
            return []
        low = "-inf" if since is None else repr(float(since))
        high = "+inf" if until is None else f"({float(until)!r}"
        with _mapped("audit entries not read"):
            client = self._connected()
            index = self.keys.time(outcome)
            fields = cast(
                list[str],
                client.zrange(index, low, high, byscore=True, offset=0, num=limit),
            )
            if not fields:
                return []
            rows = cast(list[str | None], client.hmget(self.keys.entries, fields))
        # A row gone since its index was read was pruned in between.
        found = zip(fields, rows, strict=True)
        return [_readable(name, row) for name, row in found if row is not None]

    def count(self) -> int:
        with _mapped("audit entries not counted"):
            return int(self._connected().zcard(self.keys.chain))

    def verify(self) -> Verification:
        with _mapped("audit chain not read"):
            for _ in range(VERIFY_ATTEMPTS):
                snapshot = self._snapshot()
                links = self._walk(snapshot)
                try:
                    return chain.verify(links, start=snapshot.start, head=snapshot.head)
                except _Pruned:
                    continue
        raise RecordFailed(
            f"audit chain not read: pruned again on each of {VERIFY_ATTEMPTS} walks"
        )

    def prune(self, before: float, *, now: float) -> Checkpoint | None:
        with _mapped("audit entries not pruned"):
            client = self._connected()
            latest = cast(str | None, client.lindex(self.keys.checkpoints, -1))
            start = _checkpoint_from(latest).through_seq if latest else 0
            through = self._prunable(start, before)
            if through is None:
                return None
            checkpoint = self._mark(latest, through, before, now)
            if checkpoint is None:
                return None
            # Entries go only after their checkpoint is in place, a page at a
            # time; if this stops half-way, verify starts after the checkpoint
            # and the next prune removes what was left.
            while self._drop(self._index_keys(), [through, PAGE], self._connected()):
                pass
        return checkpoint

    def ping(self) -> None:
        """RecordFailed unless Redis answers now; what readiness checks."""
        with _mapped("audit store not reachable"):
            self._connected().ping()

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # ---- the pieces ---------------------------------------------------------------

    def _connected(self) -> Redis:
        if self._client is None:
            raise RedisConnectionError("the store was closed")
        return self._client

    def _append_entry(self, entry: AuditEntry, body: bytes) -> bool:
        """Append ``body`` as the tail moves under it; False if time ran out."""
        keys = [
            self.keys.head,
            self.keys.entries,
            self.keys.chain,
            self.keys.time(),
            self.keys.time(entry.outcome),
        ]
        deadline = time.monotonic() + self.timeout
        tail = self._tail
        while True:
            link = Head(tail.seq + 1, chain.link_hash(body, tail.hash))
            args = _append_args(tail, link, body, entry.time)
            found = self._append(keys, args, client=self._connected())
            if found is None:
                self._tail = link
                return True
            tail = self._moved_to(Head(int(found[0]), str(found[1])))
            if time.monotonic() >= deadline:
                return False

    def _moved_to(self, found: Head) -> Head:
        """The tail another replica left; says so loudly if the record went back."""
        if found.seq < self._tail.seq:
            log.error(
                "AUDIT RECORD WENT BACK from entry #%d to #%d: entries were lost or "
                "removed (a Redis restart without persistence, or tampering); "
                "recording goes on from #%d",
                self._tail.seq,
                found.seq,
                found.seq + 1,
            )
        return found

    def _snapshot(self) -> _Snapshot:
        """The latest checkpoint, the head and the last entry, as of one instant.

        An entry and the head move together, so at any instant they agree;
        entries written after this instant lie past ``end`` and are not walked.
        """
        pipe = self._connected().pipeline(transaction=True)
        pipe.lindex(self.keys.checkpoints, -1)
        pipe.hmget(self.keys.head, ["seq", "hash"])
        pipe.zrange(self.keys.chain, -1, -1, withscores=True)
        latest, (seq, hashed), last = pipe.execute()
        start = _checkpoint_from(latest).head if latest else chain.START
        head = _head(seq, hashed)
        end = max(head.seq, int(last[0][1]) if last else 0, start.seq)
        return _Snapshot(latest, start, head, end)

    def _walk(self, snapshot: _Snapshot) -> Iterator[Link]:
        after = snapshot.start.seq
        while after < snapshot.end:
            reply = self._page(
                [self.keys.checkpoints, self.keys.chain, self.keys.entries],
                [after, snapshot.end, PAGE],
                client=self._connected(),
            )
            if reply[0] != snapshot.checkpoint:
                raise _Pruned
            pairs = list(zip(reply[1::2], reply[2::2], strict=True))
            for score, row in pairs:
                yield _link(int(float(score)), row)
            if len(pairs) < PAGE:
                return
            after = int(float(pairs[-1][0]))

    def _prunable(self, start: int, before: float) -> int | None:
        """The last of the run of entries after ``start`` all older than ``before``."""
        client = self._connected()
        through = None
        while True:
            page = cast(
                list[tuple[str, float]],
                client.zrange(
                    self.keys.chain,
                    f"({start}",
                    "+inf",
                    byscore=True,
                    offset=0,
                    num=PAGE,
                    withscores=True,
                ),
            )
            if not page:
                return through
            times = client.zmscore(self.keys.time(), [name for name, _ in page])
            for (_, seq), when in zip(page, times, strict=True):
                if when is None or when >= before:
                    return through
                through = start = int(seq)

    def _mark(
        self, latest: str | None, through: int, before: float, now: float
    ) -> Checkpoint | None:
        """Add the checkpoint for entries up to ``through``; None if that cannot be."""
        client = self._connected()
        row = cast(str | None, client.hget(self.keys.entries, field(through)))
        hashed = _link(through, row).entry_hash
        if row is None or not hashed:
            return None  # the chain is already broken there; keep the evidence
        pruned = int(client.zcount(self.keys.chain, "-inf", through))
        checkpoint = Checkpoint(through, hashed, pruned, before, now)
        added = self._checkpoint(
            [self.keys.checkpoints, self.keys.chain, self.keys.entries],
            [latest or "", field(through), row, through, pruned, _json(checkpoint)],
            client=client,
        )
        return checkpoint if added else None

    def _index_keys(self) -> list[str]:
        return [
            self.keys.entries,
            self.keys.chain,
            self.keys.time(),
            *(self.keys.time(outcome) for outcome in OUTCOMES),
        ]


@contextmanager
def _mapped(what: str, decision_id: str | None = None) -> Iterator[None]:
    """Turn every Redis error into RecordFailed, the reason kept for the log."""
    try:
        yield
    except (RedisError, OSError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise RecordFailed(f"{what}: {reason}", decision_id=decision_id) from exc


def _body(entry: AuditEntry, failure: str) -> bytes:
    """The canonical form of ``entry``, or RecordFailed if it cannot be kept."""
    if entry.outcome not in OUTCOMES:
        raise RecordFailed(
            f"{failure}: outcome {entry.outcome!r} is neither allow nor deny",
            decision_id=entry.decision_id,
        )
    try:
        return chain.canonical(entry)
    except (TypeError, ValueError) as exc:
        raise RecordFailed(
            f"{failure}: arguments are not JSON", decision_id=entry.decision_id
        ) from exc


def _append_args(tail: Head, link: Head, body: bytes, when: float) -> list[Any]:
    # The canonical form goes in as it is: what is kept is what was hashed.
    row = (
        f'{{"prev_hash":{json.dumps(tail.hash)},'
        f'"entry_hash":{json.dumps(link.hash)},'
        f'"entry":{body.decode()}}}'
    )
    return [
        tail.seq,
        tail.hash,
        link.seq,
        field(link.seq),
        link.hash,
        row,
        repr(float(when)),
        chain.GENESIS,
    ]


def _head(seq: str | None, hashed: str | None) -> Head:
    """The stored head; a missing or unreadable one counts as the chain's start.

    verify then reports the entries as not ending where the head says.
    """
    if seq is None or hashed is None or not seq.isdigit():
        return chain.START
    return Head(int(seq), hashed)


def _checkpoint_from(raw: str) -> Checkpoint:
    try:
        fields = json.loads(raw)
        return Checkpoint(
            int(fields["through_seq"]),
            str(fields["hash"]),
            int(fields["pruned"]),
            float(fields["before"]),
            float(fields["time"]),
        )
    except (TypeError, ValueError, KeyError) as exc:
        raise RecordFailed(
            "the latest audit checkpoint cannot be read: it was altered"
        ) from exc


def _json(checkpoint: Checkpoint) -> str:
    return json.dumps(
        {
            "through_seq": checkpoint.through_seq,
            "hash": checkpoint.hash,
            "pruned": checkpoint.pruned,
            "before": checkpoint.before,
            "time": checkpoint.time,
        }
    )


def _link(seq: int, raw: str | None) -> Link:
    """An entry as stored; a row that cannot be read gives a link that fits nothing."""
    try:
        row = json.loads(raw) if raw is not None else {}
    except ValueError:
        row = {}
    if not isinstance(row, dict):
        row = {}
    try:
        entry: AuditEntry | None = _entry(row.get("entry"))
    except (TypeError, ValueError):
        entry = None
    return Link(seq, entry, _text(row.get("prev_hash")), _text(row.get("entry_hash")))


def _readable(name: str, raw: str) -> AuditEntry:
    entry = _link(0, raw).entry
    if entry is None:
        seq = name.lstrip("0")
        raise RecordFailed(f"audit entry #{seq} cannot be read back: it was altered")
    return entry


def _entry(fields: object) -> AuditEntry:
    if not isinstance(fields, dict):
        raise TypeError("an entry is a JSON object")
    for name in ("reasons", "errors", "data_classes", "groups", "scopes"):
        if not isinstance(fields.get(name), list):
            raise TypeError(f"{name} is a list")
        fields[name] = tuple(fields[name])
    return AuditEntry(**fields)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""
