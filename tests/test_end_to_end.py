"""End to end: the SDK's client, a broker process, a real downstream server."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import httpx2
import mcp.types as types
import pytest
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError

from tests.harness import (
    RunningBroker,
    agent,
    install_manifest,
    running_broker,
    write_config,
)
from tests.idp import LocalIdP

READ_TOOLS = {"demo.echo", "demo.add", "demo.search_web", "demo.slow"}
WRITE_TOOLS = {"demo.write_note", "demo.transfer", "demo.delete_note"}


def writer_token(idp: LocalIdP) -> str:
    return idp.token(
        idp.claims(sub="wanda", groups=["writers"], scope="tools:call tools:write")
    )


def denial(result: Any) -> dict[str, Any]:
    assert result.is_error, result
    broker_part: dict[str, Any] = result.structured_content["broker"]
    return broker_part


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_list_is_filtered_by_policy(
    broker: RunningBroker, live_idp: LocalIdP, mode: str
) -> None:
    """A reader sees only read tools, a writer write tools too, in both eras."""
    async with agent(broker.url, live_idp.token(), mode=mode) as client:
        reader_sees = {t.name for t in (await client.list_tools()).tools}
    async with agent(broker.url, writer_token(live_idp), mode=mode) as client:
        writer_sees = {t.name for t in (await client.list_tools()).tools}
    assert reader_sees == READ_TOOLS
    assert writer_sees >= READ_TOOLS | {"demo.write_note", "demo.transfer"}


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_allowed_call_returns_downstream_result_unchanged(
    broker: RunningBroker, live_idp: LocalIdP, mode: str
) -> None:
    """An allowed call answers exactly what the server answers when called directly."""
    direct_params = StdioServerParameters(
        command=sys.executable, args=["-m", "broker.demo_server"]
    )
    async with Client(direct_params, mode="legacy", cache=None) as direct:
        expected = await direct.call_tool("add", {"a": 20, "b": 22})
    async with agent(broker.url, live_idp.token(), mode=mode) as client:
        through = await client.call_tool("demo.add", {"a": 20, "b": 22})
    assert through.content == expected.content
    assert through.structured_content == expected.structured_content
    assert through.is_error is False


async def test_denied_call_never_reaches_downstream(
    broker: RunningBroker, live_idp: LocalIdP
) -> None:
    """A reader calling a write tool is denied and the server receives nothing."""
    async with agent(broker.url, live_idp.token()) as client:
        result = await client.call_tool("demo.write_note", {"title": "t", "body": "b"})
    denied = denial(result)
    assert denied["category"] == "forbidden"
    assert len(denied["decision_id"]) == 32
    assert not [r for r in broker.downstream_saw() if r.get("tool") == "write_note"]
    entry = next(e for e in broker.audit() if e.decision_id == denied["decision_id"])
    assert (entry.outcome, entry.tool) == ("deny", "demo.write_note")


async def test_denial_reveals_no_policy_or_claims(
    broker: RunningBroker, live_idp: LocalIdP
) -> None:
    """A denied agent learns a category and an id, not the policy or claims."""
    async with agent(broker.url, live_idp.token()) as client:
        result = await client.call_tool("demo.transfer", {"amount": 1, "to": "x"})
    text = json.dumps(result.model_dump(mode="json"))
    assert "writers" not in text
    assert "write-tools" not in text
    assert "alice" not in text


async def test_argument_condition_and_writer_group(
    broker: RunningBroker, live_idp: LocalIdP
) -> None:
    """A writer may transfer up to the limit; past the hard limit it is forbidden."""
    async with agent(broker.url, writer_token(live_idp)) as client:
        ok = await client.call_tool("demo.transfer", {"amount": 100000, "to": "bob"})
        over = await client.call_tool("demo.transfer", {"amount": 1000001, "to": "b"})
    assert ok.is_error is False
    assert denial(over)["category"] == "forbidden"
    amounts = [
        r["arguments"]["amount"]
        for r in broker.downstream_saw()
        if r.get("tool") == "transfer"
    ]
    assert amounts == [100000]


async def test_card_number_never_goes_to_open_world_tool(
    broker: RunningBroker, live_idp: LocalIdP
) -> None:
    """A card number in the arguments stops a call to an open-world tool."""
    async with agent(broker.url, live_idp.token()) as client:
        sent = await client.call_tool(
            "demo.search_web", {"query": "4111 1111 1111 1111"}
        )
        plain = await client.call_tool("demo.search_web", {"query": "weather"})
    assert denial(sent)["category"] == "forbidden"
    assert plain.is_error is False
    entry = next(
        e for e in broker.audit() if e.decision_id == denial(sent)["decision_id"]
    )
    assert "card_number" in entry.data_classes
    assert "4111" not in json.dumps(entry.arguments)


async def test_record_is_written_with_redacted_arguments(
    broker: RunningBroker, live_idp: LocalIdP
) -> None:
    """An allowed call leaves one entry naming the principal, with secrets redacted."""
    async with agent(broker.url, live_idp.token()) as client:
        await client.call_tool("demo.echo", {"text": "mail carol@example.com"})
    entries = [e for e in broker.audit() if e.method == "tools/call"]
    assert len(entries) == 1
    entry = entries[0]
    assert (entry.outcome, entry.subject, entry.client_id) == (
        "allow",
        "alice",
        "agent-7",
    )
    assert "carol@example.com" not in json.dumps(entry.arguments)
    assert "email" in entry.data_classes


HELLO = {
    "protocolVersion": "2025-11-25",
    "capabilities": {},
    "clientInfo": {"name": "raw", "version": "0"},
}


def raw_headers(token: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2025-11-25",
    }


def rpc(broker: RunningBroker, token: str, method: str, params: Any) -> Any:
    """One raw JSON-RPC request in a new session, as a client outside the SDK would."""
    headers = raw_headers(token)
    opened = _post(broker, headers, "initialize", HELLO, request_id=1)
    headers["Mcp-Session-Id"] = opened.headers["mcp-session-id"]
    _post(broker, headers, "notifications/initialized", None)
    return _answer(_post(broker, headers, method, params, request_id=7))


def _post(
    broker: RunningBroker,
    headers: dict[str, str],
    method: str,
    params: Any,
    request_id: int | None = None,
) -> httpx2.Response:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    if request_id is not None:
        message["id"] = request_id
    return httpx2.post(broker.url, json=message, headers=headers)


def _answer(response: httpx2.Response) -> Any:
    text = response.text
    if "data:" in text:
        text = next(line[5:] for line in text.splitlines() if line.startswith("data:"))
    return json.loads(text)


def test_unknown_and_unmediated_methods_are_refused(
    broker: RunningBroker, live_idp: LocalIdP
) -> None:
    """A method outside the mediation table is refused, and that is recorded."""
    token = live_idp.token()
    refused = rpc(broker, token, "subscriptions/listen", {})
    unknown = rpc(broker, token, "made/up", {})
    assert refused["error"]["data"]["category"] == "method_refused"
    assert unknown["error"]["data"]["category"] == "method_refused"
    methods = {e.method for e in broker.audit() if e.category == "method_refused"}
    assert {"subscriptions/listen", "made/up"} <= methods


async def test_unknown_tool_is_not_found(
    broker: RunningBroker, live_idp: LocalIdP
) -> None:
    """A tool no manifest pins is answered as not found, for any server prefix."""
    async with agent(broker.url, live_idp.token()) as client:
        missing = await client.call_tool("demo.nope", {})
        elsewhere = await client.call_tool("other.echo", {"text": "x"})
    assert denial(missing)["category"] == "not_found"
    assert denial(elsewhere)["category"] == "not_found"


async def test_no_token_is_401_with_resource_metadata(broker: RunningBroker) -> None:
    """Without a token: 401 pointing at the metadata, and a record of it."""
    response = httpx2.post(
        broker.url,
        json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
        headers={"Accept": "application/json, text/event-stream"},
    )
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert "resource_metadata=" in challenge
    metadata = httpx2.get(
        challenge.split('resource_metadata="')[1].split('"')[0]
    ).json()
    assert metadata["resource"] == broker.url
    assert any(e.category == "unauthenticated" for e in broker.audit())


async def test_wrong_audience_is_refused_end_to_end(
    broker: RunningBroker, live_idp: LocalIdP
) -> None:
    """A token minted for another resource does not open the broker."""
    token = live_idp.token(live_idp.claims(aud=["http://127.0.0.1:1/mcp"]))
    response = httpx2.post(
        broker.url,
        json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_foreign_host_and_origin_are_refused(
    broker: RunningBroker, live_idp: LocalIdP
) -> None:
    """DNS rebinding: a request naming another Host or Origin is refused before auth."""
    auth = {"Authorization": f"Bearer {live_idp.token()}"}
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    bad_host = httpx2.post(broker.url, json=body, headers={**auth, "Host": "evil.test"})
    bad_origin = httpx2.post(
        broker.url, json=body, headers={**auth, "Origin": "http://evil.test"}
    )
    assert bad_host.status_code == 421
    assert bad_origin.status_code == 403


async def test_resources_and_prompts_are_mediated(
    broker: RunningBroker, live_idp: LocalIdP
) -> None:
    """Resources and prompts pass through, named per server, and are recorded."""
    async with agent(broker.url, live_idp.token()) as client:
        resources = (await client.list_resources()).resources
        read = await client.read_resource("notes://index")
        prompts = (await client.list_prompts()).prompts
        prompt = await client.get_prompt("demo.summarize", {"text": "hello"})
    assert [str(r.uri) for r in resources] == ["notes://index"]
    assert read.contents
    assert [p.name for p in prompts] == ["demo.summarize"]
    assert "hello" in json.dumps(prompt.model_dump(mode="json"))
    methods = [e.method for e in broker.audit() if e.outcome == "allow"]
    assert "resources/read" in methods
    assert "prompts/get" in methods


def test_a_session_answers_only_the_identity_that_opened_it(
    broker: RunningBroker, live_idp: LocalIdP
) -> None:
    """Another user holding someone's session id is told it does not exist."""
    opened = _post(broker, raw_headers(live_idp.token()), "initialize", HELLO, 1)
    mallory = {
        **raw_headers(live_idp.token(live_idp.claims(sub="mallory"))),
        "Mcp-Session-Id": opened.headers["mcp-session-id"],
    }
    call = {"name": "demo.echo", "arguments": {"text": "hijack"}}
    hijack = _post(broker, mallory, "tools/call", call, request_id=2)
    assert hijack.status_code == 404
    assert not [e for e in broker.downstream_saw() if e.get("tool") == "echo"]


async def test_stateless_sessions_serve_calls_and_keep_no_session(
    tmp_path: Path, live_idp: LocalIdP, port: int
) -> None:
    """With sessions = "stateless" calls work and nothing is kept per agent."""
    write_config(
        tmp_path,
        port,
        live_idp.issuer,
        live_idp.jwks_url,
        extra_broker='sessions = "stateless"',
    )
    install_manifest(tmp_path)
    with running_broker(tmp_path, port) as stateless:
        async with agent(stateless.url, live_idp.token()) as client:
            result = await client.call_tool("demo.add", {"a": 2, "b": 3})
        opened = _post(stateless, raw_headers(live_idp.token()), "initialize", HELLO, 1)
    assert result.is_error is False
    assert "mcp-session-id" not in opened.headers


async def test_completion_is_decided_as_getting_the_prompt(
    broker: RunningBroker, live_idp: LocalIdP
) -> None:
    """Completing a prompt's argument is decided and recorded as that prompt."""
    known = types.PromptReference(type="ref/prompt", name="demo.summarize")
    unknown = types.PromptReference(type="ref/prompt", name="other.summarize")
    async with agent(broker.url, live_idp.token()) as client:
        # The demo server may offer no completions; the decision comes first.
        with contextlib.suppress(MCPError):
            await client.complete(known, {"name": "text", "value": "he"})
        with pytest.raises(MCPError) as refused:
            await client.complete(unknown, {"name": "text", "value": "x"})
    assert refused.value.error.data["category"] == "not_found"
    completions = [
        (e.outcome, e.category, e.server, e.tool)
        for e in broker.audit()
        if e.method == "completion/complete"
    ]
    assert completions[0] == ("allow", "allowed", "demo", "demo.summarize")
    assert completions[-1] == ("deny", "not_found", None, "other.summarize")
