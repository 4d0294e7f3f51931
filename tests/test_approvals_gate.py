"""Approvals as a policy outcome, with the shipped policies, SQLite and a clock.

Each test plays the agent's call the way mediation does (decide, and on a
denial ask the approvals gate) and the approver's side through ``decide``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker.approvals.gate import Approvals, Ask
from broker.approvals.model import NOT_APPROVED, Approval, Binding, Status
from broker.approvals.store import SqliteApprovalStore
from broker.audit import AuditEntry, SqliteStore
from broker.classify import inspect
from broker.config import ApprovalsConfig
from broker.errors import (
    BadRequest,
    Forbidden,
    NotPending,
    PendingApproval,
    Rejected,
)
from broker.manifest import load_manifests
from broker.policy import Decision, PolicyEngine
from broker.principal import Principal
from tests.harness import free_port
from tests.idp import Clock, serving

REPO = Path(__file__).resolve().parents[1]
TOOLS = {
    t.qualified_name: t
    for t in load_manifests(REPO / "tool_manifests")["demo"].tools.values()
}
ENGINE = PolicyEngine.load(REPO / "cedar_policies", list(TOOLS.values()))
WRITE = frozenset({"tools:call", "tools:write"})


def person(subject: str, *groups: str) -> Principal:
    return Principal(
        subject=subject,
        issuer="https://idp.example",
        client_id="agent-7",
        scopes=WRITE,
        groups=frozenset(groups),
    )


WANDA = person("wanda", "writers")
WALT = person("walt", "writers")
CAROL = person("carol", "approvers")
DAVE = person("dave")
ALICE = person("alice", "writers", "approvers")
DELETE = "demo.delete_note"


@dataclass
class World:
    approvals: Approvals
    audit: SqliteStore
    clock: Clock
    progress: list[tuple[float, float | None, str | None]] = field(default_factory=list)

    async def report(self, done: float, total: float | None, text: str | None) -> None:
        self.progress.append((done, total, text))

    async def call(
        self, principal: Principal, tool: str, arguments: dict[str, Any]
    ) -> tuple[str, Decision]:
        """One agent call as mediation makes it: its decision id and decision."""
        findings = inspect(arguments)

        def decide_as(approval: Approval) -> Decision:
            return ENGINE.decide_tool_call(
                principal,
                TOOLS[tool],
                arguments,
                data=findings.classes,
                approval_granted=approval.granted,
                approvers=approval.approvers,
                now=self.clock(),
            )

        decision_id = uuid.uuid4().hex
        decision = decide_as(NOT_APPROVED)
        if not decision.allowed:
            ask = Ask(
                decision_id=decision_id,
                principal=principal,
                server="demo",
                binding=Binding.of(principal, tool, arguments),
                redacted=findings.redacted,
            )
            decision = await self.approvals.settle(
                ask, decision, decide_as, self.report
            )
        return decision_id, decision

    async def pending_call(
        self, principal: Principal, tool: str, arguments: dict[str, Any]
    ) -> PendingApproval:
        with pytest.raises(PendingApproval) as raised:
            await self.call(principal, tool, arguments)
        return raised.value

    def entries(self, decision_id: str) -> list[AuditEntry]:
        return [
            e for e in self.audit.entries(limit=10_000) if e.decision_id == decision_id
        ]


def make_world(tmp_path: Path, *, wait: float, webhook_url: str = "") -> World:
    clock = Clock()
    audit = SqliteStore(tmp_path / "state.db")
    config = ApprovalsConfig(
        wait_seconds=wait,
        expiry_seconds=60,
        public_url="https://broker.example",
        webhook_url=webhook_url,
    )
    store = SqliteApprovalStore(tmp_path / "state.db")
    approvals = Approvals(config, store, audit, lambda: ENGINE, clock=clock)
    return World(approvals, audit, clock)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """A world where a call waits a tenth of a second for an approver."""
    made = make_world(tmp_path, wait=0.1)
    yield made
    made.approvals.store.close()
    made.audit.close()


@pytest.fixture
def patient(tmp_path: Path) -> Iterator[World]:
    """A world where a call waits up to ten seconds for an approver."""
    made = make_world(tmp_path, wait=10)
    yield made
    made.approvals.store.close()
    made.audit.close()


async def approve_soon(
    world: World, verdict: str = "approve", reason: str = ""
) -> None:
    """Act as the approver on the first action that shows up for carol."""
    await eventually(lambda: bool(world.approvals.pending_for(CAROL)))
    waiting = world.approvals.pending_for(CAROL)
    world.approvals.decide(CAROL, waiting[0].id, verdict, reason)  # type: ignore[arg-type]


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Return once ``check()`` holds; fail the test if it does not in time."""
    for _ in range(int(within / 0.02)):
        if check():
            return
        await anyio.sleep(0.02)
    pytest.fail("condition not met in time")


# ---- which calls need approval ------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "arguments", "policy"),
    [
        ("demo.transfer", {"amount": 100001, "to": "bob"}, "transfer-limit"),
        (DELETE, {"title": "plans"}, "destructive-needs-approval"),
        (
            "demo.search_web",
            {"query": "carol@example.com"},
            "personal-data-to-open-world-needs-approval",
        ),
    ],
)
async def test_example_policies_hold_calls_for_approval(
    world: World, tool: str, arguments: dict[str, Any], policy: str
) -> None:
    """A payment over the limit, a destructive tool and an email to the web wait."""
    pending = await world.pending_call(WANDA, tool, arguments)
    action = world.approvals.store.get(pending.told["action_id"])
    assert action.policies == (policy,)
    assert action.status is Status.PENDING


async def test_reading_needs_no_approval(world: World) -> None:
    """A read tool is simply allowed, and no action is created."""
    _, decision = await world.call(WANDA, "demo.echo", {"text": "hi"})
    assert decision.allowed
    assert world.approvals.store.listed(Status.PENDING) == []


@pytest.mark.parametrize(
    ("principal", "tool", "arguments"),
    [
        (DAVE, DELETE, {"title": "plans"}),  # no permit, approval or not
        (WANDA, "demo.transfer", {"amount": 1000001, "to": "bob"}),  # hard limit
    ],
)
async def test_a_denial_approval_cannot_lift_stands(
    world: World, principal: Principal, tool: str, arguments: dict[str, Any]
) -> None:
    """A call that approval would not allow is denied at once, with no action."""
    _, decision = await world.call(principal, tool, arguments)
    assert not decision.allowed
    assert world.approvals.store.listed(Status.PENDING) == []


# ---- the agent's side -----------------------------------------------------------


async def test_a_waiting_call_goes_ahead_once_approved(patient: World) -> None:
    """Approved while it waits, the call is allowed with the approver in context."""
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(approve_soon, patient)
        decision_id, decision = await patient.call(WANDA, DELETE, {"title": "plans"})
    assert decision.allowed
    methods = [e.method for e in patient.entries(decision_id)]
    assert methods == ["approval/create", "approval/approve", "approval/use"]
    assert patient.progress[0][2] is not None
    assert "https://broker.example/approvals/actions/" in patient.progress[0][2]


async def test_a_rejection_reaches_the_agent_with_its_reason(patient: World) -> None:
    """Rejected while it waits, the call fails with the approver's reason."""
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(approve_soon, patient, "reject", "not this week")
        with pytest.raises(Rejected) as raised:
            await patient.call(WANDA, DELETE, {"title": "plans"})
    assert raised.value.told["reason"] == "not this week"


async def test_after_the_wait_a_retry_goes_through_once(world: World) -> None:
    """Pending after the wait; approved later, one retry passes, the next waits."""
    pending = await world.pending_call(WANDA, DELETE, {"title": "plans"})
    action_id = pending.told["action_id"]
    assert pending.told["approval_url"].endswith(f"/approvals/actions/{action_id}")
    world.approvals.decide(CAROL, action_id, "approve", "")
    _, retried = await world.call(WANDA, DELETE, {"title": "plans"})
    again = await world.pending_call(WANDA, DELETE, {"title": "plans"})
    assert retried.allowed
    assert again.told["action_id"] != action_id
    assert world.approvals.store.get(action_id).status is Status.USED


async def test_a_changed_argument_is_a_different_action(world: World) -> None:
    """An approval for one title does not let another title through."""
    pending = await world.pending_call(WANDA, DELETE, {"title": "plans"})
    world.approvals.decide(CAROL, pending.told["action_id"], "approve", "")
    changed = await world.pending_call(WANDA, DELETE, {"title": "payroll"})
    _, original = await world.call(WANDA, DELETE, {"title": "plans"})
    assert changed.told["action_id"] != pending.told["action_id"]
    assert original.allowed


async def test_another_principal_cannot_use_the_approval(world: World) -> None:
    """Walt's identical call is not covered by the approval of Wanda's."""
    pending = await world.pending_call(WANDA, DELETE, {"title": "plans"})
    world.approvals.decide(CAROL, pending.told["action_id"], "approve", "")
    await world.pending_call(WALT, DELETE, {"title": "plans"})
    assert world.approvals.store.get(pending.told["action_id"]).status is (
        Status.APPROVED
    )


async def test_an_expired_approval_is_refused(world: World) -> None:
    """Past the action's expiry, the approval is gone and recorded as expired."""
    pending = await world.pending_call(WANDA, DELETE, {"title": "plans"})
    action_id = pending.told["action_id"]
    world.approvals.decide(CAROL, action_id, "approve", "")
    world.clock.advance(61)
    world.approvals.expire_due()
    await world.pending_call(WANDA, DELETE, {"title": "plans"})
    expired = world.approvals.store.get(action_id)
    methods = [e.method for e in world.entries(expired.decision_id)]
    assert expired.status is Status.EXPIRED
    assert methods.count("approval/expire") == 1


# ---- the approver's side ----------------------------------------------------------


async def test_requesters_may_not_approve_their_own_action(world: World) -> None:
    """Alice, an approver, is refused on her own request, and that is recorded."""
    pending = await world.pending_call(ALICE, DELETE, {"title": "plans"})
    action = world.approvals.store.get(pending.told["action_id"])
    with pytest.raises(Forbidden):
        world.approvals.decide(ALICE, action.id, "approve", "")
    refused = world.entries(action.decision_id)[-1]
    assert (refused.method, refused.outcome, refused.subject) == (
        "approval/approve",
        "deny",
        "alice",
    )
    assert "no-deciding-own-request" in refused.reasons
    assert world.approvals.store.get(action.id).status is Status.PENDING
    assert world.approvals.pending_for(ALICE) == []


async def test_only_approvers_may_decide(world: World) -> None:
    """Someone outside the approvers group sees nothing and may decide nothing."""
    pending = await world.pending_call(WANDA, DELETE, {"title": "plans"})
    with pytest.raises(Forbidden):
        world.approvals.decide(DAVE, pending.told["action_id"], "approve", "")
    assert world.approvals.pending_for(DAVE) == []
    assert [a.id for a in world.approvals.pending_for(CAROL)] == [
        pending.told["action_id"]
    ]


async def test_a_rejection_needs_a_reason(world: World) -> None:
    """Rejecting without a reason is refused; the action stays pending."""
    pending = await world.pending_call(WANDA, DELETE, {"title": "plans"})
    with pytest.raises(BadRequest):
        world.approvals.decide(CAROL, pending.told["action_id"], "reject", "  ")
    assert world.approvals.store.get(pending.told["action_id"]).status is (
        Status.PENDING
    )


async def test_a_decided_action_is_not_decided_again(world: World) -> None:
    """A second approver's decision on a decided action raises NotPending."""
    pending = await world.pending_call(WANDA, DELETE, {"title": "plans"})
    world.approvals.decide(CAROL, pending.told["action_id"], "reject", "no")
    with pytest.raises(NotPending):
        world.approvals.decide(CAROL, pending.told["action_id"], "approve", "")


# ---- the webhook ---------------------------------------------------------------------


@dataclass
class Receiver:
    status: int = 200
    bodies: list[dict[str, Any]] = field(default_factory=list)

    async def receive(self, request: Request) -> Response:
        self.bodies.append(await request.json())
        return JSONResponse({}, status_code=self.status)


async def test_the_webhook_hears_of_each_new_action(tmp_path: Path) -> None:
    """A new pending action is POSTed as JSON with a link to the page."""
    receiver = Receiver()
    with serving(
        Starlette(routes=[Route("/", receiver.receive, methods=["POST"])])
    ) as hook:
        world = make_world(tmp_path, wait=0.05, webhook_url=hook.url + "/")
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(world.approvals.run)
            pending = await world.pending_call(WANDA, DELETE, {"title": "plans"})
            await eventually(lambda: bool(receiver.bodies))
            tasks.cancel_scope.cancel()
    body = receiver.bodies[0]
    assert body["event"] == "approval.pending"
    assert body["action"]["id"] == pending.told["action_id"]
    assert body["action"]["url"] == pending.told["approval_url"]
    assert body["action"]["arguments"] == {"title": "plans"}


@pytest.mark.parametrize("failure", ["error status", "unreachable"])
async def test_a_failing_webhook_loses_and_approves_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    """Whether the webhook answers 500 or not at all, the action waits to be decided."""
    with contextlib.ExitStack() as stack:
        if failure == "error status":
            app = Starlette(
                routes=[Route("/", Receiver(500).receive, methods=["POST"])]
            )
            url = stack.enter_context(serving(app)).url + "/"
        else:
            url = f"http://127.0.0.1:{free_port()}/"
        world = make_world(tmp_path, wait=0.05, webhook_url=url)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(world.approvals.run)
            pending = await world.pending_call(WANDA, DELETE, {"title": "plans"})
            await eventually(lambda: "webhook" in caplog.text, within=10)
            tasks.cancel_scope.cancel()
    action_id = pending.told["action_id"]
    assert world.approvals.store.get(action_id).status is Status.PENDING
    world.approvals.decide(CAROL, action_id, "approve", "")
    _, retried = await world.call(WANDA, DELETE, {"title": "plans"})
    assert retried.allowed
