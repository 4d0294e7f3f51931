"""End to end: the SDK's client waits on a broker process while a person decides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import httpx2
import pytest

from tests.approvals_support import (
    DELETE,
    agent_token,
    api,
    approver_token,
    first_pending,
    shared_broker,
)
from tests.harness import RunningBroker, agent
from tests.idp import LocalIdP

WAIT_SECONDS = 3


@pytest.fixture(scope="module")
def broker(
    tmp_path_factory: pytest.TempPathFactory, session_idp: LocalIdP
) -> Iterator[RunningBroker]:
    """One broker for the module, whose calls wait three seconds for an approver."""
    workdir = tmp_path_factory.mktemp("approvals")
    with shared_broker(workdir, session_idp, wait=WAIT_SECONDS) as running:
        yield running


@pytest.fixture
def idp(broker: RunningBroker, session_idp: LocalIdP) -> LocalIdP:
    """The identity provider, issuing tokens for the module's broker."""
    return session_idp


def told(result: Any) -> dict[str, Any]:
    assert result.is_error, result
    broker_part: dict[str, Any] = result.structured_content["broker"]
    return broker_part


def deletions(broker: RunningBroker) -> list[str]:
    seen = broker.downstream_saw()
    return [r["arguments"]["title"] for r in seen if r.get("tool") == "delete_note"]


async def decide_when_listed(
    broker: RunningBroker, token: str, requester: str, verdict: str, reason: str = ""
) -> None:
    action_id = await first_pending(broker.origin, token, requester)
    path = f"/actions/{action_id}/{verdict}"
    answer = await api(broker.origin, token, "POST", path, {"reason": reason})
    assert answer.status_code == 200, answer.text


async def test_a_waiting_call_completes_when_approved(
    broker: RunningBroker, idp: LocalIdP
) -> None:
    """Approved through the API while it waits, the call reaches the server."""
    progress: list[str | None] = []

    async def on_progress(done: float, total: float | None, text: str | None) -> None:
        progress.append(text)

    carol = approver_token(idp)
    async with (
        agent(broker.url, agent_token(idp, "ann")) as client,
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(decide_when_listed, broker, carol, "ann", "approve")
        result = await client.call_tool(
            DELETE, {"title": "ann's plans"}, progress_callback=on_progress
        )
    assert result.is_error is False
    assert "ann's plans" in deletions(broker)
    assert any(text and "/approvals/actions/" in text for text in progress)
    call = next(
        e for e in broker.audit() if e.method == "tools/call" and e.subject == "ann"
    )
    linked = {e.method for e in broker.audit() if e.decision_id == call.decision_id}
    assert linked == {
        "approval/create",
        "approval/approve",
        "approval/use",
        "tools/call",
    }


async def test_a_rejection_reaches_the_waiting_agent(
    broker: RunningBroker, idp: LocalIdP
) -> None:
    """Rejected while it waits, the call fails with the approver's reason."""
    carol = approver_token(idp)
    async with (
        agent(broker.url, agent_token(idp, "ben")) as client,
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(
            decide_when_listed, broker, carol, "ben", "reject", "not before the audit"
        )
        result = await client.call_tool(DELETE, {"title": "ben's plans"})
    assert told(result)["category"] == "rejected"
    assert told(result)["reason"] == "not before the audit"
    assert "ben's plans" not in deletions(broker)


async def test_after_the_wait_a_retry_goes_through_once(
    broker: RunningBroker, idp: LocalIdP
) -> None:
    """Pending after the wait; once approved one retry passes, a second waits again."""
    carol = approver_token(idp)
    arguments = {"title": "cy's plans"}
    async with agent(broker.url, agent_token(idp, "cy")) as client:
        first = told(await client.call_tool(DELETE, arguments))
        action_id = first["action_id"]
        approved = await api(
            broker.origin, carol, "POST", f"/actions/{action_id}/approve"
        )
        retried = await client.call_tool(DELETE, arguments)
        again = told(await client.call_tool(DELETE, arguments))
    assert first["category"] == "pending_approval"
    assert first["approval_url"] == f"{broker.origin}/approvals/actions/{action_id}"
    assert approved.json()["status"] == "approved"
    assert retried.is_error is False
    assert again["category"] == "pending_approval"
    assert again["action_id"] != action_id
    assert deletions(broker).count("cy's plans") == 1


async def test_the_api_needs_an_approver_token(
    broker: RunningBroker, idp: LocalIdP
) -> None:
    """No token is 401; an agent's token, lacking approvals:decide, is 403."""
    async with httpx2.AsyncClient() as http:
        bare = await http.get(f"{broker.origin}/approvals/api/actions")
    agents = await api(broker.origin, agent_token(idp), "GET", "/actions")
    assert bare.status_code == 401
    assert agents.status_code == 403
    assert 'scope="approvals:decide"' in agents.headers["www-authenticate"]


async def test_requesters_cannot_approve_their_own_call(
    broker: RunningBroker, idp: LocalIdP
) -> None:
    """Alice, an approver, is refused on her own call; it stays pending."""
    alice = approver_token(idp, "alice", "approvers")
    async with agent(broker.url, agent_token(idp, "alice", "writers")) as client:
        first = told(await client.call_tool(DELETE, {"title": "plans"}))
    path = f"/actions/{first['action_id']}"
    own = await api(broker.origin, alice, "POST", f"{path}/approve")
    listed = await api(broker.origin, alice, "GET", "/actions")
    shown = await api(broker.origin, approver_token(idp), "GET", path)
    assert own.json() == {"error": "forbidden"}
    assert first["action_id"] not in {a["id"] for a in listed.json()["actions"]}
    assert shown.json()["status"] == "pending"


def test_the_openapi_document_describes_the_api(broker: RunningBroker) -> None:
    """The served OpenAPI 3.1 document names each operation of the API."""
    document = httpx2.get(f"{broker.origin}/approvals/openapi.json").json()
    operations = {
        (path, method) for path, item in document["paths"].items() for method in item
    }
    assert document["openapi"] == "3.1.0"
    assert document["servers"] == [{"url": f"{broker.origin}/approvals/api"}]
    assert operations == {
        ("/actions", "get"),
        ("/actions/{id}", "get"),
        ("/actions/{id}/approve", "post"),
        ("/actions/{id}/reject", "post"),
    }


def approvals_cli(broker: RunningBroker, token: str, *args: str) -> str:
    """``broker approvals ...`` as an approver runs it; its standard output."""
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "-c", "broker.toml", "approvals", *args],
        cwd=broker.workdir,
        env={**os.environ, "BROKER_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout


async def test_an_approver_decides_from_the_command_line(
    broker: RunningBroker, idp: LocalIdP
) -> None:
    """list shows the pending call, approve lets one retry through, show says used."""
    carol = approver_token(idp)
    arguments = {"title": "dee's plans"}
    async with agent(broker.url, agent_token(idp, "dee")) as client:
        first = told(await client.call_tool(DELETE, arguments))
        action_id = first["action_id"]
        listed = approvals_cli(broker, carol, "list")
        approvals_cli(broker, carol, "approve", action_id, "--reason", "fine")
        retried = await client.call_tool(DELETE, arguments)
    shown = json.loads(approvals_cli(broker, carol, "show", action_id))
    assert action_id in listed
    assert DELETE in listed
    assert retried.is_error is False
    assert (shown["status"], shown["approver"], shown["reason"]) == (
        "used",
        "carol",
        "fine",
    )
