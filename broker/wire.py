"""The broker's own MCP session with a Streamable HTTP server, for ``tools/call``.

The SDK's client spends most of a forwarded call's CPU on its own machinery
(streams, tasks, models both ways, a general HTTP client). A call the broker
has already decided and recorded needs much less: one POST on a kept-alive
connection, and the server's answer read as it comes. ``WireSession`` does
that, for calls only; lists, reads, prompts and everything else stay on the
SDK's sessions in ``broker.downstream``.

It holds what the SDK's client holds for the same server: a session opened
with the handshake, the broker's own credential on every request (never the
agent's), the tools the server offers on this very session for the pin
check, and their output schemas, against which a result is checked as the
SDK checks it. It declares no client capabilities: a server may not ask it
for sampling, elicitation or roots, and a request it sends anyway is put to
the relay, which decides and records it, and answered with what that gives.

What the server says on a call's event stream before the answer goes to the
relay (log messages) or to the notice handler (list changes, resource
updates). A stream cut off before the answer is a failed call: the broker
does not resume streams, and the call is not sent again. A call given up
(cancelled by its agent, or past its timeout) closes its connection, and
the server is sent ``notifications/cancelled`` for it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import mcp.types as types
import pydantic
import pydantic_core
from jsonschema import exceptions as schema_errors
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from mcp.shared.exceptions import MCPError
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, LATEST_HANDSHAKE_VERSION

from broker import __version__
from broker.credentials import CredentialSource
from broker.errors import DownstreamFailed
from broker.http1 import HttpError, Pool, StreamedResponse

if TYPE_CHECKING:
    from broker.downstream import Relay

log = logging.getLogger("broker.wire")

JSON = "application/json"
EVENTS = "text/event-stream"
ACCEPT = f"{JSON}, {EVENTS}"
REPLY_CONNECTIONS = 2
# How long telling a server of a cancelled call may hold the cancellation up.
CANCEL_SECONDS = 1.0
CLIENT_INFO = {"name": "mcp-broker", "version": __version__}
NoticeHandler = Callable[[types.ServerNotification], Awaitable[None]]
# Answers a sampling or elicitation request the server sends outside any call.
UnrelayedHandler = Callable[[str, Any], Awaitable[Any]]
# A standing stream the server ended, or that failed, is opened again after this.
LISTEN_RETRY_SECONDS = 1.0

_notices: pydantic.TypeAdapter[types.ServerNotification] = pydantic.TypeAdapter(
    types.ServerNotification
)
KINDS = {"sampling/createMessage": "sample", "elicitation/create": "elicit"}
_asked: dict[str, pydantic.TypeAdapter[Any]] = {
    "sampling/createMessage": pydantic.TypeAdapter(types.CreateMessageRequestParams),
    "elicitation/create": pydantic.TypeAdapter(types.ElicitRequestParams),
}


class WireFailed(Exception):
    """The server did not answer the way a Streamable HTTP server must."""


class SessionGone(WireFailed):
    """The server no longer knows this session (HTTP 404): nothing was done."""


class WireSession:
    """One MCP session with one server, carrying any number of calls at once."""

    def __init__(
        self,
        name: str,
        url: str,
        credentials: CredentialSource,
        *,
        timeout: float,
        max_connections: int,
        on_notice: NoticeHandler | None = None,
        unrelayed: UnrelayedHandler | None = None,
    ) -> None:
        """``unrelayed`` answers what the server asks outside any call."""
        self.name = name
        self._credentials = credentials
        self._timeout = timeout
        self._pool = Pool(url, max_connections=max_connections)
        # Answers to what a server asks during a call go on connections of
        # their own: every call's stream may be holding one of the others.
        self._replies = Pool(url, max_connections=REPLY_CONNECTIONS)
        self._on_notice = on_notice
        self._unrelayed = unrelayed
        self._listening = anyio.CancelScope()
        self._ids = itertools.count(1)
        self._session: str | None = None
        self._version = LATEST_HANDSHAKE_VERSION
        self._schemas: dict[str, Mapping[str, Any]] = {}
        self._validators: dict[str, Validator] = {}
        # Cleared by whoever gives the session up (a failed request, a server
        # that forgot it, aclose); it is then not used again.
        self.sound = True

    # ---- opening ----------------------------------------------------------

    async def open(self) -> list[types.Tool]:
        """The handshake; then every tool this session offers, for the pin check."""
        hello = {
            "protocolVersion": self._version,
            "capabilities": {},
            "clientInfo": CLIENT_INFO,
        }
        message, session = await self._exchange(0, "initialize", hello, None)
        result = types.InitializeResult.model_validate(_result_of(message))
        if result.protocol_version not in HANDSHAKE_PROTOCOL_VERSIONS:
            raise WireFailed(
                f"server {self.name} answered initialize with protocol "
                f"{result.protocol_version!r}"
            )
        self._session, self._version = session, result.protocol_version
        await self._notify("notifications/initialized")
        return await self._all_tools()

    async def _all_tools(self) -> list[types.Tool]:
        tools: list[types.Tool] = []
        cursor: str | None = None
        while True:
            params = {"cursor": cursor} if cursor else {}
            message, _ = await self._exchange(
                next(self._ids), "tools/list", params, None
            )
            page = types.ListToolsResult.model_validate(_result_of(message))
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        self._schemas = {t.name: t.output_schema for t in tools if t.output_schema}
        self._validators = {}
        return tools

    # ---- calls ------------------------------------------------------------

    async def call_tool(
        self, name: str, arguments: Mapping[str, Any], relay: Relay | None
    ) -> types.CallToolResult:
        """The server's result, checked as the SDK's client checks it.

        An error the server answered is raised as MCPError; anything that
        is no answer at all is WireFailed or HttpError.
        """
        params = {"name": name, "arguments": arguments}
        request_id = next(self._ids)
        try:
            message, _ = await self._exchange(request_id, "tools/call", params, relay)
        except SessionGone:
            raise  # the server never took the call
        except (HttpError, WireFailed, anyio.get_cancelled_exc_class()):
            # As the SDK's client does when it gives up on a request (the
            # agent cancelled it, it timed out, its answer never came): the
            # server may still be working on it, so tell it.
            with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_SECONDS):
                await self._cancelled(request_id)
            raise
        result = types.CallToolResult.model_validate(_result_of(message), by_name=False)
        if not result.is_error:
            self._check_output(name, result)
        return result

    def _check_output(self, name: str, result: types.CallToolResult) -> None:
        schema = self._schemas.get(name)
        if schema is None:
            return
        if result.structured_content is None:
            raise RuntimeError(
                f"Tool {name} has an output schema but did not return "
                "structured content"
            )
        validator = self._validators.get(name)
        if validator is None:
            validator = validator_for(schema)(schema)
            self._validators[name] = validator
        error = schema_errors.best_match(
            validator.iter_errors(result.structured_content)
        )
        if error is not None:
            raise RuntimeError(
                f"Invalid structured content returned by tool {name}: {error}"
            )

    # ---- one request, its answer, and what the server says meanwhile -------

    async def _exchange(
        self,
        request_id: int,
        method: str,
        params: Mapping[str, Any],
        relay: Relay | None,
    ) -> tuple[dict[str, Any], str | None]:
        """Send one request; its answer, and the session id the server named."""
        request = {"jsonrpc": "2.0", "id": request_id, "method": method}
        request["params"] = params
        response = await self._pool.stream(
            pydantic_core.to_json(request), await self._headers(), timeout=self._timeout
        )
        try:
            answer = await self._answer(response, request_id, relay)
        finally:
            await response.aclose()
        return answer, response.headers.get("mcp-session-id")

    async def _answer(
        self, response: StreamedResponse, request_id: int, relay: Relay | None
    ) -> dict[str, Any]:
        if response.status == 404 and self._session is not None:
            raise SessionGone(f"server {self.name} no longer knows the session")
        if response.status != 200:
            raise WireFailed(f"server {self.name} answered HTTP {response.status}")
        kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == JSON:
            message = _message(await response.read())
            if _answers(message, request_id):
                return message
            raise WireFailed(f"server {self.name} answered another request")
        if kind != EVENTS:
            raise WireFailed(f"server {self.name} answered with {kind or 'no type'}")
        async for event in response.events():
            if not event.data:
                continue  # a priming event, for resuming streams
            message = _message(event.data.encode())
            if _answers(message, request_id):
                return message
            await self._incoming(message, relay)
        raise WireFailed(f"server {self.name} ended the stream without an answer")

    async def _incoming(self, message: dict[str, Any], relay: Relay | None) -> None:
        """A request or notification the server sent before its answer."""
        method = message.get("method")
        if not isinstance(method, str):
            log.debug("server %s sent an answer nobody waits for", self.name)
            return
        if "id" in message:
            reply = await self._reply_to(method, message.get("params"), relay)
            await self._send_reply(message["id"], reply)
            return
        try:
            notice = _notices.validate_python(message)
        except pydantic.ValidationError:
            log.warning(
                "server %s sent a notification it may not: %s", self.name, method
            )
            return
        if isinstance(notice, types.LoggingMessageNotification):
            if relay is not None:
                await relay.log(notice.params)
        elif isinstance(notice, types.ProgressNotification):
            pass  # a forwarded call carries no progress token of the agent's
        elif self._on_notice is not None:
            await self._on_notice(notice)

    async def _reply_to(
        self, method: str, params: Any, relay: Relay | None
    ) -> types.Result | types.ErrorData:
        if method == "ping":
            return types.EmptyResult()
        kind = KINDS.get(method)
        if kind is None:
            return types.ErrorData(
                code=types.METHOD_NOT_FOUND, message="Method not found"
            )
        try:
            asked = _asked[method].validate_python(params)
        except pydantic.ValidationError:
            # As the SDK's client answers a request it cannot read.
            return types.ErrorData(
                code=types.INVALID_PARAMS, message="Invalid request parameters", data=""
            )
        if relay is not None:
            relayed: types.Result | types.ErrorData = await (
                relay.sample(asked) if kind == "sample" else relay.elicit(asked)
            )
            return relayed
        if self._unrelayed is not None:
            unrelayed: types.Result | types.ErrorData = await self._unrelayed(
                kind, asked
            )
            return unrelayed
        return types.ErrorData(code=types.METHOD_NOT_FOUND, message="Method not found")

    async def _send_reply(
        self, request_id: Any, reply: types.Result | types.ErrorData
    ) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id}
        if isinstance(reply, types.ErrorData):
            message["error"] = reply.model_dump(by_alias=True, exclude_none=True)
        else:
            message["result"] = reply.model_dump(
                by_alias=True, mode="json", exclude_none=True
            )
        await self._post(message)

    async def _notify(self, method: str) -> None:
        await self._post({"jsonrpc": "2.0", "method": method})

    async def _cancelled(self, request_id: int) -> None:
        cancel = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": request_id},
        }
        try:
            await self._post(cancel)
        except (HttpError, WireFailed, DownstreamFailed) as exc:
            log.debug("server %s was not told of a cancelled call: %s", self.name, exc)

    async def _post(self, message: Mapping[str, Any]) -> None:
        """A message that gets no answer of its own: 202 Accepted."""
        response = await self._replies.post(
            pydantic_core.to_json(message), await self._headers(), timeout=self._timeout
        )
        if response.status not in (200, 202):
            raise WireFailed(f"server {self.name} answered HTTP {response.status}")

    async def _headers(self) -> list[tuple[str, str]]:
        headers = [("content-type", JSON), ("accept", ACCEPT)]
        if self._session is not None:
            headers.append(("mcp-session-id", self._session))
            headers.append(("mcp-protocol-version", self._version))
        credential = await self._credentials.header()
        if credential is not None:
            headers.append(credential)
        return headers

    async def listen(self) -> None:
        """Take what the server sends outside any call, until the session closes.

        That is the standing event stream of Streamable HTTP: notices (a
        resource update, a list change) go to the notice handler, requests
        to ``unrelayed``. A server that offers no such stream (405) is left
        alone; one that forgot the session gives the session up.
        """
        with self._listening:
            while self.sound:
                try:
                    if not await self._listen_once():
                        return
                except (HttpError, WireFailed) as exc:
                    log.debug("server %s: standing stream: %s", self.name, exc)
                await anyio.sleep(LISTEN_RETRY_SECONDS)

    async def _listen_once(self) -> bool:
        """Read the standing stream once; False when there is none to come back to."""
        headers = [h for h in await self._headers() if h[0] != "content-type"]
        headers = [("accept", EVENTS) if h[0] == "accept" else h for h in headers]
        response = await self._pool.listen(headers)
        try:
            if response.status == 404:
                self.sound = False
                return False
            if response.status != 200:
                return False
            async for event in response.events():
                if event.data:
                    await self._incoming(_message(event.data.encode()), None)
        finally:
            await response.aclose()
        return True

    async def aclose(self) -> None:
        self.sound = False
        self._listening.cancel()
        await self._pool.aclose()
        await self._replies.aclose()


def _message(data: bytes) -> dict[str, Any]:
    try:
        message = pydantic_core.from_json(data)
    except ValueError as exc:
        raise WireFailed(f"unreadable JSON-RPC message: {exc}") from None
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        raise WireFailed("a message that is not JSON-RPC 2.0")
    return message


def _answers(message: Mapping[str, Any], request_id: int) -> bool:
    return "method" not in message and message.get("id") == request_id


def _result_of(message: Mapping[str, Any]) -> Any:
    """The result of an answer; an error the server answered is raised."""
    if "error" in message:
        raise MCPError.from_error_data(types.ErrorData.model_validate(message["error"]))
    if "result" not in message:
        raise WireFailed("an answer with neither result nor error")
    return message["result"]


__all__ = ["HttpError", "SessionGone", "WireFailed", "WireSession"]
