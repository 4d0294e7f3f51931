"""Approvals as a policy outcome: the mediation hook and the approvers' side.

A tool call that Cedar denies as it stands, but would allow with
``context.approval.granted``, needs a human. ``settle`` first spends an
earlier approval of that exact call, if there is one; otherwise the call
becomes a pending action and waits, bounded, for an approver. If nobody
decides in time the agent hears "pending", with the action id and the page
to approve it on, and may retry the same call once it is approved.

``decide`` is the approvers' side: approving and rejecting are Cedar
actions decided on the approver's own identity. Every step (create, approve,
reject, expire, use) is an audit entry under the decision id of the call
that asked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal

import anyio

from broker.approvals.model import (
    Approval,
    Binding,
    PendingAction,
    Status,
    as_json,
    iso_time,
    new_action_id,
)
from broker.approvals.store import ApprovalStore
from broker.approvals.webhook import Webhook
from broker.audit import AuditEntry, Store, record_or_log
from broker.config import ApprovalsConfig
from broker.errors import (
    BadRequest,
    Denied,
    Forbidden,
    NotFound,
    PendingApproval,
    Rejected,
)
from broker.policy import Decision, PolicyEngine
from broker.principal import Principal

log = logging.getLogger("broker.approvals")

Verdict = Literal["approve", "reject"]
DecideAs = Callable[[Approval], Decision]
Progress = Callable[[float, float | None, str | None], Awaitable[None]]

# A waiting call reports progress this often (when the agent asked for it).
PROGRESS_SECONDS = 5.0
# Pending actions past their expiry are marked and recorded this often.
SWEEP_SECONDS = 5.0
MAX_REASON_CHARS = 1000
PAGE_PATH = "/approvals"


@dataclass(frozen=True, slots=True)
class Ask:
    """A tool call Cedar denied as it stands, as the approval hook sees it."""

    decision_id: str
    principal: Principal
    server: str
    binding: Binding
    redacted: object


class Approvals:
    """Pending actions: opened by calls, decided by approvers, spent by retries."""

    def __init__(
        self,
        config: ApprovalsConfig,
        store: ApprovalStore,
        audit: Store,
        policy: Callable[[], PolicyEngine],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.audit = audit
        self.policy = policy
        self.clock = clock
        self.webhook = (
            Webhook(config.webhook_url, self.describe) if config.webhook_url else None
        )

    # ---- the mediation hook -------------------------------------------------

    async def settle(
        self, ask: Ask, denial: Decision, decide_as: DecideAs, progress: Progress
    ) -> Decision:
        """The decision for a call denied as it stands; ``denial`` if approval
        would not change it. PendingApproval or Rejected if no approval comes."""
        with_approval = decide_as(Approval(granted=True))
        if not with_approval.allowed:
            return denial
        used = self._spend(ask)
        if used is None:
            action = self._open(ask, denial.reasons or with_approval.reasons)
            action = await self._wait(action, progress)
            used = self._conclude(ask, action)
        return decide_as(Approval(granted=True, approvers=(used.approver or "",)))

    def _spend(self, ask: Ask) -> PendingAction | None:
        def record(action: PendingAction) -> None:
            detail = f"action {action.id} used by call {ask.decision_id}"
            self.audit.record(
                self._entry(action, "approval/use", "allow", "approval_used", detail)
            )

        return self.store.consume(ask.binding, self.clock(), record)

    def _open(self, ask: Ask, policies: tuple[str, ...]) -> PendingAction:
        now = self.clock()
        action = PendingAction(
            id=new_action_id(),
            decision_id=ask.decision_id,
            binding=ask.binding,
            server=ask.server,
            arguments=ask.redacted,
            policies=policies,
            created=now,
            expires=now + self.config.expiry_seconds,
        )

        def record(kept: PendingAction) -> None:
            detail = f"action {kept.id} pending until {iso_time(kept.expires)}"
            entry = self._entry(
                kept, "approval/create", "deny", PendingApproval.category, detail
            )
            self.audit.record(entry)

        self.store.add(action, record)
        if self.webhook is not None:
            self.webhook.announce(action)
        return action

    async def _wait(self, action: PendingAction, progress: Progress) -> PendingAction:
        limit = min(self.config.wait_seconds, action.expires - self.clock())
        message = f"waiting for a human approver: {self.url_for(action.id)}"
        started = anyio.current_time()
        await progress(0.0, limit, message)
        while (left := limit - (anyio.current_time() - started)) > 0:
            action = await self.store.wait(action.id, min(PROGRESS_SECONDS, left))
            if action.status is not Status.PENDING:
                break
            await progress(anyio.current_time() - started, limit, message)
        return action

    def _conclude(self, ask: Ask, action: PendingAction) -> PendingAction:
        """The approval to go ahead with, or the reason there is none."""
        if action.status is Status.APPROVED:
            used = self._spend(ask)
            if used is not None:
                return used
            raise Forbidden(f"approval of action {action.id} was spent by another call")
        if action.status is Status.REJECTED:
            raise Rejected(
                f"action {action.id} rejected by {action.approver}",
                action_id=action.id,
                reason=action.reason,
            )
        if action.status is Status.PENDING:
            raise PendingApproval(
                f"action {action.id} still pending after the wait",
                action_id=action.id,
                url=self.url_for(action.id),
            )
        raise Forbidden(f"action {action.id} is {action.status.value}")

    # ---- the approvers' side --------------------------------------------------

    def decide(
        self, approver: Principal, action_id: str, verdict: Verdict, reason: str
    ) -> PendingAction:
        """Approve or reject ``action_id`` as ``approver``, if Cedar allows it."""
        reason = reason.strip()
        if len(reason) > MAX_REASON_CHARS:
            raise BadRequest(f"a reason is at most {MAX_REASON_CHARS} characters")
        if verdict == "reject" and not reason:
            raise BadRequest("a rejection needs a reason for the agent")
        self.expire_due()
        action = self.store.get(action_id)
        decision = self._may(approver, verdict, action)
        method = f"approval/{verdict}"
        if not decision.allowed:
            entry = self._entry(action, method, "deny", "forbidden", "", approver)
            self._keep(entry, decision)
            raise Forbidden(f"{approver.subject} may not {verdict} action {action.id}")

        def record(decided: PendingAction) -> None:
            detail = f"action {decided.id}: {reason}" if reason else decided.id
            category = decided.status.value
            entry = self._entry(decided, method, "allow", category, detail, approver)
            self.audit.record(_with(entry, decision))

        status = Status.APPROVED if verdict == "approve" else Status.REJECTED
        return self.store.decide(
            action_id,
            status,
            approver=approver.subject,
            reason=reason,
            now=self.clock(),
            record=record,
        )

    def pending_for(self, viewer: Principal) -> list[PendingAction]:
        """Pending actions ``viewer`` may approve or reject, oldest first."""
        self.expire_due()
        return [
            a for a in self.store.listed(Status.PENDING) if self.may_decide(viewer, a)
        ]

    def show(self, viewer: Principal, action_id: str) -> PendingAction:
        """One action in any state, if ``viewer`` may decide on it; else NotFound."""
        self.expire_due()
        action = self.store.get(action_id)
        if not self.may_decide(viewer, action):
            raise NotFound(f"{viewer.subject} may not see action {action_id}")
        return action

    def may_decide(self, viewer: Principal, action: PendingAction) -> bool:
        return any(
            self._may(viewer, verdict, action).allowed
            for verdict in ("approve", "reject")
        )

    def _may(
        self, approver: Principal, verdict: Verdict, action: PendingAction
    ) -> Decision:
        return self.policy().decide_approval(
            approver,
            verdict,
            action_id=action.id,
            requester=action.binding.subject,
            client=action.binding.client_id,
            tool=action.binding.tool,
            now=self.clock(),
        )

    # ---- time -------------------------------------------------------------------

    def expire_due(self) -> None:
        """Mark actions past their expiry and record each once."""
        for action in self.store.expire(self.clock()):
            detail = f"action {action.id} expired at {iso_time(action.expires)}"
            self._keep(
                self._entry(action, "approval/expire", "deny", "expired", detail)
            )

    async def run(self) -> None:
        """Background work until cancelled: the expiry sweep and the webhook."""
        async with anyio.create_task_group() as tasks:
            if self.webhook is not None:
                tasks.start_soon(self.webhook.run)
            while True:
                await anyio.sleep(SWEEP_SECONDS)
                try:
                    self.expire_due()
                except Denied as exc:
                    log.warning("approval expiry sweep failed: %s", exc.detail)

    # ---- shown and recorded -------------------------------------------------------

    def url_for(self, action_id: str) -> str:
        return f"{self.config.public_url}{PAGE_PATH}/actions/{action_id}"

    def describe(self, action: PendingAction) -> dict[str, object]:
        return as_json(action, self.url_for(action.id))

    def _entry(
        self,
        action: PendingAction,
        method: str,
        outcome: str,
        category: str,
        detail: str,
        who: Principal | None = None,
    ) -> AuditEntry:
        """An entry about ``action`` under the decision id of the call that asked.

        ``who`` is the approver, when an approver acted; else the requester.
        """
        binding = action.binding
        return AuditEntry(
            decision_id=action.decision_id,
            time=self.clock(),
            method=method,
            outcome=outcome,
            category=category,
            subject=who.subject if who else binding.subject,
            issuer=who.issuer if who else binding.issuer,
            client_id=who.client_id if who else binding.client_id,
            server=action.server,
            tool=binding.tool,
            reasons=() if who else action.policies,
            arguments=action.arguments,
            detail=detail,
        )

    def _keep(self, entry: AuditEntry, decision: Decision | None = None) -> None:
        """Record an entry whose outcome stands whether or not it is recorded."""
        record_or_log(self.audit, _with(entry, decision) if decision else entry)


def _with(entry: AuditEntry, decision: Decision) -> AuditEntry:
    return replace(entry, reasons=decision.reasons, errors=decision.errors)
