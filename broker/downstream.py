"""Connections to downstream MCP servers, kept open and reused.

Each server in the manifests gets one long-lived MCP client session, owned
by a supervisor task that reconnects with backoff when the server dies,
pings it every few seconds (a server that died or froze is replaced) and
gives up on a start that does not finish within the connect timeout. A
call against a server that is down, hangs past the call timeout or answers
with something the SDK cannot parse becomes ``DownstreamFailed``; it never
waits forever and never falls back to anything else.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import sys
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import anyio
import httpx2
import mcp.types as types
from mcp import Client, StdioServerParameters
from mcp.client.context import ClientRequestContext
from mcp.client.session import IncomingMessage, MessageHandlerFnT
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from broker.credentials import BrokerAuth, CredentialSource
from broker.errors import Denied, DownstreamFailed
from broker.manifest import Manifest

log = logging.getLogger("broker.downstream")
T = TypeVar("T")

INITIAL_BACKOFF_SECONDS = 0.25
MAX_BACKOFF_SECONDS = 30.0
# A connected server is pinged this often, so that one that died or froze
# while idle is replaced before a call finds out (and /readyz says so).
HEALTH_CHECK_SECONDS = 2.0
PYTHON_PLACEHOLDER = "{python}"

# Set while the supervisor checks a new session's tools against the pins:
# only that check may use a session before it is published.
_checking_pins: contextvars.ContextVar[Downstream | None] = contextvars.ContextVar(
    "checking_pins", default=None
)

# What the broker answers when a downstream server asks the agent's side for
# something (sampling, elicitation); the mediation layer supplies it.
ServerRequestHandler = Callable[[str, str, Any], Awaitable[Any]]


class Downstream:
    """One downstream server and the session the broker holds with it."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        call_timeout: float,
        connect_timeout: float = 10.0,
        on_server_request: ServerRequestHandler | None = None,
        on_connected: Callable[[Downstream], Awaitable[None]] | None = None,
    ) -> None:
        self.manifest = manifest
        self.name = manifest.server
        self.credentials = CredentialSource(manifest.credential)
        self.call_timeout = call_timeout
        self.connect_timeout = connect_timeout
        self._on_server_request = on_server_request
        self._on_connected = on_connected
        self._client: Client | None = None
        self._connected = anyio.Event()
        self._lost = anyio.Event()
        self._stopping = False
        self.last_error = ""

    @property
    def connected(self) -> bool:
        return self._client is not None and self._connected.is_set()

    async def supervise(self) -> None:
        """Hold a session open while the broker runs, reconnecting with backoff."""
        backoff = INITIAL_BACKOFF_SECONDS
        while not self._stopping:
            try:
                # The deadline bounds starting the server and the pin check; a
                # server that never finishes its handshake is started again.
                deadline = anyio.current_time() + self.connect_timeout
                with anyio.CancelScope(deadline=deadline) as connecting:
                    async with self.open_session() as client:
                        self._client, self.last_error = client, ""
                        await self._check_pins()
                        connecting.deadline = math.inf
                        self._connected.set()
                        backoff = INITIAL_BACKOFF_SECONDS
                        log.info("downstream %s connected", self.name)
                        await self._watch()
                if connecting.cancelled_caught:
                    raise DownstreamFailed(
                        f"server {self.name} did not start within "
                        f"{self.connect_timeout:g}s"
                    )
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("downstream %s unavailable: %s", self.name, self.last_error)
            finally:
                self._unpublish()
                self._lost = anyio.Event()
            if self._stopping:
                return
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    async def _check_pins(self) -> None:
        """Before anyone else may use a new session: the pin check."""
        if self._on_connected is None:
            return
        token = _checking_pins.set(self)
        try:
            await self._on_connected(self)
        finally:
            _checking_pins.reset(token)

    async def _watch(self) -> None:
        """Return once the session is lost; raise if a health check fails."""
        while True:
            with anyio.move_on_after(HEALTH_CHECK_SECONDS):
                await self._lost.wait()
                return
            await self.request("a health check", _ping)

    def _lose(self, reason: str) -> None:
        """Give up the current session: no new request gets it."""
        self.last_error = reason
        self._unpublish()
        self._lost.set()

    def _unpublish(self) -> None:
        self._client = None
        if self._connected.is_set():
            # Waiting callers hold the fresh event; the next session sets it.
            self._connected = anyio.Event()

    def stop(self) -> None:
        self._stopping = True
        self._lost.set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def client(self) -> Client:
        """The open session, after a brief wait for a reconnect, or DownstreamFailed."""
        if self._client is not None and (
            self._connected.is_set() or _checking_pins.get() is self
        ):
            return self._client
        with anyio.move_on_after(self.connect_timeout):
            await self._connected.wait()
        if self._client is None:
            raise DownstreamFailed(
                f"server {self.name} is not connected: {self.last_error or 'starting'}"
            )
        return self._client

    async def request(self, what: str, call: Callable[[Client], Awaitable[T]]) -> T:
        """Run one request against the server, within the call timeout."""
        client = await self.client()
        try:
            with anyio.fail_after(self.call_timeout):
                return await call(client)
        except TimeoutError as exc:
            raise DownstreamFailed(
                f"server {self.name} did not answer {what} within "
                f"{self.call_timeout:g}s"
            ) from exc
        except Denied:
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            failure = f"server {self.name} failed on {what}: {reason}"
            if not _answered(exc):
                # A broken pipe, a dead process: the session is no longer
                # trustworthy, so drop it and let the supervisor start a new
                # one. An error the server answered leaves it as it was, or
                # any caller could restart a server by asking for nonsense.
                self._mark_lost(client, failure)
            raise DownstreamFailed(failure) from exc

    def _mark_lost(self, client: Client, reason: str) -> None:
        if self._client is client:
            self._lose(reason)

    async def list_tools(self) -> list[types.Tool]:
        """Every tool the server offers now, across pages; not checked against pins."""
        unverified: list[types.Tool] = []
        cursor: str | None = None
        while True:
            page = await self.request("tools/list", _list_page(cursor))
            unverified.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                return unverified

    def open_session(self) -> AbstractAsyncContextManager[Client]:
        transport = self.manifest.transport
        callbacks: dict[str, Any] = {}
        if self._on_server_request is not None:
            callbacks = {
                "sampling_callback": self._sampling,
                "elicitation_callback": self._elicitation,
            }
        callbacks["message_handler"] = self._unreadable_loses(self._lost)
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

    async def _sampling(
        self, context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> Any:
        handler = self._on_server_request
        if handler is None:
            return types.ErrorData(code=types.INVALID_REQUEST, message="not supported")
        return await handler(self.name, "sample", params)

    async def _elicitation(
        self, context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> Any:
        handler = self._on_server_request
        if handler is None:
            return types.ErrorData(code=types.INVALID_REQUEST, message="not supported")
        return await handler(self.name, "elicit", params)

    def _unreadable_loses(self, lost: anyio.Event) -> MessageHandlerFnT:
        """A handler that gives up the session ``lost`` belongs to on garbage.

        The SDK skips a line it cannot parse; but the answer it held is gone
        and whatever the server says next is suspect, so the session goes.
        """

        async def on_message(message: IncomingMessage) -> None:
            if isinstance(message, Exception) and lost is self._lost:
                kind = type(message).__name__
                log.warning("downstream %s sent an unreadable message", self.name)
                self._lose(f"server {self.name} sent an unreadable message ({kind})")

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


def _list_page(
    cursor: str | None,
) -> Callable[[Client], Awaitable[types.ListToolsResult]]:
    async def call(client: Client) -> types.ListToolsResult:
        return await client.list_tools(cursor=cursor)

    return call
