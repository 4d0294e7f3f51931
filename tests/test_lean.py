"""The lean path answers a plain tools/call exactly as the SDK's path does.

Two brokers run side by side in front of one relay server over Streamable
HTTP: one with the lean path (the default), one with ``lean_path = false``.
Every call is made to both, and what the agent gets and what the record
keeps must be the same but for decision ids; ``broker_lean_calls_total``
tells which path answered.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp.types as types
import pytest
from mcp.server.streamable_http import REQUEST_CANCELLED
from mcp.shared.exceptions import MCPError

from tests.harness import (
    POLICIES,
    RunningBroker,
    agent,
    free_port,
    install_manifest,
    running_broker,
    write_config,
)
from tests.idp import LocalIdP

PULL = ("manifest", "pull", "relay")
RELAY_SERVER = Path(__file__).resolve().parent / "relay_server.py"
POLICY = """
permit (principal, action in Action::"call_tool", resource);
forbid (principal, action == Action::"call:relay.bump", resource)
  unless { principal == User::"rita" };
permit (principal, action == Action::"read_resource", resource);
permit (principal == Server::"relay", action == Action::"sample", resource);
forbid (principal == User::"mallory", action == Action::"call:relay.chatty", resource);
"""
DECISION = re.compile(r"\b[0-9a-f]{32}\b")
SSE_ACCEPT = "application/json, text/event-stream"


@dataclass
class Pair:
    lean: RunningBroker
    sdk: RunningBroker
    token: str
    server_port: int
    server: subprocess.Popen[bytes]
    notes: Path


@contextmanager
def relay_over_http(
    port: int, notes: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """The relay server on ``port``; it notes what happened to ``notes``."""
    env = {**os.environ, "RELAY_NOTES": str(notes)} if notes else None
    process = subprocess.Popen(
        [sys.executable, str(RELAY_SERVER), "--http", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        _wait_for_port(port, process)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the relay server exited at start")
        try:
            httpx2.get(f"http://127.0.0.1:{port}/mcp", timeout=0.5)
            return
        except httpx2.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("the relay server did not listen")


def prepare(
    workdir: Path, port: int, idp: LocalIdP, server_url: str, resource: str, extra: str
) -> None:
    policies = workdir / "policies"
    policies.mkdir(parents=True)
    shutil.copy(POLICIES / "broker.cedarschema", policies)
    (policies / "relay.cedar").write_text(POLICY, encoding="utf-8")
    write_config(
        workdir,
        port,
        idp.issuer,
        idp.jwks_url,
        policy_dir=policies,
        extra_broker=extra,
        resource=resource,
    )
    transport = {"type": "http", "url": server_url}
    install_manifest(workdir, {"server": "relay", "transport": transport})
    subprocess.run(
        [sys.executable, "-m", "broker.cli", "-c", "broker.toml", *PULL],
        cwd=workdir,
        check=True,
        capture_output=True,
    )


@contextmanager
def pair_of_brokers(
    tmp_path: Path, idp: LocalIdP, port: int, extra: str = ""
) -> Iterator[Pair]:
    server_port, sdk_port = free_port(), free_port()
    server_url = f"http://127.0.0.1:{server_port}/mcp"
    resource = f"http://127.0.0.1:{port}/mcp"
    with relay_over_http(server_port, tmp_path / "relay-notes.txt") as server:
        prepare(tmp_path / "lean", port, idp, server_url, resource, extra)
        prepare(
            tmp_path / "sdk",
            sdk_port,
            idp,
            server_url,
            resource,
            extra + "\nlean_path = false",
        )
        with (
            running_broker(tmp_path / "lean", port) as lean,
            running_broker(tmp_path / "sdk", sdk_port) as sdk,
        ):
            yield Pair(
                lean,
                sdk,
                idp.token(),
                server_port,
                server,
                tmp_path / "relay-notes.txt",
            )


@pytest.fixture
def pair(tmp_path: Path, live_idp: LocalIdP, port: int) -> Iterator[Pair]:
    with pair_of_brokers(tmp_path, live_idp, port) as running:
        yield running


def lean_calls(broker: RunningBroker, method: str = "tools/call") -> float:
    """How many requests of ``method`` the broker answered on its lean path."""
    text = httpx2.get(broker.origin + "/metrics", timeout=5).text
    if "# TYPE broker_lean_calls_total counter" not in text:
        raise AssertionError("the lean path counter is missing from /metrics")
    line = rf'^broker_lean_calls_total{{method="{re.escape(method)}"}} (\S+)$'
    found = re.search(line, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def without_ids(value: Any) -> Any:
    return DECISION.sub("<decision>", repr(value))


async def answer_to(client: Any, name: str, arguments: dict[str, Any]) -> str:
    """What the agent got, result or error, with decision ids blanked."""
    try:
        return without_ids((await client.call_tool(name, arguments)).model_dump())
    except MCPError as exc:
        return without_ids(("error", exc.error.model_dump()))


def calls_on_record(broker: RunningBroker) -> list[tuple[Any, ...]]:
    return [
        (e.method, e.outcome, e.category, e.tool, without_ids(e.detail))
        for e in broker.audit()
        if e.method in ("tools/call", "sampling/createMessage", "elicitation/create")
    ]


CALLS: list[tuple[str, dict[str, Any]]] = [
    ("relay.chatty", {}),
    ("relay.named", {"name": "Ada"}),
    ("relay.counter_missing", {}),
    ("relay.bump", {}),
    ("relay.ask_model", {"prompt": "meaning?"}),
    ("relay.ask_user", {"question": "who?"}),
    ("relay.named", {"name": 7}),
]


async def test_every_kind_of_answer_is_the_same_on_both_paths(pair: Pair) -> None:
    """Allowed, forbidden, unknown, refused sampling and elicitation, bad input."""
    answers: dict[str, list[str]] = {}
    for broker in (pair.lean, pair.sdk):
        async with agent(broker.url, pair.token) as client:
            answers[broker.url] = [
                await answer_to(client, name, args) for name, args in CALLS
            ]
    assert answers[pair.lean.url] == answers[pair.sdk.url]
    assert "Ada" in answers[pair.lean.url][1]
    assert calls_on_record(pair.lean) == calls_on_record(pair.sdk)
    assert lean_calls(pair.lean) == len(CALLS)
    assert lean_calls(pair.sdk) == 0


async def test_the_wire_session_opens_before_the_first_call(pair: Pair) -> None:
    """Only the lean broker opens a session of its own, and before it is asked."""
    opened = "downstream relay: calls go on a session of the broker's own"
    for _ in range(100):
        if opened in pair.lean.log():
            break
        await anyio.sleep(0.05)
    assert opened in pair.lean.log()
    assert opened not in pair.sdk.log()
    assert lean_calls(pair.lean) == 0


async def test_a_listing_is_the_same_on_both_paths(
    pair: Pair, live_idp: LocalIdP
) -> None:
    """tools/list shows each caller what the SDK's path shows, kept per visible set."""
    mallory = live_idp.token(live_idp.claims(sub="mallory"))
    seen: dict[str, list[list[str]]] = {}
    for broker in (pair.lean, pair.sdk):
        listings = []
        for token in (pair.token, mallory, pair.token):
            async with agent(broker.url, token) as client:
                listed = await client.list_tools()
            listings.append(without_ids(listed.model_dump()))
        seen[broker.url] = listings
    alice, theirs, again = seen[pair.lean.url]
    assert seen[pair.lean.url] == seen[pair.sdk.url]
    assert alice == again
    assert "relay.chatty" in alice
    assert "relay.chatty" not in theirs
    assert "relay.bump" not in alice
    assert lean_calls(pair.lean, "tools/list") == 3
    assert lean_calls(pair.sdk, "tools/list") == 0
    listed = [
        (e.subject, e.outcome, e.detail)
        for broker in (pair.lean, pair.sdk)
        for e in broker.audit()
        if e.method == "tools/list"
    ]
    assert listed[:3] == listed[3:]
    assert listed[:3] == [
        ("alice", "allow", "6 of 7"),
        ("mallory", "allow", "5 of 7"),
        ("alice", "allow", "6 of 7"),
    ]


async def test_a_resource_update_caused_by_a_lean_call_reaches_the_follower(
    pair: Pair, live_idp: LocalIdP
) -> None:
    """The server announces off any call's stream; the broker's own session hears it."""
    rita = live_idp.token(live_idp.claims(sub="rita"))
    for broker in (pair.lean, pair.sdk):
        updated = anyio.Event()

        async def on_message(message: Any, updated: anyio.Event = updated) -> None:
            if isinstance(message, types.ResourceUpdatedNotification):
                updated.set()

        async with agent(broker.url, rita, message_handler=on_message) as client:
            await client.subscribe_resource("relay://counter")
            bumped = await client.call_tool("relay.bump", {})
            with anyio.fail_after(10):
                await updated.wait()
            await client.unsubscribe_resource("relay://counter")
        assert not bumped.is_error
    assert lean_calls(pair.lean) == 1


async def test_log_messages_reach_the_agent_on_the_lean_path(pair: Pair) -> None:
    """A server's log lines during a lean call arrive as they do through the SDK."""
    heard: dict[str, list[tuple[str, Any]]] = {}
    for broker in (pair.lean, pair.sdk):
        lines: list[tuple[str, Any]] = []

        async def on_log(
            params: types.LoggingMessageNotificationParams,
            lines: list[tuple[str, Any]] = lines,
        ) -> None:
            lines.append((params.level, params.data))

        async with agent(broker.url, pair.token, logging_callback=on_log) as client:
            await client.set_logging_level("info")
            result = await client.call_tool("relay.chatty", {})
        assert not result.is_error
        heard[broker.url] = lines
    assert heard[pair.lean.url] == heard[pair.sdk.url]
    assert [level for level, _ in heard[pair.lean.url]] == ["info", "warning"]
    assert lean_calls(pair.lean) == 1


async def test_calls_that_need_the_sdk_are_left_to_it(pair: Pair) -> None:
    """A progress token, or a client that takes sampling, goes the SDK's way."""
    progress: list[float] = []

    async def on_progress(
        done: float, total: float | None, message: str | None
    ) -> None:
        progress.append(done)

    async def sample(context: Any, params: Any) -> types.CreateMessageResult:
        text = types.TextContent(type="text", text="hi")
        return types.CreateMessageResult(role="assistant", content=text, model="m")

    async with agent(pair.lean.url, pair.token) as client:
        steps = await client.call_tool(
            "relay.steps", {"count": 3}, progress_callback=on_progress
        )
    async with agent(pair.lean.url, pair.token, sampling_callback=sample) as client:
        sampled = await client.call_tool("relay.ask_model", {"prompt": "x"})
    assert progress == [1, 2, 3]
    assert not steps.is_error
    assert "model said: hi" in repr(sampled.content)
    assert lean_calls(pair.lean) == 0


@asynccontextmanager
async def raw_session(
    url: str, token: str
) -> AsyncIterator[tuple[httpx2.AsyncClient, str]]:
    """An MCP session opened by hand, for requests the SDK's client would not send."""
    headers = {"Authorization": f"Bearer {token}", "Accept": SSE_ACCEPT}
    async with httpx2.AsyncClient(headers=headers, timeout=10) as http:
        hello = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "raw", "version": "0"},
            },
        }
        opened = await http.post(url, json=hello)
        session = opened.headers["mcp-session-id"]
        follow = {"mcp-session-id": session, "mcp-protocol-version": "2025-11-25"}
        http.headers.update(follow)
        done = await http.post(
            url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}
        )
        assert done.status_code == 202
        yield http, session


def message_of(response: httpx2.Response) -> Any:
    """The one JSON-RPC message in an answer, sent as JSON or as an event stream."""
    if response.headers["content-type"] == "application/json":
        return response.json()
    data = response.text.split("data: ", 1)[1].strip()
    return httpx2.Response(200, content=data).json()


def call(request_id: int, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    params = {"name": name, "arguments": arguments}
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": params,
    }


async def test_a_session_is_answered_only_for_its_opener(
    pair: Pair, live_idp: LocalIdP
) -> None:
    """Another caller using someone's session id gets the SDK's 404, not an answer."""
    mallory = live_idp.token(live_idp.claims(sub="mallory"))
    async with raw_session(pair.lean.url, pair.token) as (http, session):
        own = await http.post(pair.lean.url, json=call(1, "relay.named", {"name": "a"}))
        stolen = await http.post(
            pair.lean.url,
            json=call(2, "relay.named", {"name": "b"}),
            headers={"Authorization": f"Bearer {mallory}"},
        )
    assert own.status_code == 200
    assert '"name":"a"' in own.text.replace(" ", "")
    assert own.headers["mcp-session-id"] == session
    assert own.headers["content-type"] == "application/json"
    assert stolen.status_code == 404
    assert lean_calls(pair.lean) == 1


async def test_plain_answers_keep_the_agents_connection(pair: Pair) -> None:
    """A lean answer with nothing streamed before it is one JSON body, read to its end.

    The SDK's client stops reading an event stream at the answer, which
    costs it its connection; a JSON body lets the next call reuse it.
    """
    calls: list[object] = []

    async def note_connection(response: httpx2.Response) -> None:
        if b'"tools/call"' in response.request.content:
            stream = response.extensions["network_stream"]
            calls.append(stream.get_extra_info("client_addr"))

    hooks = {"response": [note_connection]}
    async with agent(pair.lean.url, pair.token, event_hooks=hooks) as client:
        for number in range(5):
            result = await client.call_tool("relay.named", {"name": f"n{number}"})
            assert f"n{number}" in str(result.content)
    assert lean_calls(pair.lean) == 5
    assert len(calls) == 5
    assert len(set(calls)) == 1, f"the calls used {len(set(calls))} connections"


async def test_a_cancelled_lean_call_is_answered_as_cancelled(pair: Pair) -> None:
    """notifications/cancelled ends a lean call as the SDK would, and the work too."""
    answers: dict[str, dict[str, Any]] = {}
    for broker in (pair.lean, pair.sdk):
        async with raw_session(broker.url, pair.token) as (http, _):
            answer: list[httpx2.Response] = []

            async def slow_call(
                http: httpx2.AsyncClient = http,
                url: str = broker.url,
                answer: list[httpx2.Response] = answer,
            ) -> None:
                sent = call(5, "relay.dawdle", {"seconds": 5})
                answer.append(await http.post(url, json=sent))

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(slow_call)
                await anyio.sleep(0.5)
                cancel = {
                    "jsonrpc": "2.0",
                    "method": "notifications/cancelled",
                    "params": {"requestId": 5, "reason": "user gave up"},
                }
                await http.post(broker.url, json=cancel)
        answers[broker.url] = message_of(answer[0])
    assert answers[pair.lean.url] == answers[pair.sdk.url]
    assert answers[pair.lean.url]["error"]["code"] == REQUEST_CANCELLED
    assert lean_calls(pair.lean) == 1
    # Both brokers told the server, which stopped working on the call.
    for _ in range(100):
        if pair.notes.exists() and pair.notes.read_text().count("cancelled") == 2:
            break
        await anyio.sleep(0.05)
    assert pair.notes.read_text().splitlines() == ["dawdle cancelled"] * 2


async def test_a_dead_server_is_a_recorded_denial_then_calls_resume(
    tmp_path: Path, live_idp: LocalIdP, port: int
) -> None:
    """The wire session goes with its server, and comes back with the next one."""
    with pair_of_brokers(tmp_path, live_idp, port) as pair:
        async with agent(pair.lean.url, pair.token) as client:
            first = await client.call_tool("relay.named", {"name": "before"})
            pair.server.kill()
            pair.server.wait()
            await anyio.sleep(0.5)
            down = await client.call_tool("relay.named", {"name": "during"})
            with relay_over_http(pair.server_port):
                await _wait_connected(pair.lean)
                after = await client.call_tool("relay.named", {"name": "after"})
    assert not first.is_error
    assert down.is_error
    assert down.structured_content is not None
    assert down.structured_content["broker"]["category"] == "downstream_unavailable"
    assert not after.is_error
    assert "after" in repr(after.structured_content)
    outcomes = [
        (e.outcome, e.category) for e in pair.lean.audit() if e.method == "tools/call"
    ]
    assert ("deny", "downstream_unavailable") in outcomes
    assert outcomes[-1] == ("allow", "allowed")


async def _wait_connected(broker: RunningBroker) -> None:
    for _ in range(200):
        ready = httpx2.get(broker.origin + "/readyz", timeout=2)
        if ready.status_code == 200:
            return
        await anyio.sleep(0.05)
    raise AssertionError(f"broker did not reconnect: {ready.text}")


async def test_stateless_serving_takes_the_lean_path_too(
    tmp_path: Path, live_idp: LocalIdP, port: int
) -> None:
    """With sessions = "stateless" a call is answered alike, and refusals alike."""
    extra = 'sessions = "stateless"'
    with pair_of_brokers(tmp_path, live_idp, port, extra) as pair:
        answers: dict[str, list[str]] = {}
        for broker in (pair.lean, pair.sdk):
            async with agent(broker.url, pair.token) as client:
                answers[broker.url] = [
                    await answer_to(client, name, args) for name, args in CALLS
                ]
        assert answers[pair.lean.url] == answers[pair.sdk.url]
        assert calls_on_record(pair.lean) == calls_on_record(pair.sdk)
        assert lean_calls(pair.lean) == len(CALLS)
