"""Connections to downstream MCP servers, kept open and reused.

Each server in the manifests gets one long-lived MCP client session, owned
by a supervisor task that reconnects with backoff when the server dies,
pings it every few seconds (a server that died or froze is replaced) and
gives up on a start that does not finish within the connect timeout. A
forwarded request has a session to itself while it runs, so that sampling,
elicitation and log messages the server sends meanwhile are relayed to the
agent that asked and to nobody else. A call against a server that is down,
hangs past the call timeout or answers with something the SDK cannot parse
becomes ``DownstreamFailed``; it never waits forever and never falls back to
anything else.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio
import anyio.abc
import httpx2
import mcp.types as types
from mcp import Client, StdioServerParameters
from mcp.client.context import ClientRequestContext
from mcp.client.session import IncomingMessage, MessageHandlerFnT
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from broker.credentials import BrokerAuth, CredentialSource
from broker.errors import Denied, DownstreamFailed, DownstreamRefused
from broker.manifest import Manifest
from broker.wire import SessionGone, WireSession

log = logging.getLogger("broker.downstream")
T = TypeVar("T")

INITIAL_BACKOFF_SECONDS = 0.25
MAX_BACKOFF_SECONDS = 30.0
# A connected server is pinged this often, so that one that died or froze
# while idle is replaced before a call finds out (and /readyz says so).
HEALTH_CHECK_SECONDS = 2.0
PYTHON_PLACEHOLDER = "{python}"
# After a wire session failed to open, calls go through the SDK's sessions
# for this long before another is tried.
WIRE_RETRY_SECONDS = 5.0

# What the broker answers when a downstream server asks the agent's side for
# something (sampling, elicitation) while no forwarded request is in flight
# on that session; the mediation layer supplies it.
ServerRequestHandler = Callable[[str, str, Any], Awaitable[Any]]
# Called with every tool list a new session offers, before the session is
# used for anything else: the pin check.
ToolsHandler = Callable[["Downstream", list[types.Tool]], Awaitable[None]]
# Called with what a server announces outside any request (list changes,
# resource updates).
NoticeHandler = Callable[["Downstream", types.ServerNotification], Awaitable[None]]


class Relay(Protocol):
    """The agent's side of one forwarded request.

    Whatever the server sends on the session while the request is in flight
    belongs to that request, and goes here to be decided and passed on.
    """

    async def sample(self, params: types.CreateMessageRequestParams) -> Any: ...

    async def elicit(self, params: types.ElicitRequestParams) -> Any: ...

    async def log(self, params: types.LoggingMessageNotificationParams) -> None: ...


@dataclass(eq=False)
class _Session:
    """One session with the server, carrying one forwarded request at a time."""

    client: Client | None = None
    relay: Relay | None = None
    # Cleared when the session can no longer be trusted; it is then closed
    # instead of being used again.
    sound: bool = True
    closed: anyio.Event = field(default_factory=anyio.Event)


class Downstream:
    """One downstream server and the sessions the broker holds with it.

    The supervisor's session is always there while the server is up: lists,
    pin checks and health checks use it, and it carries forwarded requests
    too. When more requests are in flight than there are free sessions, more
    are opened, up to the manifest's ``max_sessions``, each checked against
    the pins before its first use and kept open for the next request.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        call_timeout: float,
        connect_timeout: float = 10.0,
        on_server_request: ServerRequestHandler | None = None,
        on_tools: ToolsHandler | None = None,
        on_notice: NoticeHandler | None = None,
        wire: bool = True,
    ) -> None:
        """``wire``: calls to an HTTP server may go on the broker's own session."""
        self.manifest = manifest
        self.name = manifest.server
        self.credentials = CredentialSource(manifest.credential)
        self.call_timeout = call_timeout
        self.connect_timeout = connect_timeout
        self._on_server_request = on_server_request
        self._on_tools = on_tools
        self._on_notice = on_notice
        self._control: _Session | None = None
        self._connected = anyio.Event()
        self._lost = anyio.Event()
        self._stopping = False
        # Sessions free for the next request, and every session open now.
        self._give, self._free = anyio.create_memory_object_stream[_Session](
            max_buffer_size=math.inf
        )
        self._open: set[_Session] = set()
        self._opening = False
        self._slots = anyio.Semaphore(manifest.max_sessions)
        self._tasks: anyio.abc.TaskGroup | None = None
        self.last_error = ""
        # The broker's own session for calls to an HTTP server (broker.wire).
        self._wired = wire
        self._wire: WireSession | None = None
        self._wire_lock = anyio.Lock()
        self._wire_failed_at = -math.inf

    @property
    def connected(self) -> bool:
        return self._control is not None and self._connected.is_set()

    async def supervise(self) -> None:
        """Hold a session open while the broker runs, reconnecting with backoff."""
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            await self._supervise()
            tasks.cancel_scope.cancel()

    async def _supervise(self) -> None:
        backoff = INITIAL_BACKOFF_SECONDS
        while not self._stopping:
            session = _Session()
            try:
                # The deadline bounds starting the server and the pin check; a
                # server that never finishes its handshake is started again.
                deadline = anyio.current_time() + self.connect_timeout
                with anyio.CancelScope(deadline=deadline) as connecting:
                    async with self.open_session(session) as client:
                        session.client, self.last_error = client, ""
                        await self._check_tools(client)
                        connecting.deadline = math.inf
                        self._publish(session)
                        backoff = INITIAL_BACKOFF_SECONDS
                        log.info("downstream %s connected", self.name)
                        self._tasks_start(self._open_wire)
                        await self._watch(session)
                if connecting.cancelled_caught:
                    raise DownstreamFailed(
                        f"server {self.name} did not start within "
                        f"{self.connect_timeout:g}s"
                    )
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("downstream %s unavailable: %s", self.name, self.last_error)
            finally:
                session.sound = False
                self._unpublish()
                self._lost = anyio.Event()
            if self._stopping:
                return
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def _check_tools(self, client: Client) -> None:
        """Before anyone else may use a new session: the pin check."""
        if self._on_tools is not None:
            await self._on_tools(self, await _all_tools(client))

    async def _watch(self, session: _Session) -> None:
        """Return once the session is lost; raise if a health check fails."""
        while True:
            with anyio.move_on_after(HEALTH_CHECK_SECONDS):
                await self._lost.wait()
                return
            await self.request("a health check", _ping)

    def _publish(self, session: _Session) -> None:
        self._control = session
        self._open.add(session)
        self._give.send_nowait(session)
        self._connected.set()

    def _lose(self, reason: str) -> None:
        """Give up the supervisor's session: no new request gets it."""
        self.last_error = reason
        self._unpublish()
        self._lost.set()

    def _unpublish(self) -> None:
        if self._control is not None:
            self._control.sound = False
        self._control = None
        if self._connected.is_set():
            # Waiting callers hold the fresh event; the next session sets it.
            self._connected = anyio.Event()
        # Sessions opened beside a lost one go with it: a server that died
        # or restarted has forgotten them.
        self._close_all()
        self._drop_wire()

    def _close_all(self) -> None:
        for session in self._open:
            session.sound = False
            session.closed.set()
        self._open.clear()

    def stop(self) -> None:
        self._stopping = True
        self._lost.set()
        self._close_all()
        self._drop_wire()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def client(self) -> Client:
        """The supervisor's session, after a brief wait for a reconnect."""
        if self._control is None or not self._connected.is_set():
            with anyio.move_on_after(self.connect_timeout):
                await self._connected.wait()
        control = self._control
        if control is None or control.client is None:
            raise DownstreamFailed(
                f"server {self.name} is not connected: {self.last_error or 'starting'}"
            )
        return control.client

    async def request(self, what: str, call: Callable[[Client], Awaitable[T]]) -> T:
        """Run one request on the supervisor's session, within the call timeout."""
        client = await self.client()
        control = self._control
        try:
            with anyio.fail_after(self.call_timeout):
                return await call(client)
        except Denied:
            raise
        except Exception as exc:
            failure = self._failure(what, exc)
            if control is not None and not _answered(exc):
                timed_out = isinstance(exc, TimeoutError)
                self._spoil(control, failure.detail, timed_out=timed_out)
            raise failure from exc

    async def forward(
        self, what: str, call: Callable[[Client], Awaitable[T]], relay: Relay | None
    ) -> T:
        """Run one forwarded request on a session of its own.

        While it is in flight, whatever the server asks of or tells the
        agent's side on that session goes to ``relay``.
        """
        await self.client()  # a server that is down fails here, after a wait
        session: _Session | None = None
        try:
            with anyio.fail_after(self.call_timeout):
                async with self._slots:
                    session = await self._take()
                    assert session.client is not None
                    session.relay = relay
                    try:
                        return await call(session.client)
                    finally:
                        session.relay = None
        except Denied:
            raise
        except Exception as exc:
            failure = self._failure(what, exc)
            if session is not None and not _answered(exc):
                timed_out = isinstance(exc, TimeoutError)
                self._spoil(session, failure.detail, timed_out=timed_out)
            raise failure from exc
        finally:
            if session is not None:
                self._give_back(session)

    async def call_tool(
        self, name: str, arguments: dict[str, Any], relay: Relay
    ) -> types.CallToolResult:
        """Forward one decided ``tools/call``: on the wire session when there is one."""
        wire = await self._wire_session()
        if wire is None:
            return await self.forward(
                "tools/call", lambda client: client.call_tool(name, arguments), relay
            )
        try:
            with anyio.fail_after(self.call_timeout):
                try:
                    return await wire.call_tool(name, arguments, relay)
                except SessionGone:
                    # The server forgot the session (restarted, or expired
                    # it) before doing anything: once more on a new one.
                    self._drop_wire(wire)
                    wire = await self._wire_session()
                    if wire is None:
                        raise
                    return await wire.call_tool(name, arguments, relay)
        except Denied:
            raise
        except Exception as exc:
            if not _answered(exc):
                self._drop_wire(wire)
            raise self._failure("tools/call", exc) from exc

    async def _wire_session(self) -> WireSession | None:
        """The wire session, opened and pin-checked on first use; None for stdio."""
        current = self._wire
        if current is not None and current.sound:
            return current
        transport = self.manifest.transport
        if transport.kind != "http" or not self._wired or self._stopping:
            return None
        async with self._wire_lock:
            if self._wire is not None and self._wire.sound:
                return self._wire
            if anyio.current_time() - self._wire_failed_at < WIRE_RETRY_SECONDS:
                return None
            await self.client()  # a server that is down fails here, after a wait
            self._wire = await self._new_wire(transport.url)
            return self._wire

    async def _new_wire(self, url: str) -> WireSession | None:
        """A wire session, opened and checked against the pins; None if it cannot be."""
        wire: WireSession | None = None
        try:
            wire = WireSession(
                self.name,
                url,
                self.credentials,
                timeout=self.call_timeout,
                max_connections=self.manifest.max_sessions,
                on_notice=self._wire_notice,
                unrelayed=self._unrelayed,
            )
            with anyio.fail_after(self.connect_timeout):
                tools = await wire.open()
                if self._on_tools is not None:
                    await self._on_tools(self, tools)
        except Exception as exc:
            self._wire_failed_at = anyio.current_time()
            log.warning(
                "downstream %s: no session of the broker's own, calls go "
                "through the SDK: %s: %s",
                self.name,
                type(exc).__name__,
                exc,
            )
            if wire is not None:
                await wire.aclose()
            return None
        log.info("downstream %s: calls go on a session of the broker's own", self.name)
        self._tasks_start(wire.listen)
        return wire

    async def _open_wire(self) -> None:
        """Open the wire session now, so that the first call does not wait for it."""
        try:
            await self._wire_session()
        except DownstreamFailed as exc:
            log.info(
                "downstream %s: no session of the broker's own yet: %s", self.name, exc
            )

    def _tasks_start(self, task: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if self._tasks is not None:
            self._tasks.start_soon(task)

    async def _wire_notice(self, message: types.ServerNotification) -> None:
        if self._on_notice is not None:
            await self._on_notice(self, message)

    def _drop_wire(self, wire: WireSession | None = None) -> None:
        """Give up the wire session (``wire``, if it is still the current one)."""
        current = self._wire
        if current is None or (wire is not None and wire is not current):
            return
        self._wire = None
        current.sound = False
        self._tasks_start(current.aclose)

    def _failure(self, what: str, exc: Exception) -> DownstreamFailed:
        """The denial a failed request becomes, with what the server said."""
        if isinstance(exc, MCPError) and _answered(exc):
            return DownstreamRefused(
                f"server {self.name} answered {what} with error {exc.code}: "
                f"{exc.message}",
                code=exc.code,
                message=exc.message,
                data=exc.error.data,
            )
        if isinstance(exc, TimeoutError):
            return DownstreamFailed(
                f"server {self.name} did not answer {what} within "
                f"{self.call_timeout:g}s"
            )
        reason = f"{type(exc).__name__}: {exc}"
        return DownstreamFailed(f"server {self.name} failed on {what}: {reason}")

    def _spoil(self, session: _Session, reason: str, *, timed_out: bool) -> None:
        """A session a request failed on without an answer is not used again.

        A broken pipe or a dead process means the session is no longer
        trustworthy. An error the server answered leaves it as it was, or
        any caller could restart a server by asking for nonsense. The
        supervisor's own session is only given up for a broken connection;
        one that stops answering is found by the health check, which starts
        a new one.
        """
        if session is self._control:
            if not timed_out:
                self._lose(reason)
        else:
            session.sound = False

    async def _take(self) -> _Session:
        """A free session: one given back, or a new one, whichever comes first.

        A request never waits for a new session to start when another one
        is given back sooner; the new one then stays open for the next.
        """
        while True:
            try:
                session = self._free.receive_nowait()
            except anyio.WouldBlock:
                # One new session at a time: each lists every tool for its pin
                # check, and a burst of them at once is a burst of memory.
                room = len(self._open) < self.manifest.max_sessions
                if room and not self._opening and self._tasks is not None:
                    self._opening = True
                    self._tasks.start_soon(self._open_more)
                session = await self._free.receive()
            if session.sound:
                return session

    def _give_back(self, session: _Session) -> None:
        if session.sound and not self._stopping:
            self._give.send_nowait(session)
        elif session is not self._control:
            session.closed.set()

    async def _open_more(self) -> None:
        """Open sessions one after another while requests wait and there is room.

        A failure ends the round; the requests waiting get the next session
        given back, or time out.
        """
        assert self._tasks is not None
        try:
            while (
                not self._stopping
                and self._free.statistics().tasks_waiting_receive
                and len(self._open) < self.manifest.max_sessions
            ):
                with anyio.fail_after(self.connect_timeout):
                    session: _Session = await self._tasks.start(self._hold_extra)
                self._give_back(session)
        except Exception as exc:
            log.warning(
                "downstream %s: could not open another session: %s: %s",
                self.name,
                type(exc).__name__,
                exc,
            )
        finally:
            self._opening = False

    async def _hold_extra(
        self, *, task_status: anyio.abc.TaskStatus[_Session] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Open one more session, check its pins, and hold it until closed."""
        session = _Session()
        started = False
        try:
            async with self.open_session(session) as client:
                session.client = client
                await self._check_tools(client)
                if self._stopping or self._control is None:
                    return  # its server went down while it started
                self._open.add(session)
                task_status.started(session)
                started = True
                await session.closed.wait()
        except Exception as exc:
            if not started:
                raise
            log.info("downstream %s: a session ended: %s", self.name, exc)
        finally:
            session.sound = False
            self._open.discard(session)

    async def list_tools(self) -> list[types.Tool]:
        """Every tool the server offers now, across pages; not checked against pins."""
        return await self.request("tools/list", _all_tools)

    def open_session(
        self, session: _Session | None = None
    ) -> AbstractAsyncContextManager[Client]:
        """A new client session; what the server sends on it goes to ``session``."""
        session = session or _Session()
        transport = self.manifest.transport
        callbacks: dict[str, Any] = {
            "sampling_callback": self._sampling_for(session),
            "elicitation_callback": self._elicitation_for(session),
            "logging_callback": self._logging_for(session),
            "message_handler": self._messages_for(session),
        }
        if transport.kind == "stdio":
            command = (
                sys.executable
                if transport.command == PYTHON_PLACEHOLDER
                else transport.command
            )
            env = dict(transport.env)
            env.update(
                {
                    k: v
                    for k in transport.passthrough
                    if (v := os.environ.get(k)) is not None
                }
            )
            env.update(self.credentials.stdio_env())
            params = StdioServerParameters(
                command=command, args=list(transport.args), env=env
            )
            return Client(params, mode="legacy", cache=None, **callbacks)
        http = httpx2.AsyncClient(
            auth=BrokerAuth(self.credentials),
            timeout=httpx2.Timeout(self.call_timeout, read=None),
        )
        return Client(
            streamable_http_client(transport.url, http_client=http),
            mode="legacy",
            cache=None,
            **callbacks,
        )

    def _sampling_for(self, session: _Session) -> Any:
        async def sampling(
            context: ClientRequestContext, params: types.CreateMessageRequestParams
        ) -> Any:
            if session.relay is not None:
                return await session.relay.sample(params)
            return await self._unrelayed("sample", params)

        return sampling

    def _elicitation_for(self, session: _Session) -> Any:
        async def elicitation(
            context: ClientRequestContext, params: types.ElicitRequestParams
        ) -> Any:
            if session.relay is not None:
                return await session.relay.elicit(params)
            return await self._unrelayed("elicit", params)

        return elicitation

    def _logging_for(self, session: _Session) -> Any:
        async def logging_message(
            params: types.LoggingMessageNotificationParams,
        ) -> None:
            if session.relay is not None:
                await session.relay.log(params)
            else:
                log.debug("downstream %s logged outside a request", self.name)

        return logging_message

    async def _unrelayed(self, kind: str, params: Any) -> Any:
        handler = self._on_server_request
        if handler is None:
            return types.ErrorData(code=types.INVALID_REQUEST, message="not supported")
        return await handler(self.name, kind, params)

    def _messages_for(self, session: _Session) -> MessageHandlerFnT:
        """Notifications from the server, and garbage, which gives the session up.

        The SDK skips a line it cannot parse; but the answer it held is gone
        and whatever the server says next is suspect, so the session goes.
        """

        async def on_message(message: IncomingMessage) -> None:
            if isinstance(message, Exception):
                if not session.sound:
                    return
                kind = type(message).__name__
                log.warning("downstream %s sent an unreadable message", self.name)
                reason = f"server {self.name} sent an unreadable message ({kind})"
                if session is self._control:
                    self._lose(reason)
                else:
                    session.sound = False
                    session.closed.set()
            elif self._on_notice is not None:
                await self._on_notice(self, message)

        return on_message


async def _ping(client: Client) -> None:
    """Any answer, an error included, shows that the server is alive."""
    try:
        await client.session.send_ping()
    except MCPError as exc:
        if not _answered(exc):
            raise


def _answered(exc: Exception) -> bool:
    """Did the server itself answer with this error (so its session is sound)?"""
    return isinstance(exc, MCPError) and exc.error.code != types.CONNECTION_CLOSED


async def _all_tools(client: Client) -> list[types.Tool]:
    """Every tool a session offers, across pages."""
    tools: list[types.Tool] = []
    cursor: str | None = None
    while True:
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools
