"""Complete mediation: every MCP method an agent sends passes through here.

``METHODS`` is the one table of what the broker accepts and what each method
touches. A method outside it is refused before the SDK looks at it, so a new
method in a later protocol version is closed until someone decides what it
touches. Methods left out on purpose:

- ``resources/subscribe``, ``resources/unsubscribe``, ``subscriptions/listen``:
  change notifications would have to be filtered per caller and per server;
  until they are, agents re-list instead.
- ``logging/setLevel``: it would change a downstream server's behaviour for
  every caller sharing the broker's session with it.
- ``completion/complete``: argument completion leaks resource and prompt
  names that the lists filter out.
- ``tasks/*`` and anything experimental: not decided yet.
"""

from __future__ import annotations

import enum
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import mcp.types as types
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.shared.exceptions import MCPError

from broker.audit import AuditEntry, Store
from broker.catalog import Catalog, Drift
from broker.classify import inspect
from broker.downstream import Downstream
from broker.errors import (
    Denied,
    DownstreamFailed,
    Forbidden,
    MethodRefused,
    NotFound,
    RecordFailed,
    Unauthenticated,
)
from broker.manifest import SEPARATOR
from broker.policy import Decision, PolicyEngine
from broker.principal import Principal

log = logging.getLogger("broker.mediation")

# JSON-RPC error code for a request the broker refused (implementation-defined range).
DENIED_CODE = -32003
PRINCIPAL_KEY = "broker.principal"


class Touches(enum.Enum):
    NOTHING = "nothing"  # protocol housekeeping, answered by the broker itself
    TOOL_LIST = "tool list"
    TOOL = "tool"
    RESOURCE_LIST = "resource list"
    RESOURCE = "resource"
    PROMPT_LIST = "prompt list"
    PROMPT = "prompt"


METHODS: Mapping[str, Touches] = {
    "initialize": Touches.NOTHING,
    "notifications/initialized": Touches.NOTHING,
    "notifications/cancelled": Touches.NOTHING,
    "ping": Touches.NOTHING,
    "server/discover": Touches.NOTHING,
    "tools/list": Touches.TOOL_LIST,
    "tools/call": Touches.TOOL,
    "resources/list": Touches.RESOURCE_LIST,
    "resources/templates/list": Touches.RESOURCE_LIST,
    "resources/read": Touches.RESOURCE,
    "prompts/list": Touches.PROMPT_LIST,
    "prompts/get": Touches.PROMPT,
}


def new_decision_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Mediator:
    """The broker's state and the handlers that mediate each accepted method."""

    engine: PolicyEngine
    catalog: Catalog
    downstreams: Mapping[str, Downstream]
    store: Store
    clock: Callable[[], float] = time.time
    resource_owner: dict[str, str] = field(default_factory=dict)

    # ---- the gate every inbound message passes ----------------------------

    async def gate(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        """Server middleware: refuse methods outside ``METHODS`` before the SDK."""
        if ctx.method in METHODS:
            return await call_next(ctx)
        decision_id = new_decision_id()
        principal = principal_or_none(ctx)
        self.record_quietly(
            AuditEntry(
                decision_id=decision_id,
                time=self.clock(),
                method=ctx.method,
                outcome="deny",
                category=MethodRefused.category,
                subject=principal.subject if principal else None,
                issuer=principal.issuer if principal else None,
                client_id=principal.client_id if principal else None,
                server=None,
                tool=None,
                reasons=(),
                errors=(),
                arguments=None,
                data_classes=(),
                detail=f"method {ctx.method!r} is not mediated",
                duration_ms=None,
            )
        )
        if ctx.request_id is None:
            return None  # a notification has no answer to refuse
        raise denial_error(MethodRefused(decision_id=decision_id))

    # ---- tools --------------------------------------------------------------

    async def list_tools(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: types.PaginatedRequestParams | None,
    ) -> types.ListToolsResult:
        principal = require_principal(ctx)
        decision_id = new_decision_id()
        await self.refresh_all()
        usable = self.catalog.usable()
        visible = {
            t.qualified_name
            for t in self.engine.visible_tools(
                principal, [t.spec for t in usable], now=self.clock()
            )
        }
        tools = [t.definition for t in usable if t.spec.qualified_name in visible]
        self.record_list(principal, decision_id, "tools/list", len(tools), len(usable))
        return types.ListToolsResult(tools=tools)

    async def call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        principal = require_principal(ctx)
        decision_id = new_decision_id()
        started = time.perf_counter()
        arguments = dict(params.arguments or {})
        findings = inspect(arguments)
        entry = AuditEntry(
            decision_id=decision_id,
            time=self.clock(),
            method="tools/call",
            outcome="deny",
            category=Forbidden.category,
            subject=principal.subject,
            issuer=principal.issuer,
            client_id=principal.client_id,
            server=params.name.partition(SEPARATOR)[0] or None,
            tool=params.name,
            reasons=(),
            errors=(),
            arguments=findings.redacted,
            data_classes=tuple(sorted(findings.classes)),
            detail="",
            duration_ms=None,
        )
        try:
            live = self.catalog.resolve(params.name)
            decision = self.engine.decide_tool_call(
                principal, live.spec, arguments, data=findings.classes, now=self.clock()
            )
            entry = with_decision(entry, decision)
            if not decision.allowed:
                raise Forbidden("policy did not allow the call")
            self.store.record(
                _replace(entry, outcome="allow", category="allowed", detail="forwarded")
            )
            downstream = self.downstreams[live.spec.server]
            return await downstream.request(
                "tools/call", lambda c: c.call_tool(live.spec.name, arguments)
            )
        except Denied as denied:
            denied.decision_id = decision_id
            self.record_denial(entry, denied, started)
            return denied_tool_result(denied)

    # ---- resources ------------------------------------------------------------

    async def list_resources(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: types.PaginatedRequestParams | None,
    ) -> types.ListResourcesResult:
        principal = require_principal(ctx)
        decision_id = new_decision_id()
        resources: list[types.Resource] = []
        for name in self.visible_servers(principal, "resources"):
            try:
                result: types.ListResourcesResult = await self.downstreams[
                    name
                ].request("resources/list", lambda c: c.list_resources())
            except DownstreamFailed as exc:
                log.warning("resources/list skipped %s: %s", name, exc.detail)
                continue
            for resource in result.resources:
                self.resource_owner.setdefault(str(resource.uri), name)
                if self.resource_owner[str(resource.uri)] == name:
                    resources.append(resource)
        self.record_list(principal, decision_id, "resources/list", len(resources), None)
        return types.ListResourcesResult(resources=resources)

    async def list_resource_templates(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: types.PaginatedRequestParams | None,
    ) -> types.ListResourceTemplatesResult:
        # Templated URIs cannot be traced back to one server without listing
        # them, so the broker offers none rather than guess where a read goes.
        principal = require_principal(ctx)
        self.record_list(
            principal, new_decision_id(), "resources/templates/list", 0, None
        )
        return types.ListResourceTemplatesResult(resource_templates=[])

    async def read_resource(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: types.ReadResourceRequestParams,
    ) -> types.ReadResourceResult:
        principal = require_principal(ctx)
        decision_id = new_decision_id()
        started = time.perf_counter()
        uri = str(params.uri)
        server = self.resource_owner.get(uri)
        entry = AuditEntry(
            decision_id=decision_id,
            time=self.clock(),
            method="resources/read",
            outcome="deny",
            category=Forbidden.category,
            subject=principal.subject,
            issuer=principal.issuer,
            client_id=principal.client_id,
            server=server,
            tool=uri,
            reasons=(),
            errors=(),
            arguments=None,
            data_classes=(),
            detail="",
            duration_ms=None,
        )
        try:
            if server is None:
                raise NotFound(f"resource {uri!r} was not listed by any server")
            decision = self.engine.decide_resource_read(
                principal, server, uri, now=self.clock()
            )
            entry = with_decision(entry, decision)
            if not decision.allowed:
                raise Forbidden("policy did not allow the read")
            self.store.record(_replace(entry, outcome="allow", category="allowed"))
            return await self.downstreams[server].request(
                "resources/read", lambda c: c.read_resource(uri)
            )
        except Denied as denied:
            denied.decision_id = decision_id
            self.record_denial(entry, denied, started)
            raise denial_error(denied) from None

    # ---- prompts --------------------------------------------------------------

    async def list_prompts(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: types.PaginatedRequestParams | None,
    ) -> types.ListPromptsResult:
        principal = require_principal(ctx)
        prompts: list[types.Prompt] = []
        for name in self.visible_servers(principal, "prompts"):
            try:
                result: types.ListPromptsResult = await self.downstreams[name].request(
                    "prompts/list", lambda c: c.list_prompts()
                )
            except DownstreamFailed as exc:
                log.warning("prompts/list skipped %s: %s", name, exc.detail)
                continue
            prompts.extend(
                p.model_copy(update={"name": f"{name}{SEPARATOR}{p.name}"})
                for p in result.prompts
            )
        self.record_list(
            principal, new_decision_id(), "prompts/list", len(prompts), None
        )
        return types.ListPromptsResult(prompts=prompts)

    async def get_prompt(
        self, ctx: ServerRequestContext[Any, Any], params: types.GetPromptRequestParams
    ) -> types.GetPromptResult:
        principal = require_principal(ctx)
        decision_id = new_decision_id()
        started = time.perf_counter()
        server, _, prompt = params.name.partition(SEPARATOR)
        arguments = dict(params.arguments or {})
        findings = inspect(arguments)
        entry = AuditEntry(
            decision_id=decision_id,
            time=self.clock(),
            method="prompts/get",
            outcome="deny",
            category=Forbidden.category,
            subject=principal.subject,
            issuer=principal.issuer,
            client_id=principal.client_id,
            server=server or None,
            tool=params.name,
            reasons=(),
            errors=(),
            arguments=findings.redacted,
            data_classes=tuple(sorted(findings.classes)),
            detail="",
            duration_ms=None,
        )
        try:
            if not prompt or server not in self.downstreams:
                raise NotFound(f"no server for prompt {params.name!r}")
            decision = self.engine.decide_prompt_get(
                principal, server, prompt, data=findings.classes, now=self.clock()
            )
            entry = with_decision(entry, decision)
            if not decision.allowed:
                raise Forbidden("policy did not allow the prompt")
            self.store.record(_replace(entry, outcome="allow", category="allowed"))
            return await self.downstreams[server].request(
                "prompts/get", lambda c: c.get_prompt(prompt, arguments)
            )
        except Denied as denied:
            denied.decision_id = decision_id
            self.record_denial(entry, denied, started)
            raise denial_error(denied) from None

    # ---- requests a downstream server sends towards the agent ------------------

    async def server_request(self, server: str, kind: str, params: Any) -> Any:
        """Sampling or elicitation asked by a downstream server: decided, then refused.

        A downstream request cannot yet be tied to the agent call that caused
        it (stdio carries no such link, and one session serves every agent),
        so it is decided as an action of that server on no user's behalf and
        refused whatever the outcome; the decision is still recorded.
        """
        decision_id = new_decision_id()
        self.record_quietly(
            AuditEntry(
                decision_id=decision_id,
                time=self.clock(),
                method="sampling/createMessage"
                if kind == "sample"
                else "elicitation/create",
                outcome="deny",
                category=Forbidden.category,
                subject=None,
                issuer=None,
                client_id=None,
                server=server,
                tool=None,
                reasons=(),
                errors=(),
                arguments=None,
                data_classes=(),
                detail="a downstream request cannot be attributed to an agent call",
                duration_ms=None,
            )
        )
        return types.ErrorData(
            code=DENIED_CODE, message=f"denied by the broker (decision {decision_id})"
        )

    # ---- pins -------------------------------------------------------------------

    async def refresh(self, downstream: Downstream) -> None:
        """Check one server's offered tools against the pins and record any drift."""
        unverified = await downstream.list_tools()
        for drift in self.catalog.refresh(downstream.name, unverified):
            self.record_drift(drift)

    async def refresh_all(self) -> None:
        for downstream in self.downstreams.values():
            if not downstream.connected:
                continue
            try:
                await self.refresh(downstream)
            except DownstreamFailed as exc:
                log.warning("tools/list failed on %s: %s", downstream.name, exc.detail)

    def visible_servers(
        self, principal: Principal, what: Literal["resources", "prompts"]
    ) -> list[str]:
        names = [n for n, d in self.downstreams.items() if d.connected]
        return self.engine.visible_servers(principal, names, what, now=self.clock())

    # ---- the record ---------------------------------------------------------

    def record_denial(self, entry: AuditEntry, denied: Denied, started: float) -> None:
        self.record_quietly(
            _replace(
                entry,
                outcome="deny",
                category=denied.category,
                detail=denied.detail,
                duration_ms=(time.perf_counter() - started) * 1000,
            )
        )

    def record_list(
        self,
        principal: Principal,
        decision_id: str,
        method: str,
        shown: int,
        of: int | None,
    ) -> None:
        detail = f"{shown} shown" + (f" of {of} usable" if of is not None else "")
        self.store.record(
            AuditEntry(
                decision_id=decision_id,
                time=self.clock(),
                method=method,
                outcome="allow",
                category="allowed",
                subject=principal.subject,
                issuer=principal.issuer,
                client_id=principal.client_id,
                server=None,
                tool=None,
                reasons=(),
                errors=(),
                arguments=None,
                data_classes=(),
                detail=detail,
                duration_ms=None,
            )
        )

    def record_drift(self, drift: Drift) -> None:
        log.warning(
            "tool %s.%s quarantined: %s", drift.server, drift.tool, drift.reason
        )
        self.record_quietly(
            AuditEntry(
                decision_id=new_decision_id(),
                time=self.clock(),
                method="pin/check",
                outcome="deny",
                category="quarantined",
                subject=None,
                issuer=None,
                client_id=None,
                server=drift.server,
                tool=f"{drift.server}.{drift.tool}",
                reasons=(),
                errors=(),
                arguments=None,
                data_classes=(),
                detail=f"{drift.reason}; live pin {drift.live_pin}",
                duration_ms=None,
            )
        )

    def record_quietly(self, entry: AuditEntry) -> None:
        """Record a denial; if that fails, the denial stands and the log keeps it."""
        try:
            self.store.record(entry)
        except RecordFailed as exc:
            log.error(
                "audit record failed for denied %s (%s): %s",
                entry.method,
                entry.decision_id,
                exc.detail,
            )


def with_decision(entry: AuditEntry, decision: Decision) -> AuditEntry:
    return _replace(entry, reasons=decision.reasons, errors=decision.errors)


def _replace(entry: AuditEntry, **changes: Any) -> AuditEntry:
    import dataclasses

    return dataclasses.replace(entry, **changes)


def principal_or_none(ctx: ServerRequestContext[Any, Any]) -> Principal | None:
    request = ctx.request
    scope = getattr(request, "scope", None)
    if not isinstance(scope, dict):
        return None
    principal = scope.get(PRINCIPAL_KEY)
    return principal if isinstance(principal, Principal) else None


def require_principal(ctx: ServerRequestContext[Any, Any]) -> Principal:
    principal = principal_or_none(ctx)
    if principal is None:
        # Only reachable if the app is assembled without the bearer check.
        raise denial_error(Unauthenticated(decision_id=new_decision_id()))
    return principal


def denial_error(denied: Denied) -> MCPError:
    """The only thing an agent learns about a denial: its category and decision id."""
    message = f"denied by the broker: {denied.category} (decision {denied.decision_id})"
    return MCPError(
        code=DENIED_CODE,
        message=message,
        data={"category": denied.category, "decision_id": denied.decision_id},
    )


def denied_tool_result(denied: Denied) -> types.CallToolResult:
    text = (
        f"The broker denied this call: {denied.category}. "
        f"Decision id: {denied.decision_id}."
    )
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)],
        structured_content={
            "broker": {
                "decision": "deny",
                "category": denied.category,
                "decision_id": denied.decision_id,
            }
        },
        is_error=True,
    )
