"""The broker's own session with a Streamable HTTP server, against real servers.

Most tests talk to the relay test server, run in a subprocess over HTTP. What
it cannot do (a result that breaks its own output schema, requests and
notices of its own on a call's stream, a listing in pages) comes from the
SDK's low-level server on uvicorn in the test's own loop. The agent's side
of a call is a recording stand-in, which declines unless told what to answer.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import mcp.types as types
import pytest
import uvicorn
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata

from broker.credentials import CredentialSource
from broker.manifest import Credential
from broker.wire import HttpError, SessionGone, WireSession
from tests.harness import free_port
from tests.test_lean import relay_over_http

RELAY_TOOLS = ["ask_model", "ask_user", "chatty", "named", "dawdle", "bump", "steps"]
DECLINED = types.ErrorData(code=-32042, message="declined by the test's agent")
NO_CREDENTIAL = CredentialSource(Credential(kind="none"))
SECRET_VARIABLE = "WIRE_TEST_DOWNSTREAM_SECRET"
SENT_HEADERS = {
    "host",
    "content-length",
    "content-type",
    "accept",
    "authorization",
    "mcp-session-id",
    "mcp-protocol-version",
}
NAME_ONLY = {
    "type": "object",
    "properties": {"name": {"type": "string"}},
    "required": ["name"],
}


class Agent:
    """The agent's side of one call: it records what it is given and answers.

    Unless told otherwise it declines to sample or elicit.
    """

    def __init__(
        self,
        *,
        sampled: types.Result | types.ErrorData = DECLINED,
        elicited: types.Result | types.ErrorData = DECLINED,
    ) -> None:
        self.sampled = sampled
        self.elicited = elicited
        self.samples: list[types.CreateMessageRequestParams] = []
        self.elicitations: list[types.ElicitRequestParams] = []
        self.logs: list[types.LoggingMessageNotificationParams] = []

    async def sample(self, params: types.CreateMessageRequestParams) -> Any:
        self.samples.append(params)
        return self.sampled

    async def elicit(self, params: types.ElicitRequestParams) -> Any:
        self.elicitations.append(params)
        return self.elicited

    async def log(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append(params)


@dataclass
class Notices:
    """What a session's notice handler was given."""

    received: list[types.ServerNotification] = field(default_factory=list)
    arrived: anyio.Event = field(default_factory=anyio.Event)

    async def __call__(self, notice: types.ServerNotification) -> None:
        self.received.append(notice)
        self.arrived.set()


@asynccontextmanager
async def opened(
    url: str,
    *,
    credentials: CredentialSource = NO_CREDENTIAL,
    call_timeout: float = 10,
    max_connections: int = 4,
    on_notice: Notices | None = None,
) -> AsyncIterator[tuple[WireSession, list[types.Tool]]]:
    """A wire session to ``url`` after its handshake, and the tools it offers."""
    wire = WireSession(
        "relay",
        url,
        credentials,
        timeout=call_timeout,
        max_connections=max_connections,
        on_notice=on_notice,
    )
    try:
        yield wire, await wire.open()
    finally:
        await wire.aclose()


def text_of(result: types.CallToolResult) -> str:
    [content] = result.content
    assert isinstance(content, types.TextContent)
    return content.text


async def noted(notes: Path, *, within: float) -> list[str]:
    """What the relay server noted, once it noted anything or ``within`` passed."""
    path = anyio.Path(notes)
    deadline = anyio.current_time() + within
    while anyio.current_time() < deadline:
        if await path.exists() and await path.read_text(encoding="utf-8"):
            break
        await anyio.sleep(0.02)
    if not await path.exists():
        return []
    return (await path.read_text(encoding="utf-8")).splitlines()


# ---- the relay server, in a subprocess ---------------------------------------


@dataclass
class Relay:
    port: int
    process: subprocess.Popen[bytes]
    notes: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"


@pytest.fixture(scope="module")
def shared_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """One relay server for the tests that leave it running."""
    port, notes = free_port(), tmp_path_factory.mktemp("relay") / "notes.txt"
    with relay_over_http(port, notes) as process:
        yield Relay(port, process, notes)


@pytest.fixture
def own_relay(tmp_path: Path) -> Iterator[Relay]:
    """A relay server of the test's own, to kill or to read the notes of."""
    port, notes = free_port(), tmp_path / "notes.txt"
    with relay_over_http(port, notes) as process:
        yield Relay(port, process, notes)


# ---- a low-level server, in the test's loop ----------------------------------


def _tool(name: str, output_schema: dict[str, Any] | None = None) -> types.Tool:
    return types.Tool(
        name=name,
        input_schema={"type": "object"},
        output_schema=output_schema,
    )


ODD_TOOLS = [
    _tool("shaped", NAME_ONLY),
    _tool("misshaped", NAME_ONLY),
    _tool("unshaped", NAME_ONLY),
    _tool("touch"),
    _tool("knock"),
    _tool("capabilities"),
    _tool("garble"),
]
# The listing comes in pages of this many tools, to be followed to its end.
PAGE = 4


def _text(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)])


async def _list_tools(
    ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
) -> types.ListToolsResult:
    start = int(params.cursor) if params is not None and params.cursor else 0
    end = start + PAGE
    cursor = str(end) if end < len(ODD_TOOLS) else None
    return types.ListToolsResult(tools=ODD_TOOLS[start:end], next_cursor=cursor)


async def _call_tool(
    ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
) -> types.CallToolResult:
    name = params.name
    if name == "shaped":
        result = _text("Ada")
        result.structured_content = {"name": "Ada"}
        return result
    if name == "misshaped":
        result = _text("7")
        result.structured_content = {"name": 7}
        return result
    if name == "unshaped":
        return _text("no structure")
    if name == "touch":
        return await _touch(ctx)
    if name == "knock":
        return await _knock(ctx)
    if name == "garble":
        return await _garble(ctx)
    if name == "capabilities":
        declared = ctx.session.client_capabilities
        return _text("none" if declared is None else declared.model_dump_json())
    return types.CallToolResult(content=[], is_error=True)


async def _touch(ctx: ServerRequestContext[Any, Any]) -> types.CallToolResult:
    """Notices on the call's own stream: a resource update, a list change."""
    updated = types.ResourceUpdatedNotification(
        params=types.ResourceUpdatedNotificationParams(uri="odd://thing")
    )
    await ctx.session.send_notification(updated, related_request_id=ctx.request_id)
    changed = types.ToolListChangedNotification()
    await ctx.session.send_notification(changed, related_request_id=ctx.request_id)
    return _text("touched")


async def _knock(ctx: ServerRequestContext[Any, Any]) -> types.CallToolResult:
    """A ping, then a request for roots, both on the call's own stream."""
    scoped = ServerMessageMetadata(related_request_id=ctx.request_id)
    await ctx.session.send_request(
        types.PingRequest(), types.EmptyResult, metadata=scoped
    )
    try:
        await ctx.session.send_request(
            types.ListRootsRequest(), types.ListRootsResult, metadata=scoped
        )
    except MCPError as exc:
        return _text(f"pinged; roots refused with {exc.code}")
    return _text("pinged; roots answered")


async def _garble(ctx: ServerRequestContext[Any, Any]) -> types.CallToolResult:
    """A sampling request whose parameters do not validate, on the call's stream."""
    scoped = ServerMessageMetadata(related_request_id=ctx.request_id)
    params = types.CreateMessageRequestParams.model_construct(
        messages="not a list", max_tokens="many"
    )
    try:
        with warnings.catch_warnings():
            # Serialising the unvalidated parameters is what warns.
            warnings.simplefilter("ignore")
            await ctx.session.send_request(
                types.CreateMessageRequest(params=params),
                types.CreateMessageResult,
                # Not left waiting for ever when the answer never comes.
                request_read_timeout_seconds=0.5,
                metadata=scoped,
            )
    except MCPError as exc:
        return _text(f"sampling refused with {exc.code}")
    finally:
        ctx.lifespan_context["garbled"].set()
    return _text("sampling answered")


class Recorder:
    """ASGI middleware noting the headers of every HTTP request that arrives."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[list[tuple[str, str]]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = [
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
            ]
            self.requests.append(headers)
        await self.app(scope, receive, send)


@dataclass
class Odd:
    url: str
    recorder: Recorder
    # Set once garble's handler is done: a server stopped while one waits
    # for its answer takes seconds to give it up.
    garbled: asyncio.Event


@pytest.fixture
async def odd() -> AsyncIterator[Odd]:
    """The low-level server on uvicorn on a free loopback port."""
    garbled = asyncio.Event()

    @asynccontextmanager
    async def lifespan(_: Server[Any]) -> AsyncIterator[dict[str, Any]]:
        yield {"garbled": garbled}

    server: Server[Any] = Server(
        "odd",
        version="1.0",
        lifespan=lifespan,
        on_list_tools=_list_tools,
        on_call_tool=_call_tool,
    )
    recorder = Recorder(server.streamable_http_app())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        recorder, lifespan="on", log_level="warning", timeout_graceful_shutdown=2
    )
    web = uvicorn.Server(config)
    # A task of its own rather than a task group: pytest-asyncio ends a
    # fixture in another task than the one it began in.
    serving = asyncio.create_task(web.serve(sockets=[sock]))
    while not web.started:  # noqa: ASYNC110 (uvicorn offers a flag, no event)
        await asyncio.sleep(0.005)
    yield Odd(f"http://127.0.0.1:{sock.getsockname()[1]}/mcp", recorder, garbled)
    web.should_exit = True
    await serving
    sock.close()


# ---- opening and calling -----------------------------------------------------


async def test_open_lists_the_tools_and_a_call_is_answered(
    shared_relay: Relay,
) -> None:
    """open() gives every tool the server offers; a call gives its structured result."""
    async with opened(shared_relay.url) as (wire, tools):
        result = await wire.call_tool("named", {"name": "Ada"}, Agent())

    assert [tool.name for tool in tools] == RELAY_TOOLS
    assert result.is_error is False
    assert result.structured_content == {"name": "Ada"}


async def test_open_follows_the_listing_to_its_last_page(odd: Odd) -> None:
    """A listing given in pages is read to its end, in the server's order."""
    async with opened(odd.url) as (_, tools):
        pass

    assert len(ODD_TOOLS) > PAGE
    assert tools == ODD_TOOLS


async def test_the_handshake_declares_no_client_capabilities(odd: Odd) -> None:
    """The server is told of no sampling, elicitation or roots on this session."""
    async with opened(odd.url) as (wire, _):
        result = await wire.call_tool("capabilities", {}, Agent())

    assert types.ClientCapabilities.model_validate_json(text_of(result)) == (
        types.ClientCapabilities()
    )


async def test_concurrent_calls_on_one_session_get_their_own_answers(
    shared_relay: Relay,
) -> None:
    """Twenty calls at once over four connections each get the answer to its own."""
    answers: dict[int, Any] = {}

    async def ask(index: int, wire: WireSession) -> None:
        result = await wire.call_tool("named", {"name": f"caller {index}"}, Agent())
        answers[index] = result.structured_content

    async with (
        opened(shared_relay.url, max_connections=4) as (wire, _),
        anyio.create_task_group() as tasks,
    ):
        for index in range(20):
            tasks.start_soon(ask, index, wire)

    assert answers == {index: {"name": f"caller {index}"} for index in range(20)}


async def test_a_bad_argument_is_a_tool_error_result(shared_relay: Relay) -> None:
    """An argument of the wrong type is an isError result, not a raised error."""
    async with opened(shared_relay.url) as (wire, _):
        result = await wire.call_tool("named", {"name": 7}, Agent())

    assert result.is_error is True
    assert result.structured_content is None
    assert text_of(result).startswith("Error executing tool named: ")
    assert "Input should be a valid string" in text_of(result)


async def test_an_unknown_tool_is_a_tool_error_result(shared_relay: Relay) -> None:
    """A tool the server does not have is an isError result naming it."""
    async with opened(shared_relay.url) as (wire, _):
        result = await wire.call_tool("no_such_tool", {}, Agent())

    assert result.is_error is True
    assert text_of(result) == "Unknown tool: no_such_tool"


# ---- what the server says while a call runs ----------------------------------


async def test_log_messages_go_to_the_relay_in_order(shared_relay: Relay) -> None:
    """Each log line the tool sends reaches the relay, in order, with its level."""
    agent = Agent()
    async with opened(shared_relay.url) as (wire, _):
        result = await wire.call_tool("chatty", {}, agent)

    assert text_of(result) == "logged"
    assert [(entry.level, entry.data) for entry in agent.logs] == [
        ("debug", "a debug line"),
        ("info", "an info line"),
        ("warning", "a warning line"),
    ]


async def test_a_sampling_request_is_put_to_the_relay_and_its_answer_sent(
    shared_relay: Relay,
) -> None:
    """The relay gets the prompt; the error it gives comes back as the call's error."""
    agent = Agent()
    async with opened(shared_relay.url) as (wire, _):
        with pytest.raises(MCPError) as raised:
            await wire.call_tool("ask_model", {"prompt": "Say hello"}, agent)

    [asked] = agent.samples
    [message] = asked.messages
    assert message.role == "user"
    assert message.content == types.TextContent(type="text", text="Say hello")
    assert asked.max_tokens == 50
    # The tool let the sampling error it got from us propagate: the server
    # answered the call with exactly the error the relay gave.
    assert raised.value.error == DECLINED


async def test_an_elicitation_is_put_to_the_relay_and_its_answer_sent(
    shared_relay: Relay,
) -> None:
    """The relay gets the question; the tool says it was not answered, and why."""
    agent = Agent()
    async with opened(shared_relay.url) as (wire, _):
        result = await wire.call_tool("ask_user", {"question": "Who?"}, agent)

    [asked] = agent.elicitations
    assert isinstance(asked, types.ElicitRequestFormParams)
    assert asked.message == "Who?"
    assert text_of(result) == f"not answered: {DECLINED.message}"


async def test_what_the_relay_answers_reaches_the_server(shared_relay: Relay) -> None:
    """A sampling result and an accepted elicitation go back to the server as given."""
    sampled = types.CreateMessageResult(
        role="assistant",
        content=types.TextContent(type="text", text="hello there"),
        model="test-model",
    )
    accepted = types.ElicitResult(action="accept", content={"name": "Ada"})
    agent = Agent(sampled=sampled, elicited=accepted)
    async with opened(shared_relay.url) as (wire, _):
        modelled = await wire.call_tool("ask_model", {"prompt": "Hi"}, agent)
        elicited = await wire.call_tool("ask_user", {"question": "Who?"}, agent)

    assert text_of(modelled) == "model said: hello there"
    assert text_of(elicited) == "user said: Ada"


async def test_a_request_without_a_relay_is_refused(shared_relay: Relay) -> None:
    """With no relay, a sampling request is answered METHOD_NOT_FOUND."""
    async with opened(shared_relay.url) as (wire, _):
        with pytest.raises(MCPError) as raised:
            await wire.call_tool("ask_model", {"prompt": "Hi"}, None)

    assert raised.value.code == types.METHOD_NOT_FOUND


async def test_a_malformed_request_is_answered_invalid_params(odd: Odd) -> None:
    """A sampling request that does not validate is refused as the SDK refuses it."""
    agent = Agent()
    async with opened(odd.url) as (wire, _):
        try:
            result = await wire.call_tool("garble", {}, agent)
        finally:
            with anyio.fail_after(3):
                await odd.garbled.wait()

    assert text_of(result) == f"sampling refused with {types.INVALID_PARAMS}"
    assert agent.samples == []


async def test_a_ping_is_answered_and_other_requests_refused(odd: Odd) -> None:
    """A ping on the call's stream gets an empty result, roots/list METHOD_NOT_FOUND."""
    async with opened(odd.url) as (wire, _):
        result = await wire.call_tool("knock", {}, Agent())

    assert text_of(result) == f"pinged; roots refused with {types.METHOD_NOT_FOUND}"


async def test_notices_on_the_call_stream_go_to_the_notice_handler(odd: Odd) -> None:
    """A resource update and a list change sent on the call's stream reach on_notice."""
    notices = Notices()
    async with opened(odd.url, on_notice=notices) as (wire, _):
        result = await wire.call_tool("touch", {}, Agent())

    assert text_of(result) == "touched"
    updated, changed = notices.received
    assert isinstance(updated, types.ResourceUpdatedNotification)
    assert updated.params.uri == "odd://thing"
    assert isinstance(changed, types.ToolListChangedNotification)


async def test_an_update_sent_off_the_call_stream_arrives_on_the_standing_one(
    shared_relay: Relay,
) -> None:
    """bump's update, sent on no call's stream, reaches on_notice all the same."""
    notices = Notices()
    async with (
        opened(shared_relay.url, on_notice=notices) as (wire, _),
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(wire.listen)
        await anyio.sleep(0.3)  # the standing stream is asked for first
        result = await wire.call_tool("bump", {}, Agent())
        with anyio.fail_after(3):
            await notices.arrived.wait()
        tasks.cancel_scope.cancel()

    assert int(text_of(result)) >= 1
    (updated,) = notices.received
    assert isinstance(updated, types.ResourceUpdatedNotification)
    assert str(updated.params.uri) == "relay://counter"


async def test_a_session_without_a_listener_misses_what_is_sent_off_stream(
    shared_relay: Relay,
) -> None:
    """Without listen() nothing carries bump's update: the listener is what does."""
    notices = Notices()
    async with opened(shared_relay.url, on_notice=notices) as (wire, _):
        await wire.call_tool("bump", {}, Agent())
        await anyio.sleep(0.3)
    assert notices.received == []


# ---- the output schema -------------------------------------------------------


async def test_a_conforming_structured_result_passes(odd: Odd) -> None:
    """Structured content that fits the tool's output schema is returned."""
    async with opened(odd.url) as (wire, _):
        result = await wire.call_tool("shaped", {}, Agent())

    assert result.structured_content == {"name": "Ada"}


async def test_a_result_breaking_the_output_schema_is_refused(odd: Odd) -> None:
    """Structured content that does not fit the tool's output schema raises."""
    async with opened(odd.url) as (wire, _):
        with pytest.raises(
            RuntimeError, match=r"Invalid structured content .* tool misshaped: "
        ):
            await wire.call_tool("misshaped", {}, Agent())


async def test_a_result_without_structure_is_refused(odd: Odd) -> None:
    """A tool with an output schema that returns no structured content raises."""
    async with opened(odd.url) as (wire, _):
        with pytest.raises(RuntimeError, match="did not return structured content"):
            await wire.call_tool("unshaped", {}, Agent())


# ---- credentials -------------------------------------------------------------


async def test_every_request_carries_the_brokers_own_credential(
    odd: Odd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each request carries the secret from the broker's environment, and no more."""
    monkeypatch.setenv(SECRET_VARIABLE, "downstream-secret")
    credentials = CredentialSource(Credential(kind="env", variable=SECRET_VARIABLE))
    async with opened(odd.url, credentials=credentials) as (wire, _):
        await wire.call_tool("shaped", {}, Agent())

    # initialize, notifications/initialized, two pages of tools/list, tools/call
    assert len(odd.recorder.requests) == 5
    for headers in odd.recorder.requests:
        names = [name for name, _ in headers]
        assert set(names) <= SENT_HEADERS
        assert len(names) == len(set(names))
        assert ("authorization", "Bearer downstream-secret") in headers


# ---- when the server goes away -----------------------------------------------


async def test_a_restarted_server_has_forgotten_the_session(own_relay: Relay) -> None:
    """After a restart the next call is SessionGone; a new session then works."""
    async with opened(own_relay.url) as (wire, _):
        await wire.call_tool("named", {"name": "before"}, Agent())
        own_relay.process.kill()
        own_relay.process.wait()
        with relay_over_http(own_relay.port):
            with pytest.raises(SessionGone):
                await wire.call_tool("named", {"name": "after"}, Agent())
            async with opened(own_relay.url) as (fresh, tools):
                result = await fresh.call_tool("named", {"name": "after"}, Agent())

    assert [tool.name for tool in tools] == RELAY_TOOLS
    assert result.structured_content == {"name": "after"}


async def test_a_server_killed_during_a_call_fails_it_at_once(own_relay: Relay) -> None:
    """A server that dies mid-call is an HttpError then, not when the call would end."""

    async def kill_soon() -> None:
        await anyio.sleep(0.3)
        own_relay.process.kill()

    async with opened(own_relay.url) as (wire, _):
        with anyio.fail_after(3):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(kill_soon)
                with pytest.raises(HttpError, match="closed before the answer"):
                    await wire.call_tool("dawdle", {"seconds": 5}, Agent())


async def test_a_cancelled_call_is_cancelled_on_the_server(own_relay: Relay) -> None:
    """A call its caller gives up on is sent notifications/cancelled."""
    async with opened(own_relay.url) as (wire, _):
        with anyio.move_on_after(0.3):
            await wire.call_tool("dawdle", {"seconds": 5}, Agent())

        assert await noted(own_relay.notes, within=3) == ["dawdle cancelled"]


async def test_a_call_past_its_timeout_is_cancelled_on_the_server(
    own_relay: Relay,
) -> None:
    """A call past the session's timeout is sent notifications/cancelled."""
    async with opened(own_relay.url, call_timeout=0.5) as (wire, _):
        with pytest.raises(HttpError, match="within the timeout"):
            await wire.call_tool("dawdle", {"seconds": 2}, Agent())

        assert await noted(own_relay.notes, within=1.2) == ["dawdle cancelled"]


async def test_aclose_spoils_the_session_and_closes_its_pool(
    shared_relay: Relay,
) -> None:
    """After aclose the session is not sound and sends nothing more."""
    async with opened(shared_relay.url) as (wire, _):
        assert wire.sound is True
        await wire.aclose()

        assert wire.sound is False
        with pytest.raises(HttpError, match="the pool is closed"):
            await wire.call_tool("named", {"name": "late"}, Agent())
