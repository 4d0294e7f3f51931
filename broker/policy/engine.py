"""Deciding with Cedar: one decision per call, read, get or server request.

Deny by default, fail closed: a decision is allowed only when Cedar says
Allow and reports no error at all. Cedar skips a policy that fails while it
is evaluated, so an erroring forbid would otherwise let the call through.
NoDecision, an exception from cedarpy and an argument that does not fit its
tool's schema are all denials; no decide method raises.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, ParamSpec

import cedarpy

from broker.manifest import ToolSpec
from broker.policy import loading
from broker.policy.schema import Record, cedar_string, cedar_value
from broker.policy.slices import Slices
from broker.principal import Principal

P = ParamSpec("P")

# Entity sets for this many (subject, groups) pairs are kept between calls.
USER_CACHE_SIZE = 256

_POLICY_ID = re.compile(r"policy `([^`]+)`")


@dataclass(frozen=True, slots=True)
class Decision:
    """Cedar's answer, reduced to what the broker acts on and records."""

    allowed: bool
    reasons: tuple[str, ...]
    errors: tuple[str, ...]
    # For a denial: could the same request with approval granted be allowed?
    # False only when Cedar was shown not to need asking again. A hint about
    # deciding, not part of the decision: equal decisions may differ in it.
    approvable: bool = field(default=True, compare=False)


def _fail_closed(decide: Callable[P, Decision]) -> Callable[P, Decision]:
    """Any exception while deciding becomes a denial that carries its text."""

    @functools.wraps(decide)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> Decision:
        try:
            return decide(*args, **kwargs)
        except Exception as exc:
            return Decision(False, (), (f"{type(exc).__name__}: {exc}",))

    return guarded


class PolicyEngine:
    """A parsed policy set, schema and tool entities, fixed once loaded.

    Only a small cache of per-user entity sets changes between calls.
    """

    __slots__ = ("_loaded", "_reads_time", "_slices", "_users", "_visible")

    def __init__(self, loaded: loading.Loaded) -> None:
        self._loaded = loaded
        tool_actions = (f"call:{name}" for name in loaded.tools)
        self._slices = Slices(loaded.policies, loaded.entities, tool_actions)
        self._users: dict[tuple[str, frozenset[str]], cedarpy.Entities] = {}
        # Which tools each caller may see, by everything a listing is decided
        # on. The time is part of that only when a policy could read it; a
        # mention of "now" anywhere, even in a string, counts.
        self._reads_time = "now" in repr(loaded.policies.to_pst().static_policies)
        self._visible: dict[tuple[object, ...], dict[str, bool]] = {}

    @classmethod
    def load(cls, policy_dir: Path, tools: Iterable[ToolSpec]) -> PolicyEngine:
        """Parse and validate ``policy_dir`` for ``tools``; PolicyError if unusable.

        Each tool's slice of the policies is cut here too, so that neither a
        first call nor a first listing pays for it.
        """
        engine = cls(loading.load(policy_dir, tools))
        for name in engine._loaded.tools:
            engine._slices.for_action(f"call:{name}")
        return engine

    def reload(self, policy_dir: Path, tools: Iterable[ToolSpec]) -> PolicyEngine:
        """A new engine, or PolicyError; the caller keeps this one on failure."""
        return type(self).load(policy_dir, tools)

    @property
    def policy_count(self) -> int:
        """How many policies the loaded set holds."""
        return len(self._loaded.policies)

    @_fail_closed
    def decide_tool_call(
        self,
        principal: Principal,
        tool: ToolSpec,
        arguments: Mapping[str, object],
        *,
        data: frozenset[str],
        approval_granted: bool = False,
        approvers: Iterable[str] = (),
        now: float,
    ) -> Decision:
        """May ``principal`` call ``tool`` with ``arguments``?"""
        context = {
            **_common(principal, now),
            "data": sorted(data),
            "approval": {"granted": approval_granted, "approvers": sorted(approvers)},
            "input": cedar_value(self._input_of(tool), arguments, "input"),
        }
        return self._decide(
            principal,
            _uid("User", principal.subject),
            _uid("Action", f"call:{tool.qualified_name}"),
            _uid("Tool", tool.qualified_name),
            context,
        )

    @_fail_closed
    def decide_resource_read(
        self, principal: Principal, server: str, uri: str, *, now: float
    ) -> Decision:
        """May ``principal`` read the resource ``uri`` of ``server``?"""
        return self._decide(
            principal,
            _uid("User", principal.subject),
            _uid("Action", "read_resource"),
            _uid("Server", server),
            {**_common(principal, now), "uri": uri},
        )

    @_fail_closed
    def decide_prompt_get(
        self,
        principal: Principal,
        server: str,
        prompt: str,
        *,
        data: frozenset[str],
        now: float,
    ) -> Decision:
        """May ``principal`` get ``prompt``, its arguments carrying ``data``?"""
        context = {**_common(principal, now), "prompt": prompt, "data": sorted(data)}
        return self._decide(
            principal,
            _uid("User", principal.subject),
            _uid("Action", "get_prompt"),
            _uid("Server", server),
            context,
        )

    @_fail_closed
    def decide_report_read(
        self, principal: Principal, report: str, *, now: float
    ) -> Decision:
        """May ``principal`` read the broker's report ``report``?"""
        return self._decide(
            principal,
            _uid("User", principal.subject),
            _uid("Action", "read_report"),
            _uid("Report", report),
            _common(principal, now),
        )

    @_fail_closed
    def decide_approval(
        self,
        approver: Principal,
        verdict: Literal["approve", "reject"],
        *,
        action_id: str,
        requester: str,
        client: str,
        tool: str,
        now: float,
    ) -> Decision:
        """May ``approver`` approve (or reject) the pending action ``action_id``?

        ``requester`` and ``client`` are the subject and agent that asked,
        ``tool`` the qualified name of the tool the action would call.
        """
        pending = {
            "uid": _uid("PendingAction", action_id),
            "attrs": {
                "requester": {"__entity": _uid("User", requester)},
                "client": client,
                "tool": {"__entity": _uid("Tool", tool)},
            },
            "parents": [],
        }
        return self._decide(
            approver,
            _uid("User", approver.subject),
            _uid("Action", verdict),
            _uid("PendingAction", action_id),
            _common(approver, now),
            extra_entities=json.dumps([pending]),
        )

    @_fail_closed
    def decide_server_request(
        self,
        server: str,
        principal: Principal,
        kind: Literal["sample", "elicit"],
        *,
        now: float,
    ) -> Decision:
        """May ``server`` send a ``kind`` request towards ``principal``'s agent?"""
        return self._decide(
            principal,
            _uid("Server", server),
            _uid("Action", kind),
            _uid("User", principal.subject),
            _common(principal, now),
        )

    def visible_tools(
        self, principal: Principal, tools: Sequence[ToolSpec], *, now: float
    ) -> list[ToolSpec]:
        """The tools ``principal`` could be allowed to call with some arguments."""
        # Data classes, approval and arguments are unknown when tools are
        # listed; what is known (scopes, client, time) still decides.
        try:
            context = _preview_context(principal, now, ("data", "approval", "input"))
        except (ValueError, OverflowError):
            return []
        known = self._visible_for(principal, now)
        shown: list[ToolSpec] = []
        for tool in tools:
            if not self._is_pinned(tool):
                continue
            visible = known.get(tool.qualified_name)
            if visible is None:
                visible = known[tool.qualified_name] = self._could_allow(
                    principal,
                    f"call:{tool.qualified_name}",
                    _uid_text("Tool", tool.qualified_name),
                    context,
                )
            if visible:
                shown.append(tool)
        return shown

    def _visible_for(self, principal: Principal, now: float) -> dict[str, bool]:
        key = (
            principal.subject,
            principal.groups,
            principal.scopes,
            principal.client_id,
            int(now) if self._reads_time else None,
        )
        known = self._visible.get(key)
        if known is None:
            if len(self._visible) >= USER_CACHE_SIZE:
                self._visible.clear()
            known = self._visible[key] = {}
        return known

    def visible_servers(
        self,
        principal: Principal,
        servers: Iterable[str],
        what: Literal["resources", "prompts"],
        *,
        now: float,
    ) -> list[str]:
        """Servers whose resources (or prompts) are listed to ``principal``.

        A server's list is shown when some uri (or some prompt and data) could
        be allowed; each read or get is still decided on its own.
        """
        action = "read_resource" if what == "resources" else "get_prompt"
        unknown = ["uri"] if what == "resources" else ["prompt", "data"]
        try:
            context = _preview_context(principal, now, unknown)
        except (ValueError, OverflowError):
            return []
        return [
            server
            for server in servers
            if self._could_allow(
                principal,
                action,
                _uid_text("Server", server),
                context,
            )
        ]

    def _input_of(self, tool: ToolSpec) -> Record:
        if not self._is_pinned(tool):
            raise ValueError(f"{tool.qualified_name} is not pinned in this policy set")
        return self._loaded.inputs[tool.qualified_name]

    def _is_pinned(self, tool: ToolSpec) -> bool:
        known = self._loaded.tools.get(tool.qualified_name)
        return known is not None and known.pin == tool.pin

    def _decide(
        self,
        principal: Principal,
        actor: dict[str, str],
        action: dict[str, str],
        resource: dict[str, str],
        context: dict[str, Any],
        extra_entities: str | None = None,
    ) -> Decision:
        """Decide in full, with the schema.

        ``actor`` is Cedar's principal: the user, or for sample and elicit the
        server. ``principal`` supplies the entities, the user and its groups;
        ``extra_entities`` (Cedar JSON) adds those of this request alone.
        """
        request = {
            "principal": actor,
            "action": action,
            "resource": resource,
            "context": context,
        }
        entities = self._entities(principal)
        if extra_entities is not None:
            entities = entities.with_added_json_str(extra_entities)
        result = cedarpy.is_authorized(
            request,
            self._slices.for_action(action["id"]),
            entities,
            self._loaded.schema,
        )
        labels = self._loaded.labels
        raw_reasons = result.diagnostics.reasons
        errors = tuple(self._relabel(error) for error in result.diagnostics.errors)
        reasons = tuple(labels.get(r, r) for r in raw_reasons)
        allowed = result.decision == cedarpy.Decision.Allow and not errors
        approvable = not allowed and (
            bool(errors) or self._slices.approval_may_change(action["id"], raw_reasons)
        )
        return Decision(allowed, reasons, errors, approvable)

    def _could_allow(
        self,
        principal: Principal,
        action: str,
        resource: str,
        context: dict[str, object],
    ) -> bool:
        # Partial evaluation is a preview for listing, never a decision. It
        # runs without the schema: Cedar's request validation refuses unknown
        # values in a typed context. The policies were validated at load, and
        # every call is decided in full, with the schema.
        try:
            request = {
                "principal": _uid_text("User", principal.subject),
                "action": _uid_text("Action", action),
                "resource": resource,
                "context": context,
            }
            result = cedarpy.is_authorized_partial(
                request, self._slices.for_action(action), self._entities(principal)
            )
        except Exception:
            return False
        denied = result.decision == cedarpy.Decision.Deny
        return not denied and not result.diagnostics.errors

    def _entities(self, principal: Principal) -> cedarpy.Entities:
        key = (principal.subject, principal.groups)
        entities = self._users.get(key)
        if entities is None:
            if len(self._users) >= USER_CACHE_SIZE:
                self._users.clear()
            entities = self._loaded.entities.with_added_json_str(_user_rows(principal))
            self._users[key] = entities
        return entities

    def _relabel(self, error: str) -> str:
        """Cedar's error text, naming a policy by its @id where it has one."""
        labels = self._loaded.labels
        return _POLICY_ID.sub(
            lambda match: f"policy `{labels.get(match[1], match[1])}`", error
        )


def _common(principal: Principal, now: float) -> dict[str, object]:
    return {
        "client": principal.client_id,
        "scopes": sorted(principal.scopes),
        "now": int(now),
    }


def _preview_context(
    principal: Principal, now: float, unknown: Iterable[str]
) -> dict[str, object]:
    """The context of a listing: what is known, and ``unknown`` left open.

    ValueError or OverflowError if ``now`` is not a finite number.
    """
    open_ = {name: {"__extn": {"fn": "unknown", "arg": name}} for name in unknown}
    return _common(principal, now) | open_


def _user_rows(principal: Principal) -> str:
    groups = [{"type": "Group", "id": group} for group in sorted(principal.groups)]
    user = {
        "uid": {"type": "User", "id": principal.subject},
        "attrs": {},
        "parents": groups,
    }
    return json.dumps([user])


def _uid(kind: str, name: str) -> dict[str, str]:
    return {"type": kind, "id": name}


def _uid_text(kind: str, name: str) -> str:
    # Partial evaluation takes entity ids only in Cedar's own syntax.
    return f"{kind}::{cedar_string(name)}"
