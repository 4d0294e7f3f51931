"""The broker's one tree of errors.

Every failure inside the broker, and every error of a library at its border
(PyJWT, cedarpy, sqlite3, the mcp client), becomes one of these::

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
        └── RecordFailed      the audit entry could not be written

An agent learns only ``category`` and a decision id. ``detail`` is for the
audit record and the operator's log, never for the agent.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""


class ConfigError(BrokerError):
    """Configuration, manifests or policies are unusable; the broker must not start."""


class PolicyError(ConfigError):
    """A Cedar policy or schema failed to parse or validate."""


class Denied(BrokerError):
    """A request that is refused. ``detail`` never reaches the agent."""

    category = "forbidden"

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


class RecordFailed(Denied):
    category = "record_unavailable"
