"""The broker's one tree of errors.

Every failure inside the broker, and every error of a library at its border
(PyJWT, cedarpy, sqlite3, redis, the mcp client), becomes one of these::

    BrokerError
    ├── ConfigError           bad configuration, manifest or policy: refuse to start
    │   └── PolicyError       a policy or schema that does not parse or validate
    └── Denied                a call that must not go ahead: always a denial
        ├── Unauthenticated   no token, or one that fails verification (401)
        ├── InsufficientScope a valid token without a required scope (403)
        ├── Forbidden         Cedar did not allow it, or could not decide
        ├── NotFound          no such server, tool, resource or prompt
        ├── Quarantined       the tool drifted from its pinned definition
        ├── MethodRefused     an MCP method outside the mediation table
        ├── DownstreamFailed  the downstream server is down, hung or broken
        ├── RecordFailed      the audit entry could not be written
        ├── PendingApproval   held for a human approver; retry once approved
        ├── Rejected          a human approver rejected the call
        ├── NotPending        a decision on an action already decided or expired
        ├── BadRequest        an approver's request that is malformed
        ├── StoreFailed       the approvals store could not be read or written
        ├── RateLimited       a call-rate limit is used up; retry later
        └── LimitUnavailable  a call-rate limit could not be checked

An agent learns only ``category``, a decision id and what ``told`` holds
(where to get an approval, an approver's reason). ``detail`` is for the
audit record and the operator's log, never for the agent.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""


class ConfigError(BrokerError):
    """Configuration, manifests or policies are unusable; the broker must not start."""


class PolicyError(ConfigError):
    """A Cedar policy or schema failed to parse or validate."""


class Denied(BrokerError):
    """A request that is refused. ``detail`` never reaches the agent."""

    category = "forbidden"
    told: Mapping[str, str] = MappingProxyType({})

    def __init__(self, detail: str = "", *, decision_id: str | None = None) -> None:
        super().__init__(detail or self.category)
        self.detail = detail or self.category
        self.decision_id = decision_id


class Unauthenticated(Denied):
    category = "unauthenticated"


class InsufficientScope(Denied):
    category = "insufficient_scope"

    def __init__(self, scope: str, *, decision_id: str | None = None) -> None:
        super().__init__(f"token lacks scope {scope!r}", decision_id=decision_id)
        self.scope = scope


class Forbidden(Denied):
    category = "forbidden"


class NotFound(Denied):
    category = "not_found"


class Quarantined(Denied):
    category = "quarantined"


class MethodRefused(Denied):
    category = "method_refused"


class DownstreamFailed(Denied):
    category = "downstream_unavailable"


class DownstreamRefused(DownstreamFailed):
    """The server answered a forwarded request with an error of its own.

    The agent gets that error as the server sent it, as it would directly.
    """

    category = "downstream_error"

    def __init__(self, detail: str, *, code: int, message: str, data: Any) -> None:
        super().__init__(detail)
        self.code, self.message, self.data = code, message, data


class RecordFailed(Denied):
    category = "record_unavailable"


class PendingApproval(Denied):
    category = "pending_approval"

    def __init__(self, detail: str, *, action_id: str, url: str) -> None:
        super().__init__(detail)
        self.told = {
            "action_id": action_id,
            "approval_url": url,
            "next": "once a human approves it there, retry the same call",
        }


class Rejected(Denied):
    category = "rejected"

    def __init__(self, detail: str, *, action_id: str, reason: str) -> None:
        super().__init__(detail)
        self.told = {"action_id": action_id, "reason": reason}


class NotPending(Denied):
    category = "not_pending"


class BadRequest(Denied):
    category = "invalid_request"


class StoreFailed(Denied):
    category = "store_unavailable"


class RateLimited(Denied):
    category = "rate_limited"


class LimitUnavailable(Denied):
    category = "limit_unavailable"
