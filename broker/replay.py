"""Replaying tool calls against a policy directory: what would each one get?

Nothing is forwarded and no downstream server is contacted. A call is
decided as the broker decides it: a tool that no manifest pins is
``not_found``; the arguments are classified for ``context.data``; a call
denied as it stands but allowed once a human approves it ``needs_approval``.
Against a second policy directory, only the calls whose outcome differs
are reported. This is how a policy change is tried before it ships.

Calls come from a JSON lines file, one object a line::

    {"principal": {"sub": "alice", "groups": ["writers"], "scope": "tools:call"},
     "client": "agent-7", "server": "demo", "tool": "transfer",
     "arguments": {"amount": 250000, "to": "bob"},
     "approval": {"granted": false}, "time": "2026-12-03T14:05Z"}

``principal`` holds token claims, read as the broker reads a verified token;
``server`` may be left out when ``tool`` is qualified (``demo.transfer``);
``approval`` and ``time`` are optional. Or calls come from the record, with
the caveat that the record keeps arguments redacted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker.audit import AuditEntry
from broker.auth.tokens import principal_from_claims
from broker.classify import inspect
from broker.config import BrokerConfig
from broker.errors import ConfigError, Denied
from broker.manifest import SEPARATOR, ToolSpec
from broker.policy import Decision, PolicyEngine
from broker.principal import Principal
from broker.when import parse_instant

ALLOW = "allow"
DENY = "deny"
NEEDS_APPROVAL = "needs_approval"
NOT_FOUND = "not_found"

REPLAY_ISSUER = "urn:broker:replay"

REDACTED_NOTE = (
    "These calls come from the record, which keeps arguments redacted: a "
    "decision that depends on an argument's value may differ from the one "
    "made at the time."
)


@dataclass(frozen=True, slots=True)
class Call:
    """One call to decide. ``data`` None means: classify the arguments."""

    source: str
    principal: Principal
    tool: str
    arguments: Mapping[str, object]
    time: float
    data: frozenset[str] | None = None
    approval_granted: bool = False
    approvers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a call would get, and the policies that decided it."""

    outcome: str
    policies: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Replayed:
    call: Call
    before: Outcome
    after: Outcome | None = None

    @property
    def changed(self) -> bool:
        return self.after is not None and self.after.outcome != self.before.outcome


# ---- deciding -----------------------------------------------------------------------


def decide(engine: PolicyEngine, tools: Mapping[str, ToolSpec], call: Call) -> Outcome:
    """The outcome of ``call`` under ``engine``, for the pinned ``tools``."""
    tool = tools.get(call.tool)
    if tool is None:
        return Outcome(NOT_FOUND)
    data = call.data if call.data is not None else inspect(call.arguments).classes
    as_it_stands = _decided(engine, tool, call, data, call.approval_granted)
    if as_it_stands.allowed:
        return _outcome(ALLOW, as_it_stands)
    if not call.approval_granted and _decided(engine, tool, call, data, True).allowed:
        return _outcome(NEEDS_APPROVAL, as_it_stands)
    return _outcome(DENY, as_it_stands)


def replay(
    calls: Iterable[Call],
    tools: Mapping[str, ToolSpec],
    engine: PolicyEngine,
    against: PolicyEngine | None = None,
) -> list[Replayed]:
    """Every call decided by ``engine`` and, when given, by ``against`` too."""
    return [
        Replayed(
            call,
            decide(engine, tools, call),
            None if against is None else decide(against, tools, call),
        )
        for call in calls
    ]


def _decided(
    engine: PolicyEngine,
    tool: ToolSpec,
    call: Call,
    data: frozenset[str],
    granted: bool,
) -> Decision:
    return engine.decide_tool_call(
        call.principal,
        tool,
        call.arguments,
        data=data,
        approval_granted=granted,
        approvers=call.approvers,
        now=call.time,
    )


def _outcome(outcome: str, decision: Decision) -> Outcome:
    return Outcome(outcome, decision.reasons, decision.errors)


# ---- calls from a file --------------------------------------------------------------


def calls_from_lines(
    lines: Iterable[str], config: BrokerConfig, *, now: float, name: str = "calls"
) -> list[Call]:
    """Calls from JSON lines; a line that does not fit is a ConfigError naming it."""
    calls = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            calls.append(_call(json.loads(line), f"line {number}", config, now))
        except (ValueError, TypeError, Denied) as exc:
            raise ConfigError(f"{name} line {number}: {_reason(exc)}") from exc
    return calls


def _call(raw: Any, source: str, config: BrokerConfig, now: float) -> Call:
    if not isinstance(raw, dict):
        raise TypeError("a call must be a JSON object")
    arguments = raw.get("arguments", {})
    if not isinstance(arguments, dict):
        raise TypeError("arguments must be an object")
    granted, approvers = _approval(raw.get("approval", {}))
    return Call(
        source=source,
        principal=_principal(raw, config),
        tool=_tool_name(raw),
        arguments=arguments,
        time=_time(raw.get("time"), now),
        approval_granted=granted,
        approvers=approvers,
    )


def _principal(raw: Mapping[str, Any], config: BrokerConfig) -> Principal:
    claims = raw.get("principal")
    if not isinstance(claims, dict):
        raise TypeError("principal must be an object of token claims")
    full = {"iss": REPLAY_ISSUER, "exp": 0, **claims}
    client = raw.get("client")
    if isinstance(client, str):
        full[config.auth.client_claim] = client
    return principal_from_claims(full, config)


def _tool_name(raw: Mapping[str, Any]) -> str:
    tool, server = raw.get("tool"), raw.get("server")
    if not isinstance(tool, str) or not tool:
        raise TypeError("tool must be a string")
    if server is None:
        if SEPARATOR not in tool:
            raise ValueError("give server, or tool as <server>.<tool>")
        return tool
    if not isinstance(server, str):
        raise TypeError("server must be a string")
    return f"{server}{SEPARATOR}{tool}"


def _approval(raw: object) -> tuple[bool, tuple[str, ...]]:
    if not isinstance(raw, dict):
        raise TypeError('approval must be an object such as {"granted": true}')
    granted = raw.get("granted", False)
    approvers = raw.get("approvers", [])
    if not isinstance(granted, bool):
        raise TypeError("approval.granted must be true or false")
    if not isinstance(approvers, list) or not all(
        isinstance(a, str) for a in approvers
    ):
        raise TypeError("approval.approvers must be a list of subjects")
    return granted, tuple(approvers)


def _time(raw: object, now: float) -> float:
    if raw is None:
        return now
    if isinstance(raw, str):
        return parse_instant(raw)
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    raise TypeError("time must be an ISO 8601 string or seconds since the epoch")


def _reason(exc: Exception) -> str:
    if isinstance(exc, Denied):
        return exc.detail
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON ({exc.msg})"
    return str(exc)


# ---- calls from the record ----------------------------------------------------------


def calls_from_record(entries: Iterable[AuditEntry]) -> list[Call]:
    """The tool calls among recorded entries, as they were made.

    The record's own classification stands in for ``context.data``: the
    arguments it keeps are redacted and would no longer show what they held.
    """
    return [
        Call(
            source=f"decision {entry.decision_id}",
            principal=Principal(
                subject=entry.subject,
                issuer=entry.issuer or REPLAY_ISSUER,
                client_id=entry.client_id or "unknown",
                scopes=frozenset(entry.scopes),
                groups=frozenset(entry.groups),
            ),
            tool=entry.tool,
            arguments=entry.arguments if isinstance(entry.arguments, dict) else {},
            time=entry.time,
            data=frozenset(entry.data_classes),
        )
        for entry in entries
        if entry.method == "tools/call" and entry.subject and entry.tool
    ]


def without_claims(calls: Sequence[Call]) -> int:
    """How many recorded calls carry neither groups nor scopes."""
    return sum(1 for c in calls if not c.principal.groups and not c.principal.scopes)
