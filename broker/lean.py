"""The lean path: ``tools/call`` and ``tools/list`` without the SDK's server machinery.

For each request the SDK's Streamable HTTP server sets up memory streams, a
dispatcher task, a server-sent-event writer and pydantic models both ways,
which costs more CPU than deciding and recording the call. ``LeanCalls``
sits in front of it and answers itself the two requests agents send most,
when it can answer exactly as the SDK would; it hands everything else to
the SDK untouched, and so anything it is unsure of.

A request takes the lean path only when all of this holds:

- a POST whose headers the SDK would accept (JSON body, both answer types
  accepted, a handshake-era protocol version, a size within the limit);
- its body is one JSON-RPC request for ``tools/call`` or ``tools/list``
  whose parameters the SDK's own validator accepts, with no progress token;
- with stateful sessions: its session is open in the SDK, was opened with
  the caller's credential and negotiated that protocol version; for a call,
  it also declared neither sampling nor elicitation. Nothing a server asks
  during the call could then be put to this agent on either path, so a
  server's request is refused and recorded here as the SDK would refuse it.

The decision, the record and the forwarding are the mediator's, as on the
SDK path. Log messages a server sends during the call reach the agent on
the call's own event stream, filtered by the level its session set. A
listing is shaped once for each set of tools a caller may see and kept,
and recorded every time, as on the SDK path.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import mcp.types as types
import pydantic_core
from mcp.server.auth.middleware.bearer_auth import (
    AuthenticatedUser,
    authorization_context,
)
from mcp.server.streamable_http import REQUEST_CANCELLED, StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE
from mcp.shared.exceptions import MCPError
from mcp.shared.jsonrpc_dispatcher import progress_token_from_params
from mcp_types import methods
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.audit import AuditEntry
from broker.downstream import Downstream
from broker.errors import Denied, DownstreamRefused
from broker.mediation import (
    PRINCIPAL_KEY,
    Mediator,
    denial_error,
    denied_tool_result,
)
from broker.principal import Principal
from broker.relay import Gate, Kind, LogLevels, refusal_to_server

log = logging.getLogger("broker.lean")

CALL = "tools/call"
LIST = "tools/list"
# Shaped listings kept, one per protocol version, catalog and visible set.
KEPT_LISTINGS = 16
ENVELOPE = frozenset({"jsonrpc", "id", "method", "params"})
SSE_HEADERS = [
    (b"cache-control", b"no-cache, no-transform"),
    (b"connection", b"keep-alive"),
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"x-accel-buffering", b"no"),
]


@dataclass(frozen=True, slots=True)
class _Head:
    """The request headers the lean path reads, already checked as the SDK does."""

    version: str
    session: str | None
    length: int


@dataclass(frozen=True, slots=True)
class _Request:
    id: int | str
    method: str
    call: types.CallToolRequestParams | None  # for tools/call


class LeanCalls:
    """ASGI middleware in front of the SDK's Streamable HTTP app."""

    def __init__(
        self,
        app: ASGIApp,
        mediator: Mediator,
        manager: StreamableHTTPSessionManager,
        *,
        max_body: int = DEFAULT_MAX_REQUEST_BODY_SIZE,
    ) -> None:
        self.app = app
        self.mediator = mediator
        self.manager = manager
        self.max_body = max_body
        self._listings: OrderedDict[tuple[object, ...], bytes] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        head = _head(scope, self.max_body) if scope["type"] == "http" else None
        if head is None:
            await self.app(scope, receive, send)
            return
        body = await _body(receive)
        if body is None:
            return  # the agent went away before it finished sending
        request = _request(body, head.version)
        principal = scope.get(PRINCIPAL_KEY)
        taken, transport = self._session(scope, head, request)
        if request is None or not taken or not isinstance(principal, Principal):
            await self.app(scope, _replay(body, receive), send)
            return

        answer = _Answer(send, head.session)
        with _in_flight(transport):
            if request.call is None:
                listing = await self._listing(principal, head, request)
                if listing is None:
                    # Not recorded, so nothing was done: the SDK answers it.
                    await self.app(scope, _replay(body, receive), send)
                    return
                self.mediator.metrics.lean_calls.labels(LIST).inc()
                await answer.finish(listing)
                return
            self.mediator.metrics.lean_calls.labels(CALL).inc()
            await self._answer(principal, head, request, request.call, answer)

    def _session(
        self, scope: Scope, head: _Head, request: _Request | None
    ) -> tuple[bool, StreamableHTTPServerTransport | None]:
        """Whether the lean path may answer, and the agent's SDK session if any."""
        if request is None:
            return False, None
        if self.manager.stateless:
            return True, None
        if head.session is None:
            return False, None
        # The SDK has no public way to look a session up; this reads its own
        # table, so that a closed or foreign session is answered by the SDK.
        transport = self.manager._server_instances.get(head.session)
        if transport is None or transport.is_terminated:
            return False, None
        if transport.idle_scope is not None and transport.idle_scope.cancel_called:
            return False, None
        user = scope.get("user")
        caller = (
            authorization_context(user) if isinstance(user, AuthenticatedUser) else None
        )
        if caller != self.manager._session_owners.get(head.session):
            return False, None
        known = self.mediator.sessions.get(head.session)
        if known is None or known.version != head.version:
            return False, None
        if known.asks and request.call is not None:
            return False, None
        return True, transport

    async def _listing(
        self, principal: Principal, head: _Head, request: _Request
    ) -> bytes | None:
        """The JSON-RPC answer to ``tools/list``, or None if it was not recorded."""
        mediator = self.mediator
        shown, usable = await mediator.visible_tools(principal)
        try:
            mediator.record_list(principal, LIST, f"{len(shown)} of {usable}")
        except Exception:
            return None
        key = (head.version, mediator.catalog.generation, *(id(t) for t in shown))
        result = self._listings.get(key)
        if result is None:
            listed = types.ListToolsResult(tools=[t.definition for t in shown])
            result = _shaped(LIST, head.version, listed)
            self._listings[key] = result
            while len(self._listings) > KEPT_LISTINGS:
                self._listings.popitem(last=False)
        self._listings.move_to_end(key)
        return _envelope(request.id, result)

    async def _answer(
        self,
        principal: Principal,
        head: _Head,
        request: _Request,
        params: types.CallToolRequestParams,
        answer: _Answer,
    ) -> None:
        key = (head.session, str(request.id)) if head.session is not None else None
        with anyio.CancelScope() as cancelled:
            if key is not None:
                self.mediator.lean_calls[key] = cancelled
            try:
                message = await self._call(principal, head, request, params, answer)
            finally:
                if key is not None:
                    self.mediator.lean_calls.pop(key, None)
        if cancelled.cancelled_caught:
            # As the SDK answers a request its agent cancelled on this wire.
            cancel = types.ErrorData(
                code=REQUEST_CANCELLED, message="Request cancelled"
            )
            message = _error(request.id, cancel)
        await answer.finish(message)

    async def _call(
        self,
        principal: Principal,
        head: _Head,
        request: _Request,
        params: types.CallToolRequestParams,
        answer: _Answer,
    ) -> bytes:
        """The JSON-RPC answer to one call: decided, recorded, forwarded."""
        mediator = self.mediator
        arguments = dict(params.arguments or {})
        call = mediator.tool_call(principal, params.name, arguments, _no_progress)

        def send(downstream: Downstream, entry: AuditEntry) -> Awaitable[Any]:
            relay = LeanRelay(
                principal=principal,
                server=downstream.name,
                target=entry.tool or "",
                decision_id=entry.decision_id,
                session=head.session,
                gate=mediator.gate_server_request,
                levels=mediator.levels,
                emit=answer.event,
            )
            return downstream.call_tool(call.tool, arguments, relay)

        try:
            result: types.CallToolResult = await mediator.settle(
                call.entry, call.decide, send
            )
        except DownstreamRefused as refused:
            return _error(request.id, denial_error(refused).error)
        except Denied as denied:
            result = denied_tool_result(denied)
        try:
            return _envelope(request.id, _shaped(CALL, head.version, result))
        except Exception:
            # The SDK's server answers a result it cannot shape so, too.
            log.exception("a tool result could not be shaped for %s", head.version)
            failed = MCPError(
                code=types.INTERNAL_ERROR, message="Handler returned an invalid result"
            )
            return _error(request.id, failed.error)


@dataclass(eq=False)
class LeanRelay:
    """The agent's side of a call on the lean path.

    Its client declared neither sampling nor elicitation (or its connection
    cannot be asked at all), so a server's request during the call is
    recorded and refused; log messages go out on the call's event stream.
    """

    principal: Principal
    server: str
    target: str
    decision_id: str
    session: str | None
    gate: Gate
    levels: LogLevels
    emit: Callable[[bytes], Awaitable[None]]

    @property
    def can_ask(self) -> bool:
        return self.session is not None

    def accepts(self, kind: Kind) -> bool:
        return False

    async def sample(self, params: types.CreateMessageRequestParams) -> Any:
        return await self._refuse("sample")

    async def elicit(self, params: types.ElicitRequestParams) -> Any:
        return await self._refuse("elicit")

    async def _refuse(self, kind: Kind) -> types.ErrorData:
        try:
            await self.gate(self, kind)
        except Denied as denied:
            return refusal_to_server(denied)
        # The gate refuses every request an agent cannot take; reaching here
        # would be a broker fault, and it still does not reach the agent.
        return types.ErrorData(code=types.INTERNAL_ERROR, message="not relayed")

    async def log(self, params: types.LoggingMessageNotificationParams) -> None:
        if not self.levels.passes(self.session, params.level):
            return
        relayed = types.LoggingMessageNotificationParams(
            level=params.level, logger=params.logger, data=params.data
        )
        notice = types.JSONRPCNotification(
            jsonrpc="2.0",
            method="notifications/message",
            params=relayed.model_dump(by_alias=True, mode="json", exclude_none=True),
        )
        await self.emit(
            notice.model_dump_json(by_alias=True, exclude_unset=True).encode()
        )


class _Answer:
    """One call's answer: an event stream of JSON-RPC messages, or one JSON body.

    Nothing is sent until there is something to send. A call whose server
    sent log messages on the way is an event stream, as the SDK sends it; an
    answer with nothing before it is one JSON body, which Streamable HTTP
    allows a server to send instead.
    """

    def __init__(self, send: Send, session: str | None) -> None:
        self._send = send
        named = (
            [] if session is None else [(b"mcp-session-id", session.encode("latin-1"))]
        )
        self._headers = [*SSE_HEADERS, *named]
        self._json_headers = [(b"content-type", b"application/json"), *named]
        self._started = False

    async def event(self, message: bytes) -> None:
        if not self._started:
            await self._start(self._headers)
        await self._send_body(_frame(message), more=True)

    async def finish(self, message: bytes) -> None:
        if self._started:
            await self._send_body(_frame(message), more=False)
            return
        # Nothing went out before the answer: one JSON body, which the agent's
        # client reads to its end and so keeps its connection for the next call.
        length = (b"content-length", str(len(message)).encode())
        await self._start([*self._json_headers, length])
        await self._send_body(message, more=False)

    async def _start(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._started = True
        start: Message = {"type": "http.response.start", "status": 200}
        start["headers"] = headers
        await self._send(start)

    async def _send_body(self, body: bytes, *, more: bool) -> None:
        try:
            await self._send(
                {"type": "http.response.body", "body": body, "more_body": more}
            )
        except OSError as exc:
            # The agent went away; the call itself is decided and recorded.
            log.debug("an answer could not reach the agent: %s", exc)


def _head(scope: Scope, max_body: int) -> _Head | None:
    """The headers of a request the lean path may take, or None."""
    if scope["method"] != "POST":
        return None
    found: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in found:
            return None  # a repeated header: let the SDK make of it what it does
        found[name] = value
    version = found.get(b"mcp-protocol-version", b"").decode("latin-1")
    if version not in HANDSHAKE_PROTOCOL_VERSIONS:
        return None
    if not (_json_body(found) and _accepts_both(found)):
        return None
    length = found.get(b"content-length", b"")
    if not length.isdigit() or int(length) > max_body:
        return None
    session = found.get(b"mcp-session-id")
    return _Head(version, session.decode("latin-1") if session else None, int(length))


def _json_body(headers: dict[bytes, bytes]) -> bool:
    """Content-Type as the SDK checks it."""
    kind = headers.get(b"content-type", b"").decode("latin-1")
    return any(
        part.strip() == "application/json" for part in kind.split(";")[0].split(",")
    )


def _accepts_both(headers: dict[bytes, bytes]) -> bool:
    """Accept as the SDK checks it when it answers with event streams."""
    accept = headers.get(b"accept", b"").decode("latin-1")
    kinds = {part.strip().split(";")[0].strip().lower() for part in accept.split(",")}
    if "*/*" in kinds:
        return True
    json = bool(kinds & {"application/json", "application/*"})
    return json and bool(kinds & {"text/event-stream", "text/*"})


async def _body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` with the body that was already read given back first."""
    given = False

    async def replayed() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


def _request(body: bytes, version: str) -> _Request | None:
    """The request in ``body`` if it is one plain call or listing, else None."""
    try:
        message = pydantic_core.from_json(body)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.keys() - ENVELOPE:
        return None
    request_id, method = message.get("id"), message.get("method")
    params = message.get("params", {} if method == LIST else None)
    if message.get("jsonrpc") != "2.0" or method not in (CALL, LIST):
        return None
    if isinstance(request_id, bool) or not isinstance(request_id, int | str):
        return None
    if not isinstance(params, dict) or progress_token_from_params(params) is not None:
        return None
    try:
        # The two checks the SDK's server makes before its handler runs.
        methods.validate_client_request(method, version, params)
        if method == LIST:
            types.PaginatedRequestParams.model_validate(params, by_name=False)
            return _Request(request_id, method, None)
        call = types.CallToolRequestParams.model_validate(params, by_name=False)
    except Exception:
        return None  # the SDK answers what is wrong with it
    return _Request(request_id, method, call)


def _shaped(method: str, version: str, result: BaseModel) -> bytes:
    """A result as the SDK's server puts it on the wire for ``version``."""
    dumped = result.model_dump(by_alias=True, mode="json", exclude_none=True)
    return pydantic_core.to_json(
        methods.serialize_server_result(method, version, dumped)
    )


def _envelope(request_id: int | str, result: bytes) -> bytes:
    """The JSON-RPC answer around an already encoded result."""
    head = b'{"jsonrpc":"2.0","id":' + pydantic_core.to_json(request_id)
    return head + b',"result":' + result + b"}"


def _error(request_id: int | str, error: types.ErrorData) -> bytes:
    response = types.JSONRPCError(jsonrpc="2.0", id=request_id, error=error)
    return response.model_dump_json(by_alias=True, exclude_unset=True).encode()


def _frame(message: bytes) -> bytes:
    return b"event: message\r\ndata: " + message + b"\r\n\r\n"


async def _no_progress(
    progress: float, total: float | None, message: str | None
) -> None:
    """A lean call carries no progress token: an approval wait says nothing."""


@contextmanager
def _in_flight(transport: StreamableHTTPServerTransport | None) -> Iterator[None]:
    """Hold the agent's session open while its call runs, as the SDK does.

    The SDK keeps its idle countdown in the transport; the lean path holds
    it the same way, or leaves it be if that shape is not there.
    """
    idle = getattr(transport, "idle_scope", None)
    timeout = getattr(transport, "_idle_timeout", None)
    if transport is None or idle is None or timeout is None:
        yield
        return
    transport._requests_in_flight += 1
    idle.deadline = math.inf
    try:
        yield
    finally:
        transport._requests_in_flight -= 1
        if not transport._requests_in_flight:
            idle.deadline = anyio.current_time() + timeout
