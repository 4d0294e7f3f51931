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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

import mcp.types as types
from mcp import Client
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.shared.exceptions import MCPError

from broker.approvals.gate import Approvals, Ask
from broker.approvals.model import NOT_APPROVED, Approval, Binding
from broker.audit import AuditEntry, Store, record_or_log
from broker.catalog import Catalog, Drift
from broker.classify import Findings, inspect
from broker.downstream import Downstream
from broker.errors import (
    Denied,
    DownstreamFailed,
    Forbidden,
    MethodRefused,
    NotFound,
    Quarantined,
    Unauthenticated,
)
from broker.limits import LocalLimiter, RateLimiter
from broker.manifest import SEPARATOR
from broker.observability import Metrics, current_decision
from broker.policy import Decision, PolicyEngine
from broker.principal import Principal

log = logging.getLogger("broker.mediation")

# JSON-RPC error code for a request the broker refused (implementation-defined range).
DENIED_CODE = -32003
PRINCIPAL_KEY = "broker.principal"
T = TypeVar("T")


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
    # Turns a call that only an approval would allow into a pending action;
    # without it such a call is simply denied.
    approvals: Approvals | None = None
    limiter: RateLimiter = field(default_factory=lambda: LocalLimiter(()))
    # Servers whose would-be denials are recorded but still forwarded.
    shadow: frozenset[str] = frozenset()
    metrics: Metrics = field(default_factory=Metrics)

    # ---- the gate every inbound message passes ----------------------------

    async def gate(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        """Server middleware: refuse methods outside ``METHODS`` before the SDK."""
        if ctx.method in METHODS:
            return await call_next(ctx)
        principal = principal_or_none(ctx)
        entry = self.new_entry(principal, ctx.method)
        refused = MethodRefused(
            f"method {ctx.method!r} is not mediated", decision_id=entry.decision_id
        )
        self.record_denial(entry, refused)
        if ctx.request_id is None:
            return None  # a notification has no answer to refuse
        raise denial_error(refused)

    # ---- tools --------------------------------------------------------------

    async def list_tools(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: types.PaginatedRequestParams | None,
    ) -> types.ListToolsResult:
        principal = require_principal(ctx)
        await self.refresh_all()
        usable = self.catalog.usable()
        specs = [t.spec for t in usable]
        visible = {
            t.qualified_name
            for t in self.engine.visible_tools(principal, specs, now=self.clock())
        }
        tools = [t.definition for t in usable if t.spec.qualified_name in visible]
        self.record_list(principal, "tools/list", f"{len(tools)} of {len(usable)}")
        return types.ListToolsResult(tools=tools)

    async def call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        principal = require_principal(ctx)
        arguments = dict(params.arguments or {})
        findings = inspect(arguments)
        server = params.name.partition(SEPARATOR)[0]
        entry = self.new_entry(principal, "tools/call", server, params.name, findings)

        async def decide() -> tuple[Decision, Downstream]:
            live = self.catalog.resolve(params.name)
            await self.limiter.check(principal, live.spec.qualified_name, self.clock())

            def decide_as(approval: Approval) -> Decision:
                with self.metrics.decide_seconds.time():
                    return self.engine.decide_tool_call(
                        principal,
                        live.spec,
                        arguments,
                        data=findings.classes,
                        approval_granted=approval.granted,
                        approvers=approval.approvers,
                        now=self.clock(),
                    )

            decision = decide_as(NOT_APPROVED)
            shadowed = live.spec.server in self.shadow
            if not decision.allowed and self.approvals is not None and not shadowed:
                ask = Ask(
                    decision_id=entry.decision_id,
                    principal=principal,
                    server=live.spec.server,
                    binding=Binding.of(principal, params.name, arguments),
                    redacted=findings.redacted,
                )
                progress = ctx.session.report_progress
                decision = await self.approvals.settle(
                    ask, decision, decide_as, progress
                )
            return decision, self.downstreams[live.spec.server]

        def forward(client: Client) -> Awaitable[types.CallToolResult]:
            return client.call_tool(params.name.partition(SEPARATOR)[2], arguments)

        try:
            return await self.mediate(entry, decide, "tools/call", forward)
        except Denied as denied:
            return denied_tool_result(denied)

    # ---- resources ------------------------------------------------------------

    async def list_resources(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: types.PaginatedRequestParams | None,
    ) -> types.ListResourcesResult:
        principal = require_principal(ctx)
        resources: list[types.Resource] = []
        for name in self.visible_servers(principal, "resources"):
            result = await self.list_from(name, "resources/list", _list_resources)
            for resource in result.resources if result else ():
                owner = self.resource_owner.setdefault(str(resource.uri), name)
                if owner == name:
                    resources.append(resource)
        self.record_list(principal, "resources/list", f"{len(resources)} shown")
        return types.ListResourcesResult(resources=resources)

    async def list_resource_templates(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: types.PaginatedRequestParams | None,
    ) -> types.ListResourceTemplatesResult:
        # Templated URIs cannot be traced back to one server without listing
        # them, so the broker offers none rather than guess where a read goes.
        principal = require_principal(ctx)
        self.record_list(principal, "resources/templates/list", "0 shown")
        return types.ListResourceTemplatesResult(resource_templates=[])

    async def read_resource(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: types.ReadResourceRequestParams,
    ) -> types.ReadResourceResult:
        principal = require_principal(ctx)
        uri = str(params.uri)
        server = self.resource_owner.get(uri)
        entry = self.new_entry(principal, "resources/read", server, uri)

        async def decide() -> tuple[Decision, Downstream]:
            if server is None:
                raise NotFound(f"resource {uri!r} was not listed by any server")
            decision = self.engine.decide_resource_read(
                principal, server, uri, now=self.clock()
            )
            return decision, self.downstreams[server]

        def forward(client: Client) -> Awaitable[types.ReadResourceResult]:
            return client.read_resource(uri)

        try:
            return await self.mediate(entry, decide, "resources/read", forward)
        except Denied as denied:
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
            result = await self.list_from(name, "prompts/list", _list_prompts)
            prompts.extend(
                p.model_copy(update={"name": f"{name}{SEPARATOR}{p.name}"})
                for p in (result.prompts if result else ())
            )
        self.record_list(principal, "prompts/list", f"{len(prompts)} shown")
        return types.ListPromptsResult(prompts=prompts)

    async def get_prompt(
        self, ctx: ServerRequestContext[Any, Any], params: types.GetPromptRequestParams
    ) -> types.GetPromptResult:
        principal = require_principal(ctx)
        server, _, prompt = params.name.partition(SEPARATOR)
        arguments = dict(params.arguments or {})
        findings = inspect(arguments)
        entry = self.new_entry(principal, "prompts/get", server, params.name, findings)

        async def decide() -> tuple[Decision, Downstream]:
            if not prompt or server not in self.downstreams:
                raise NotFound(f"no server for prompt {params.name!r}")
            decision = self.engine.decide_prompt_get(
                principal, server, prompt, data=findings.classes, now=self.clock()
            )
            return decision, self.downstreams[server]

        def forward(client: Client) -> Awaitable[types.GetPromptResult]:
            return client.get_prompt(prompt, arguments)

        try:
            return await self.mediate(entry, decide, "prompts/get", forward)
        except Denied as denied:
            raise denial_error(denied) from None

    # ---- the one path from a decision to a downstream server ------------------

    async def mediate(
        self,
        entry: AuditEntry,
        decide: Callable[[], Awaitable[tuple[Decision, Downstream]]],
        what: str,
        forward: Callable[[Client], Awaitable[T]],
    ) -> T:
        """Decide, record, and only then forward; every failure is a recorded denial.

        The allowing entry is written before the request leaves, so a call
        that reached a server is on record even if the broker dies mid-call.
        A failure after that is recorded again under the same decision id.
        """
        started = time.perf_counter()
        try:
            decision, downstream = await decide()
            entry = replace(entry, reasons=decision.reasons, errors=decision.errors)
            if decision.allowed:
                self.store.record(replace(entry, outcome="allow", category="allowed"))
            elif downstream.name in self.shadow:
                entry = replace(entry, shadow=True)
                self.store.record(replace(entry, detail="shadow mode: forwarded"))
            else:
                raise Forbidden("policy did not allow it")
            with self.metrics.forward_seconds.labels(downstream.name).time():
                return await downstream.request(what, forward)
        except Denied as denied:
            denied.decision_id = entry.decision_id
            self.record_denial(entry, denied, started)
            raise
        except Exception as exc:
            # A failure nobody foresaw is still a recorded denial, never a
            # bare protocol error with nothing on record.
            log.exception("unexpected failure while mediating %s", what)
            failed = Forbidden(
                f"broker failure: {type(exc).__name__}: {exc}",
                decision_id=entry.decision_id,
            )
            self.record_denial(entry, failed, started)
            raise failed from exc

    async def list_from(
        self,
        server: str,
        what: str,
        call: Callable[[Client], Awaitable[T]],
    ) -> T | None:
        """A list from one server, or None when it fails (the others still answer)."""
        try:
            return await self.downstreams[server].request(what, call)
        except DownstreamFailed as exc:
            log.warning("%s skipped %s: %s", what, server, exc.detail)
            return None

    # ---- requests a downstream server sends towards the agent ------------------

    async def server_request(self, server: str, kind: str, params: Any) -> Any:
        """Sampling or elicitation asked by a downstream server: recorded and refused.

        Such a request cannot yet be tied to the agent call that caused it
        (stdio carries no such link, and one session serves every agent), so
        there is no user to decide for and nobody to relay it to.
        """
        method = "sampling/createMessage" if kind == "sample" else "elicitation/create"
        entry = replace(self.new_entry(None, method), server=server)
        refused = Forbidden("a downstream request cannot be tied to an agent call")
        self.record_denial(entry, refused)
        return types.ErrorData(
            code=DENIED_CODE, message=f"denied by the broker: {refused.category}"
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

    def new_entry(
        self,
        principal: Principal | None,
        method: str,
        server: str | None = None,
        tool: str | None = None,
        findings: Findings | None = None,
    ) -> AuditEntry:
        """An entry for a decision about to be made; a denial until decided.

        Its decision id also tags every log line written while it is decided.
        """
        decision_id = new_decision_id()
        current_decision.set(decision_id)
        return AuditEntry(
            decision_id=decision_id,
            time=self.clock(),
            method=method,
            outcome="deny",
            category=Forbidden.category,
            subject=principal.subject if principal else None,
            issuer=principal.issuer if principal else None,
            client_id=principal.client_id if principal else None,
            groups=tuple(sorted(principal.groups)) if principal else (),
            scopes=tuple(sorted(principal.scopes)) if principal else (),
            server=server or None,
            tool=tool,
            arguments=findings.redacted if findings else None,
            data_classes=tuple(sorted(findings.classes)) if findings else (),
        )

    def record_denial(
        self, entry: AuditEntry, denied: Denied, started: float | None = None
    ) -> None:
        """Record ``entry`` as denied for the reason ``denied`` gives."""
        elapsed = None if started is None else (time.perf_counter() - started) * 1000
        self.keep_denial(
            replace(
                entry,
                outcome="deny",
                category=denied.category,
                detail=denied.detail,
                duration_ms=elapsed,
            )
        )

    def keep_denial(self, entry: AuditEntry) -> None:
        record_or_log(self.store, entry)

    def record_list(self, principal: Principal, method: str, detail: str) -> None:
        entry = self.new_entry(principal, method)
        self.store.record(
            replace(entry, outcome="allow", category="allowed", detail=detail)
        )

    def record_drift(self, drift: Drift) -> None:
        log.warning(
            "tool %s.%s quarantined: %s", drift.server, drift.tool, drift.reason
        )
        tool = f"{drift.server}{SEPARATOR}{drift.tool}"
        entry = self.new_entry(None, "pin/check", drift.server, tool)
        reason = f"{drift.reason}; live pin {drift.live_pin}"
        self.record_denial(entry, Quarantined(reason))


def _list_resources(client: Client) -> Awaitable[types.ListResourcesResult]:
    return client.list_resources()


def _list_prompts(client: Client) -> Awaitable[types.ListPromptsResult]:
    return client.list_prompts()


def principal_or_none(ctx: ServerRequestContext[Any, Any]) -> Principal | None:
    scope = getattr(ctx.request, "scope", None)
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
    text += "".join(f" {name}: {value}." for name, value in denied.told.items())
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)],
        structured_content={
            "broker": {
                "decision": "deny",
                "category": denied.category,
                "decision_id": denied.decision_id,
                **denied.told,
            }
        },
        is_error=True,
    )
