"""Pending actions in Redis, shared by every replica that points at the same one.

Every change of state is one script (``redis_keys``), so two replicas cannot
both decide an action or both spend an approval. A decision becomes usable,
and waiters on any replica hear of it, only in a second step taken once the
decision is recorded: an approval is never spent before its record exists.
A change whose record fails is undone by a third script; if Redis fails in
between as well, the change stands unrecorded and the log says so.

Every call is bounded by the connection's socket timeouts, with the
client's retries off, and every Redis error becomes StoreFailed: a dead or
slow Redis denies the calls that need an approval instead of holding them.
The client connects again on the next call, so the store recovers by itself
when Redis is back, with whatever Redis kept: pending actions outlive a
restart of Redis only with its append-only persistence on.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import cast

import anyio
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import PubSub
from redis.commands.core import Script
from redis.exceptions import RedisError

from broker import redis_clients
from broker.approvals import redis_keys
from broker.approvals.model import Binding, PendingAction, Status, action_from_fields
from broker.approvals.redis_keys import ApprovalKeys, binding_key
from broker.approvals.store import Record
from broker.errors import NotFound, NotPending, StoreFailed

log = logging.getLogger("broker.approvals")

KEY_PREFIX = "broker:"
# How many overdue actions one run of the expiry script marks.
EXPIRE_PAGE = 200


class RedisApprovalStore:
    """Pending actions in Redis: any replica may decide, spend or wait on one.

    Calls are synchronous, like SQLite's, and bounded by the socket timeouts.
    A wait listens on the action's channel through a connection of its own,
    opened for that wait and closed after it.
    """

    def __init__(
        self,
        client: Redis,
        listener: Callable[[], AsyncRedis],
        *,
        timeout: float,
        prefix: str = KEY_PREFIX,
    ) -> None:
        self.keys = ApprovalKeys(prefix)
        self.timeout = timeout
        self._client = client
        self._listener = listener
        self._add = client.register_script(redis_keys.ADD)
        self._forget = client.register_script(redis_keys.FORGET)
        self._decide = client.register_script(redis_keys.DECIDE)
        self._release = client.register_script(redis_keys.RELEASE)
        self._undecide = client.register_script(redis_keys.UNDECIDE)
        self._consume = client.register_script(redis_keys.CONSUME)
        self._unconsume = client.register_script(redis_keys.UNCONSUME)
        self._expire = client.register_script(redis_keys.EXPIRE)
        self._listed = client.register_script(redis_keys.LISTED)

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        password: str | None = None,
        timeout: float,
        prefix: str = KEY_PREFIX,
    ) -> RedisApprovalStore:
        """A store on the Redis at ``url``; nothing connects before first use.

        ValueError if the URL cannot be parsed.
        """
        client = redis_clients.blocking(url, password=password, timeout=timeout)

        def listener() -> AsyncRedis:
            return redis_clients.asynchronous(url, password=password, timeout=timeout)

        return cls(client, listener, timeout=timeout, prefix=prefix)

    def add(self, action: PendingAction, record: Record) -> None:
        keys = [
            self.keys.action(action.id),
            self.keys.status(Status.PENDING),
            self.keys.due,
        ]
        args = [action.id, repr(action.created), repr(action.expires)]
        with _mapped(f"action {action.id} not kept"):
            self._add(keys, args + _fields(action))
        try:
            record(action)
        except BaseException:
            undo = [
                self.keys.action(action.id),
                self.keys.due,
                self.keys.usable(action.binding),
                *self.keys.statuses(),
            ]
            self._undo(self._forget, undo, [action.id], f"creation of {action.id}")
            raise

    def get(self, action_id: str) -> PendingAction:
        with _mapped(f"action {action_id} not read"):
            fields = self._client.hgetall(self.keys.action(action_id))
        if not fields:
            raise NotFound(f"no pending action {action_id!r}")
        return _action(cast(dict[str, str], fields))

    def count(self, status: Status) -> int:
        with _mapped(f"{status.value} actions not counted"):
            found = self._client.zcard(self.keys.status(status))
        return int(found)

    def listed(self, status: Status, *, limit: int = 200) -> list[PendingAction]:
        if limit <= 0:
            return []
        keys = [self.keys.status(status)]
        with _mapped(f"{status.value} actions not listed"):
            rows = self._listed(keys, [self.keys.action(), limit])
        return [_action(_pairs(row)) for row in rows if row]

    def decide(
        self,
        action_id: str,
        status: Status,
        *,
        approver: str,
        reason: str,
        now: float,
        record: Record,
    ) -> PendingAction:
        if status not in (Status.APPROVED, Status.REJECTED):
            raise ValueError(f"an approver cannot set {status.value}")
        keys = [
            self.keys.action(action_id),
            self.keys.status(Status.PENDING),
            self.keys.status(status),
            self.keys.due,
        ]
        args = [action_id, status.value, approver, reason, repr(now)]
        with _mapped(f"action {action_id} not decided"):
            row = self._decide(keys, args)
        if not row:
            raise NotPending(f"action {action_id} is not pending")
        action = _action(_pairs(row))
        try:
            record(action)
        except BaseException:
            undo = [
                self.keys.action(action_id),
                self.keys.status(status),
                self.keys.status(Status.PENDING),
                self.keys.due,
            ]
            what = f"decision on {action_id}"
            self._undo(self._undecide, undo, [action_id, status.value], what)
            raise
        with _mapped(f"decision on {action_id} recorded but not put in force"):
            usable = self.keys.usable(action.binding)
            channel = self.keys.changed(action_id)
            self._release([keys[0], usable], [action_id, channel])
        return action

    def consume(
        self, binding: Binding, now: float, record: Record
    ) -> PendingAction | None:
        usable = self.keys.usable(binding)
        keys = [
            usable,
            self.keys.due,
            self.keys.status(Status.APPROVED),
            self.keys.status(Status.USED),
        ]
        with _mapped("approval not spent"):
            row = self._consume(keys, [self.keys.action(), repr(now)])
        if not row:
            return None
        action = _action(_pairs(row))
        try:
            record(action)
        except BaseException:
            undo = [
                self.keys.action(action.id),
                usable,
                self.keys.due,
                self.keys.status(Status.USED),
                self.keys.status(Status.APPROVED),
            ]
            self._undo(self._unconsume, undo, [action.id], f"use of {action.id}")
            raise
        return action

    def expire(self, now: float) -> list[PendingAction]:
        keys = [
            self.keys.due,
            self.keys.status(Status.PENDING),
            self.keys.status(Status.APPROVED),
            self.keys.status(Status.EXPIRED),
        ]
        expired: list[PendingAction] = []
        with _mapped("overdue actions not expired"):
            while True:
                rows = self._expire(keys, [self.keys.base, repr(now), EXPIRE_PAGE])
                expired += [_action(_pairs(row)) for row in rows]
                if len(rows) < EXPIRE_PAGE:
                    return expired

    async def wait(self, action_id: str, within: float) -> PendingAction:
        # Listen before looking, so a decision between the two is not missed.
        client = self._listener()
        pubsub = client.pubsub()
        try:
            with _mapped(f"action {action_id} not watched"):
                await self._subscribe(pubsub, self.keys.changed(action_id))
                action = self.get(action_id)
                if action.status is Status.PENDING:
                    with anyio.move_on_after(within):
                        await _changed(pubsub)
                    action = self.get(action_id)
        finally:
            with anyio.CancelScope(shield=True):
                await _closed(client)
        return action

    def close(self) -> None:
        self._client.close()

    # ---- the pieces ---------------------------------------------------------------

    async def _subscribe(self, pubsub: PubSub, channel: str) -> None:
        """Subscribe, and read Redis's confirmation if it comes in time.

        Once it is read, no message on the channel can be missed. A busy
        event loop may read it late, though Redis answered at once; the
        wait then goes on without it rather than deny the call: the next
        read of the action fails if Redis is really gone, and a decision
        that slipped through the gap is read when the wait runs out.
        """
        await pubsub.subscribe(channel)
        confirmed = await pubsub.get_message(timeout=self.timeout)
        if confirmed is not None and confirmed["type"] != "subscribe":
            raise RedisError(f"no confirmation of the subscription to {channel}")

    def _undo(
        self, script: Script, keys: Sequence[str], args: Sequence[str], what: str
    ) -> None:
        """Take back a change whose record failed; say so if even that fails."""
        try:
            script(keys, args)
        except (RedisError, OSError) as exc:
            log.error(
                "APPROVALS STORE: the %s was not recorded and could not be "
                "undone (%s: %s); it stands unrecorded",
                what,
                type(exc).__name__,
                exc,
            )


async def _changed(pubsub: PubSub) -> None:
    """Return once a message arrives on the channel ``pubsub`` listens to."""
    while True:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
        if message is not None:
            return


async def _closed(client: AsyncRedis) -> None:
    """Close a wait's client, the pub/sub connection in its pool with it.

    The client is discarded, so a failure to close it cleanly is no matter.
    """
    with contextlib.suppress(RedisError, OSError):
        await client.aclose()


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Turn every Redis error into StoreFailed, the reason kept for the log."""
    try:
        yield
    except (RedisError, OSError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise StoreFailed(f"approvals store: {what}: {reason}") from exc


def _fields(action: PendingAction) -> list[str]:
    """``action`` as the field-value pairs of its hash; absent values left out."""
    binding = action.binding
    fields: dict[str, str | None] = {
        "id": action.id,
        "decision_id": action.decision_id,
        "subject": binding.subject,
        "issuer": binding.issuer,
        "client_id": binding.client_id,
        "tool": binding.tool,
        "digest": binding.digest,
        "binding": binding_key(binding),
        "server": action.server,
        "arguments": json.dumps(action.arguments, ensure_ascii=False),
        "policies": json.dumps(list(action.policies)),
        "created": repr(action.created),
        "expires": repr(action.expires),
        "status": action.status.value,
        "approver": action.approver,
        "reason": action.reason,
        "decided": None if action.decided is None else repr(action.decided),
    }
    pairs: list[str] = []
    for name, value in fields.items():
        if value is not None:
            pairs += [name, value]
    return pairs


def _pairs(row: Sequence[str]) -> dict[str, str]:
    """The flat name, value, name, value... list a script returns, as a dict."""
    return dict(zip(row[::2], row[1::2], strict=True))


def _action(fields: dict[str, str]) -> PendingAction:
    """The action a hash holds; StoreFailed if it was altered past reading."""
    try:
        return _parsed(fields)
    except (KeyError, ValueError, TypeError) as exc:
        name = fields.get("id", "?")
        raise StoreFailed(f"approvals store: action {name} cannot be read") from exc


def _parsed(fields: dict[str, str]) -> PendingAction:
    return action_from_fields(fields)
