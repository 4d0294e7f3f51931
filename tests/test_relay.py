"""What a server sends back during a call reaches the agent that made it, decided.

The downstream server here (``relay_server.py``) asks for sampling and
elicitation, logs and reports progress in the middle of its tools. The
policy lets it sample but not elicit.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import mcp.types as types
import pytest
from mcp.shared.exceptions import MCPError

from tests.harness import (
    POLICIES,
    RunningBroker,
    agent,
    install_manifest,
    running_broker,
    write_config,
)
from tests.idp import LocalIdP

PULL = ("manifest", "pull", "relay")
RELAY_SERVER = Path(__file__).resolve().parent / "relay_server.py"
POLICY = """
permit (principal, action in Action::"call_tool", resource);
permit (principal == Server::"relay", action == Action::"sample", resource);
permit (principal, action == Action::"read_resource", resource);
"""


@contextmanager
def broker_before_relay_server(
    workdir: Path, idp: LocalIdP, port: int, extra_broker: str = ""
) -> Iterator[RunningBroker]:
    policies = workdir / "policies"
    policies.mkdir()
    shutil.copy(POLICIES / "broker.cedarschema", policies)
    (policies / "relay.cedar").write_text(POLICY, encoding="utf-8")
    write_config(
        workdir,
        port,
        idp.issuer,
        idp.jwks_url,
        policy_dir=policies,
        extra_broker=extra_broker,
    )
    transport = {"type": "stdio", "command": "{python}", "args": [str(RELAY_SERVER)]}
    install_manifest(workdir, {"server": "relay", "transport": transport})
    subprocess.run(
        [sys.executable, "-m", "broker.cli", "-c", "broker.toml", *PULL],
        cwd=workdir,
        check=True,
        capture_output=True,
    )
    with running_broker(workdir, port) as running:
        yield running


@pytest.fixture
def relay_broker(
    tmp_path: Path, live_idp: LocalIdP, port: int
) -> Iterator[RunningBroker]:
    with broker_before_relay_server(tmp_path, live_idp, port) as running:
        yield running


def text_of(result: types.CallToolResult) -> str:
    content = result.content[0]
    assert isinstance(content, types.TextContent), result
    return content.text


async def test_sampling_is_relayed_to_the_agent_and_recorded(
    relay_broker: RunningBroker, live_idp: LocalIdP
) -> None:
    asked: list[str] = []

    async def sample(
        context: Any, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        content = params.messages[0].content
        asked.append(content.text if isinstance(content, types.TextContent) else "")
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text="forty-two"),
            model="test-model",
        )

    async with agent(
        relay_broker.url, live_idp.token(), sampling_callback=sample
    ) as client:
        result = await client.call_tool("relay.ask_model", {"prompt": "meaning?"})
    assert text_of(result) == "model said: forty-two"
    assert asked == ["meaning?"]
    sampled = [e for e in relay_broker.audit() if e.method == "sampling/createMessage"]
    assert [(e.outcome, e.server, e.tool) for e in sampled] == [
        ("allow", "relay", "relay.ask_model")
    ]
    assert sampled[0].subject == "alice"


async def test_each_agent_gets_only_its_own_sampling_requests(
    relay_broker: RunningBroker, live_idp: LocalIdP
) -> None:
    """Concurrent calls on one server: nothing crosses from one agent to another."""
    seen: dict[str, list[str]] = {"a": [], "b": []}

    def sampler(who: str) -> Any:
        async def sample(
            context: Any, params: types.CreateMessageRequestParams
        ) -> types.CreateMessageResult:
            content = params.messages[0].content
            assert isinstance(content, types.TextContent)
            seen[who].append(content.text)
            await anyio.sleep(0.05)  # keep both calls in flight together
            return types.CreateMessageResult(
                role="assistant",
                content=types.TextContent(type="text", text=f"from {who}"),
                model="m",
            )

        return sample

    results: dict[str, list[str]] = {"a": [], "b": []}

    async def run(who: str) -> None:
        async with agent(
            relay_broker.url, live_idp.token(), sampling_callback=sampler(who)
        ) as client:
            for n in range(5):
                prompt = f"{who}-{n}"
                result = await client.call_tool("relay.ask_model", {"prompt": prompt})
                results[who].append(text_of(result))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run, "a")
        tasks.start_soon(run, "b")
    for who in ("a", "b"):
        assert seen[who] == [f"{who}-{n}" for n in range(5)]
        assert results[who] == [f"model said: from {who}"] * 5


async def test_an_agent_that_cannot_sample_is_not_asked(
    relay_broker: RunningBroker, live_idp: LocalIdP
) -> None:
    """The server's own error about it reaches the agent as it would directly."""
    async with agent(relay_broker.url, live_idp.token()) as client:
        with pytest.raises(MCPError) as failed:
            await client.call_tool("relay.ask_model", {"prompt": "x"})
    assert "denied by the broker: forbidden" in failed.value.message
    sampled = [e for e in relay_broker.audit() if e.method == "sampling/createMessage"]
    assert [(e.outcome, e.category) for e in sampled] == [("deny", "forbidden")]
    assert "does not accept" in sampled[0].detail


async def test_elicitation_the_policy_does_not_allow_never_reaches_the_user(
    relay_broker: RunningBroker, live_idp: LocalIdP
) -> None:
    asked: list[str] = []

    async def elicit(context: Any, params: types.ElicitRequestParams) -> Any:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"name": "mallory"})

    async with agent(
        relay_broker.url, live_idp.token(), elicitation_callback=elicit
    ) as client:
        result = await client.call_tool("relay.ask_user", {"question": "Name?"})
    assert asked == []
    assert text_of(result).startswith("not answered")
    elicited = [e for e in relay_broker.audit() if e.method == "elicitation/create"]
    assert [(e.outcome, e.tool) for e in elicited] == [("deny", "relay.ask_user")]


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")
async def test_log_messages_follow_the_agents_own_level(
    relay_broker: RunningBroker, live_idp: LocalIdP
) -> None:
    received: dict[str, list[str]] = {"quiet": [], "loud": []}

    def logger(who: str) -> Any:
        async def on_log(params: types.LoggingMessageNotificationParams) -> None:
            received[who].append(str(params.data))

        return on_log

    async with (
        agent(
            relay_broker.url, live_idp.token(), logging_callback=logger("quiet")
        ) as quiet,
        agent(
            relay_broker.url, live_idp.token(), logging_callback=logger("loud")
        ) as loud,
    ):
        await quiet.set_logging_level("warning")
        await quiet.call_tool("relay.chatty", {})
        await loud.call_tool("relay.chatty", {})
    assert received["quiet"] == ["a warning line"]
    assert received["loud"] == ["a debug line", "an info line", "a warning line"]
    levels = [e.detail for e in relay_broker.audit() if e.method == "logging/setLevel"]
    assert levels == ["level warning"]


async def test_progress_is_relayed_against_the_agents_own_token(
    relay_broker: RunningBroker, live_idp: LocalIdP
) -> None:
    steps: list[tuple[float, float | None, str | None]] = []

    async def on_progress(
        progress: float, total: float | None, message: str | None
    ) -> None:
        steps.append((progress, total, message))

    async with agent(relay_broker.url, live_idp.token()) as client:
        result = await client.call_tool(
            "relay.steps", {"count": 3}, progress_callback=on_progress
        )
    assert text_of(result) == "3 steps"
    assert steps == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]


async def test_stateless_sessions_cannot_be_asked_for_sampling(
    tmp_path: Path, live_idp: LocalIdP, port: int
) -> None:
    """Without a session the agent's answer has nowhere to land: refused, recorded."""
    asked: list[str] = []

    async def sample(context: Any, params: types.CreateMessageRequestParams) -> Any:
        asked.append("asked")
        raise AssertionError("a stateless agent cannot be asked")

    stateless = 'sessions = "stateless"'
    with broker_before_relay_server(tmp_path, live_idp, port, stateless) as broker:
        async with agent(
            broker.url, live_idp.token(), sampling_callback=sample
        ) as client:
            with pytest.raises(MCPError):
                await client.call_tool("relay.ask_model", {"prompt": "x"})
        sampled = [e for e in broker.audit() if e.method == "sampling/createMessage"]
    assert asked == []
    assert [(e.outcome, e.category) for e in sampled] == [("deny", "forbidden")]
    assert "stateless sessions" in sampled[0].detail


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")
async def test_a_resource_update_reaches_the_agent_that_subscribed(
    relay_broker: RunningBroker, live_idp: LocalIdP
) -> None:
    updated = anyio.Event()
    seen: list[str] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            seen.append(str(message.params.uri))
            updated.set()

    async with agent(
        relay_broker.url, live_idp.token(), message_handler=on_message
    ) as client:
        await client.subscribe_resource("relay://counter")
        await client.call_tool("relay.bump", {})
        with anyio.fail_after(10):
            await updated.wait()
        await client.unsubscribe_resource("relay://counter")
    assert seen == ["relay://counter"]
    followed = [
        (e.method, e.outcome)
        for e in relay_broker.audit()
        if e.method.startswith("resources/")
    ]
    assert ("resources/subscribe", "allow") in followed
    assert ("resources/unsubscribe", "allow") in followed
