"""What a pending action is, and what binds an approval to one exact call."""

from __future__ import annotations

import datetime
import enum
import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.principal import Principal


class Status(enum.Enum):
    PENDING = "pending"  # waiting for an approver
    APPROVED = "approved"  # approved, not yet used
    REJECTED = "rejected"
    USED = "used"  # approved and spent on one call
    EXPIRED = "expired"  # ran out of time while pending or approved


@dataclass(frozen=True, slots=True)
class Binding:
    """What an approval is good for: this requester, agent, tool and arguments.

    A retry matches only if all five are equal, so a changed argument, another
    user, another agent or another issuer's user with the same subject is a
    different action.
    """

    subject: str
    issuer: str
    client_id: str
    tool: str
    digest: str

    @classmethod
    def of(cls, principal: Principal, tool: str, arguments: object) -> Binding:
        return cls(
            subject=principal.subject,
            issuer=principal.issuer,
            client_id=principal.client_id,
            tool=tool,
            digest=digest_of(arguments),
        )


@dataclass(frozen=True, slots=True)
class PendingAction:
    """A tool call held for a human, and what became of it.

    ``arguments`` are redacted (what an approver is shown); ``binding.digest``
    is taken over the raw arguments. ``policies`` name the policies that asked
    for approval. Times are seconds since the epoch.
    """

    id: str
    decision_id: str
    binding: Binding
    server: str
    arguments: object
    policies: tuple[str, ...]
    created: float
    expires: float
    status: Status = Status.PENDING
    approver: str | None = None
    reason: str = ""
    decided: float | None = None


@dataclass(frozen=True, slots=True)
class Approval:
    """The approval facts a tool call is decided with (``context.approval``)."""

    granted: bool
    approvers: tuple[str, ...] = ()


NOT_APPROVED = Approval(granted=False)


def digest_of(arguments: object) -> str:
    """SHA-256 of the canonical JSON of raw ``arguments``: keys sorted, no spaces."""
    canonical = json.dumps(
        arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def new_action_id() -> str:
    return uuid.uuid4().hex


def as_json(action: PendingAction, url: str) -> dict[str, object]:
    """``action`` as the API, the webhook and the CLI show it."""
    binding = action.binding
    return {
        "id": action.id,
        "status": action.status.value,
        "decision_id": action.decision_id,
        "requester": {
            "subject": binding.subject,
            "issuer": binding.issuer,
            "client": binding.client_id,
        },
        "server": action.server,
        "tool": binding.tool,
        "arguments": action.arguments,
        "digest": binding.digest,
        "policies": list(action.policies),
        "created": iso_time(action.created),
        "expires": iso_time(action.expires),
        "approver": action.approver,
        "reason": action.reason,
        "decided": None if action.decided is None else iso_time(action.decided),
        "url": url,
    }


def iso_time(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def action_from_fields(fields: Mapping[str, Any]) -> PendingAction:
    """A pending action back from the flat fields a store kept it in."""
    decided = fields.get("decided")
    return PendingAction(
        id=fields["id"],
        decision_id=fields["decision_id"],
        binding=Binding(
            subject=fields["subject"],
            issuer=fields["issuer"],
            client_id=fields["client_id"],
            tool=fields["tool"],
            digest=fields["digest"],
        ),
        server=fields["server"],
        arguments=json.loads(fields["arguments"]),
        policies=tuple(json.loads(fields["policies"])),
        created=float(fields["created"]),
        expires=float(fields["expires"]),
        status=Status(fields["status"]),
        approver=fields.get("approver"),
        reason=fields.get("reason") or "",
        decided=None if decided is None else float(decided),
    )
