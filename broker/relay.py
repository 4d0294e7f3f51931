"""What a downstream server sends back while it works on an agent's request.

A forwarded request runs on a downstream session of its own (see
``broker.downstream``), so anything the server sends on that session in the
meantime belongs to that request and to the agent that made it:

- sampling and elicitation requests are decided by Cedar (the server is the
  principal, the user the resource), recorded, and only then sent to the
  agent on the stream of its own request;
- log messages are passed on at or above the level the agent's session
  asked for with ``logging/setLevel``;
- progress is passed on against the agent's own progress token.

Nothing here changes what the downstream server is told: a log level one
agent sets applies to what that agent receives, not to the shared server.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import mcp.types as types
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp.shared.jsonrpc_dispatcher import progress_token_from_params
from mcp.shared.message import ServerMessageMetadata

from broker.errors import Denied, Forbidden
from broker.principal import Principal

log = logging.getLogger("broker.relay")

SESSION_HEADER = "mcp-session-id"
LEVELS: tuple[types.LoggingLevel, ...] = (
    "debug",
    "info",
    "notice",
    "warning",
    "error",
    "critical",
    "alert",
    "emergency",
)
METHOD_OF = {"sample": "sampling/createMessage", "elicit": "elicitation/create"}
# Sessions whose log level is remembered; the oldest is forgotten first.
MAX_REMEMBERED_SESSIONS = 10_000

Kind = Literal["sample", "elicit"]


class AgentSide(Protocol):
    """Who a forwarded request is for, as deciding a server's request needs it."""

    principal: Principal
    server: str
    target: str
    decision_id: str

    @property
    def can_ask(self) -> bool:
        """Can the agent's connection answer a request at all?"""
        ...

    def accepts(self, kind: Kind) -> bool:
        """Did the agent's client declare that it takes this kind of request?"""
        ...


# Decides and records one request a server sends towards the agent; raises
# Denied when it may not pass.
Gate = Callable[[AgentSide, Kind], Awaitable[None]]


class LogLevels:
    """The log level each agent session asked for, by its session id."""

    def __init__(self, limit: int = MAX_REMEMBERED_SESSIONS) -> None:
        self._levels: OrderedDict[str, int] = OrderedDict()
        self._limit = limit

    def set(self, session: str | None, level: types.LoggingLevel) -> None:
        if session is None:
            return  # a sessionless request has nobody to remember it for
        self._levels[session] = LEVELS.index(level)
        self._levels.move_to_end(session)
        while len(self._levels) > self._limit:
            self._levels.popitem(last=False)

    def passes(self, session: str | None, level: types.LoggingLevel) -> bool:
        """A session that never set a level gets every message, as directly."""
        floor = self._levels.get(session, 0) if session is not None else 0
        return LEVELS.index(level) >= floor


@dataclass(frozen=True, slots=True)
class AgentSession:
    """What an agent's session settled at its handshake."""

    version: str  # the protocol version negotiated
    asks: bool  # its client takes sampling or elicitation requests


class AgentSessions:
    """The handshake of each agent session seen, by its session id."""

    def __init__(self, limit: int = MAX_REMEMBERED_SESSIONS) -> None:
        self._known: OrderedDict[str, AgentSession] = OrderedDict()
        self._limit = limit

    def note(self, ctx: ServerRequestContext[Any, Any]) -> None:
        """Remember the session ``ctx`` belongs to, once its handshake is done."""
        session = session_id(ctx)
        if session is None or session in self._known:
            return
        client = ctx.session.client_params
        if client is None:
            return  # before initialize has been answered
        capabilities = client.capabilities
        asks = capabilities.sampling is not None or capabilities.elicitation is not None
        self._remember(session, AgentSession(ctx.protocol_version, asks))

    def note_opening(self, ctx: ServerRequestContext[Any, Any], result: Any) -> None:
        """Remember a session from its ``initialize``, before the answer leaves.

        The agent may call right after; noting it only when the next request
        arrives would leave that call to the SDK. The SDK keeps the new
        session's id on its connection alone, which has no public accessor;
        without it the session is noted at its next request, as above.
        """
        connection = getattr(ctx.session, "_connection", None)
        session = getattr(connection, "session_id", None)
        version = result.get("protocolVersion") if isinstance(result, dict) else None
        params = ctx.params if isinstance(ctx.params, dict) else {}
        if not isinstance(session, str) or not isinstance(version, str):
            return
        try:
            declared = types.ClientCapabilities.model_validate(
                params.get("capabilities", {}), by_name=False
            )
        except ValueError:
            return
        asks = declared.sampling is not None or declared.elicitation is not None
        self._remember(session, AgentSession(version, asks))

    def _remember(self, session: str, known: AgentSession) -> None:
        self._known[session] = known
        while len(self._known) > self._limit:
            self._known.popitem(last=False)

    def get(self, session: str) -> AgentSession | None:
        return self._known.get(session)


def session_id(ctx: ServerRequestContext[Any, Any]) -> str | None:
    """The agent's MCP session id, when it has one."""
    headers = getattr(ctx.request, "headers", None)
    if headers is None:
        return None
    value = headers.get(SESSION_HEADER)
    return str(value) if value else None


@dataclass
class AgentRelay:
    """The agent's side of one forwarded request."""

    ctx: ServerRequestContext[Any, Any]
    principal: Principal
    server: str
    target: str  # the tool, prompt or resource the request is about
    decision_id: str
    gate: Gate
    levels: LogLevels

    async def sample(self, params: types.CreateMessageRequestParams) -> Any:
        result_type: type[types.Result] = (
            types.CreateMessageResultWithTools
            if params.tools
            else types.CreateMessageResult
        )
        request = types.CreateMessageRequest(params=params)
        return await self._ask("sample", request, result_type)

    async def elicit(self, params: types.ElicitRequestParams) -> Any:
        request = types.ElicitRequest(params=params)
        return await self._ask("elicit", request, types.ElicitResult)

    async def _ask(
        self, kind: Kind, request: types.ServerRequest, result_type: type[types.Result]
    ) -> Any:
        try:
            await self.gate(self, kind)
        except Denied as denied:
            return refusal_to_server(denied)
        metadata = ServerMessageMetadata(related_request_id=self.ctx.request_id)
        try:
            return await self.ctx.session.send_request(
                request, result_type, metadata=metadata
            )
        except MCPError as exc:
            return exc.error  # the agent's own answer, passed back as it came
        except Exception as exc:
            log.warning("relaying %s to the agent failed: %s", METHOD_OF[kind], exc)
            return types.ErrorData(
                code=types.INTERNAL_ERROR,
                message=f"the broker could not reach the agent: {type(exc).__name__}",
            )

    @property
    def can_ask(self) -> bool:
        return self.ctx.session.can_send_request

    def accepts(self, kind: Kind) -> bool:
        if kind == "sample":
            wanted = types.ClientCapabilities(sampling=types.SamplingCapability())
        else:
            wanted = types.ClientCapabilities(elicitation=types.ElicitationCapability())
        return self.ctx.session.check_client_capability(wanted)

    async def log(self, params: types.LoggingMessageNotificationParams) -> None:
        if not self.levels.passes(session_id(self.ctx), params.level):
            return
        try:
            # The SDK marks the logging capability deprecated for the newest
            # protocol; it still applies each version's rules for delivery.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                sending = self.ctx.session.send_log_message(
                    params.level,
                    params.data,
                    logger=params.logger,
                    related_request_id=self.ctx.request_id,
                )
            await sending
        except Exception as exc:
            log.debug("a log message could not reach the agent: %s", exc)

    @property
    def wants_progress(self) -> bool:
        return progress_token_from_params(self.ctx.params) is not None

    async def progress(
        self, progress: float, total: float | None, message: str | None
    ) -> None:
        try:
            await self.ctx.session.report_progress(progress, total, message)
        except Exception as exc:
            log.debug("a progress notification could not reach the agent: %s", exc)


def refusal_to_server(denied: Denied) -> types.ErrorData:
    """What a server is told when its request towards the agent was denied."""
    return types.ErrorData(
        code=types.INVALID_REQUEST,
        message=f"denied by the broker: {denied.category} "
        f"(decision {denied.decision_id})",
    )


def refuse_unaccepted(relay: AgentSide, kind: Kind) -> None:
    """Denied unless the agent can be asked at all, and takes this kind."""
    if not relay.can_ask:
        raise Forbidden(
            "the agent's connection cannot answer requests (stateless sessions)"
        )
    if not relay.accepts(kind):
        raise Forbidden(f"the agent's client does not accept {METHOD_OF[kind]}")
