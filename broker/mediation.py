"""Complete mediation: every MCP method an agent sends passes through here.

``METHODS`` is the one table of what the broker accepts and what each method
touches. A method outside it is refused before the SDK looks at it, so a new
method in a later protocol version is closed until someone decides what it
touches. Methods left out on purpose:

- ``subscriptions/listen``: the sessionless protocol's change stream would
  have to be filtered per caller and per server; agents re-list instead.
- ``tasks/*`` and anything experimental: not decided yet.

What a downstream server sends back while it works on a request (sampling,
elicitation, log messages, progress) is decided and relayed by
``broker.relay``, only ever to the agent whose request it is.
"""

from __future__ import annotations

import enum
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal, TypeVar

import anyio
import anyio.to_thread
import mcp.types as types
from mcp import Client
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.shared.exceptions import MCPError

from broker.approvals.gate import Approvals, Ask, Progress
from broker.approvals.model import NOT_APPROVED, Approval, Binding
from broker.audit import AuditEntry, Store, record_or_log
from broker.catalog import Catalog, Drift, LiveTool
from broker.classify import Findings, inspect
from broker.downstream import Downstream
from broker.errors import (
    Denied,
    DownstreamFailed,
    DownstreamRefused,
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
from broker.relay import (
    METHOD_OF,
    AgentRelay,
    AgentSessions,
    AgentSide,
    Kind,
    LogLevels,
    refuse_unaccepted,
    session_id,
)
from broker.resources import Subscriptions, Templates

log = logging.getLogger("broker.mediation")

# JSON-RPC error code for a request the broker refused (implementation-defined range).
DENIED_CODE = -32003
PRINCIPAL_KEY = "broker.principal"
# A name no listing accounts for makes the broker list the servers again at
# most this often.
RELEARN_SECONDS = 5.0
T = TypeVar("T")


class Touches(enum.Enum):
    NOTHING = "nothing"  # protocol housekeeping, answered by the broker itself
    SESSION = "session"  # the agent's own session with the broker, nothing else
    TOOL_LIST = "tool list"
    TOOL = "tool"
    RESOURCE_LIST = "resource list"
    RESOURCE = "resource"
    PROMPT_LIST = "prompt list"
    PROMPT = "prompt"
    # A prompt's argument is decided as getting that prompt, a template's as
    # reading from that template's server.
    COMPLETION = "prompt or resource template"


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
    "resources/subscribe": Touches.RESOURCE,
    "resources/unsubscribe": Touches.RESOURCE,
    "prompts/list": Touches.PROMPT_LIST,
    "prompts/get": Touches.PROMPT,
    "completion/complete": Touches.COMPLETION,
    "logging/setLevel": Touches.SESSION,
}


def new_decision_id() -> str:
    return uuid.uuid4().hex


Decide = Callable[[], Awaitable[tuple[Decision, Downstream]]]


async def _undecided() -> tuple[Decision, Downstream]:
    raise Forbidden("no decision was made")  # replaced before anyone calls it


@dataclass(eq=False)
class ToolCall:
    """One ``tools/call`` about to be decided.

    ``tool`` becomes the server's own name for the tool once ``decide`` has
    found it; only then may the call be forwarded.
    """

    entry: AuditEntry
    decide: Decide
    tool: str = ""


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
    prompt_owner: dict[str, str] = field(default_factory=dict)
    templates: Templates = field(default_factory=Templates)
    subscriptions: Subscriptions = field(default_factory=Subscriptions)
    levels: LogLevels = field(default_factory=LogLevels)
    relearned: dict[str, float] = field(default_factory=dict)
    sessions: AgentSessions = field(default_factory=AgentSessions)
    # Calls answered by the lean path, by agent session and request id, so
    # that the agent's notifications/cancelled reaches them.
    lean_calls: dict[tuple[str, str], anyio.CancelScope] = field(default_factory=dict)

    # ---- the gate every inbound message passes ----------------------------

    async def gate(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        """Server middleware: refuse methods outside ``METHODS`` before the SDK."""
        if ctx.method == "initialize":
            result = await call_next(ctx)
            self.sessions.note_opening(ctx, result)
            return result
        if ctx.method in METHODS:
            self.sessions.note(ctx)
            if ctx.method == "notifications/cancelled":
                self.cancel_lean_call(ctx)
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

    def cancel_lean_call(self, ctx: ServerRequestContext[Any, Any]) -> None:
        """An agent cancelling a request the lean path is answering."""
        params = ctx.params or {}
        request_id = params.get("requestId") if isinstance(params, Mapping) else None
        session = session_id(ctx)
        if session is None or request_id is None:
            return
        scope = self.lean_calls.get((session, str(request_id)))
        if scope is not None:
            scope.cancel()

    # ---- tools --------------------------------------------------------------

    async def list_tools(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: types.PaginatedRequestParams | None,
    ) -> types.ListToolsResult:
        principal = require_principal(ctx)
        shown, usable = await self.visible_tools(principal)
        self.record_list(principal, "tools/list", f"{len(shown)} of {usable}")
        return types.ListToolsResult(tools=[t.definition for t in shown])

    async def visible_tools(self, principal: Principal) -> tuple[list[LiveTool], int]:
        """The tools ``principal`` could be allowed to call, of how many usable."""
        # The catalog is kept current by the pin check of every new session
        # and by the servers' list-changed notices, not by listing again here.
        usable = self.catalog.usable()
        specs = [t.spec for t in usable]
        # A caller's first listing previews every tool with Cedar, which takes
        # a while for many tools; off the event loop, other requests go on.
        listed = await anyio.to_thread.run_sync(
            partial(self.engine.visible_tools, principal, specs, now=self.clock())
        )
        visible = {t.qualified_name for t in listed}
        return [t for t in usable if t.spec.qualified_name in visible], len(usable)

    async def call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        principal = require_principal(ctx)
        arguments = dict(params.arguments or {})
        call = self.tool_call(
            principal, params.name, arguments, ctx.session.report_progress
        )

        def forward(
            client: Client, relay: AgentRelay
        ) -> Awaitable[types.CallToolResult]:
            progress = relay.progress if relay.wants_progress else None
            return client.call_tool(call.tool, arguments, progress_callback=progress)

        try:
            return await self.mediate(ctx, principal, call.entry, call.decide, forward)
        except DownstreamRefused as refused:
            raise denial_error(refused) from None
        except Denied as denied:
            return denied_tool_result(denied)

    def tool_call(
        self,
        principal: Principal,
        name: str,
        arguments: dict[str, Any],
        progress: Progress,
    ) -> ToolCall:
        """The entry and the decision of one ``tools/call``, not yet made.

        ``progress`` tells the agent how long an approval has been waited
        for; it is called only while a call waits for one.
        """
        findings = inspect(arguments)
        try:
            named = self.catalog.qualified(name)
            server: str | None = named.partition(SEPARATOR)[0]
        except NotFound:
            named, server = name, None  # recorded as asked; decide() denies
        entry = self.new_entry(principal, "tools/call", server, named, findings)
        call = ToolCall(entry=entry, decide=_undecided)

        async def decide() -> tuple[Decision, Downstream]:
            live = self.catalog.resolve(name)
            call.tool = live.spec.name
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
            held = not decision.allowed and decision.approvable and not shadowed
            if held and self.approvals is not None:
                ask = Ask(
                    decision_id=entry.decision_id,
                    principal=principal,
                    server=live.spec.server,
                    binding=Binding.of(principal, name, arguments),
                    redacted=findings.redacted,
                )
                decision = await self.approvals.settle(
                    ask, decision, decide_as, progress
                )
            return decision, self.downstreams[live.spec.server]

        call.decide = decide
        return call

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
        principal = require_principal(ctx)
        templates: list[types.ResourceTemplate] = []
        for name in self.visible_servers(principal, "resources"):
            result = await self.list_from(
                name, "resources/templates/list", _list_templates
            )
            for template in result.resource_templates if result else ():
                if self.templates.add(template.uri_template, name):
                    templates.append(template)
        self.record_list(
            principal, "resources/templates/list", f"{len(templates)} shown"
        )
        return types.ListResourceTemplatesResult(resource_templates=templates)

    async def read_resource(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: types.ReadResourceRequestParams,
    ) -> types.ReadResourceResult:
        principal = require_principal(ctx)
        uri = str(params.uri)
        entry = self.new_entry(principal, "resources/read", None, uri)

        async def decide() -> tuple[Decision, Downstream]:
            return self.decide_resource(principal, await self.resource_server(uri), uri)

        def forward(
            client: Client, relay: AgentRelay
        ) -> Awaitable[types.ReadResourceResult]:
            return client.read_resource(uri)

        return await self.answer(ctx, principal, entry, decide, forward)

    async def subscribe_resource(
        self, ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams
    ) -> types.EmptyResult:
        """Updates to a resource reach the agents that subscribed and may read it."""
        return await self.follow(ctx, str(params.uri), subscribe=True)

    async def unsubscribe_resource(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: types.UnsubscribeRequestParams,
    ) -> types.EmptyResult:
        return await self.follow(ctx, str(params.uri), subscribe=False)

    async def follow(
        self, ctx: ServerRequestContext[Any, Any], uri: str, *, subscribe: bool
    ) -> types.EmptyResult:
        """Start or stop following ``uri``, decided as reading it.

        The server is asked to subscribe for the first follower and to
        unsubscribe when the last one leaves.
        """
        principal = require_principal(ctx)
        method = "resources/subscribe" if subscribe else "resources/unsubscribe"
        entry = self.new_entry(principal, method, None, uri)
        agent = session_id(ctx) or entry.decision_id

        async def decide() -> tuple[Decision, Downstream]:
            return self.decide_resource(principal, await self.resource_server(uri), uri)

        async def forward(client: Client, relay: AgentRelay) -> types.EmptyResult:
            if not subscribe:
                if self.subscriptions.remove(uri, agent):
                    return await client.unsubscribe_resource(uri)
                return types.EmptyResult()
            if not self.subscriptions.add(uri, agent, ctx.session):
                return types.EmptyResult()
            try:
                return await client.subscribe_resource(uri)
            except BaseException:
                self.subscriptions.remove(uri, agent)
                raise

        return await self.answer(ctx, principal, entry, decide, forward)

    def decide_resource(
        self, principal: Principal, server: str | None, uri: str
    ) -> tuple[Decision, Downstream]:
        if server is None:
            raise NotFound(f"resource {uri!r} was not listed by any server")
        decision = self.engine.decide_resource_read(
            principal, server, uri, now=self.clock()
        )
        return decision, self.downstreams[server]

    async def resource_server(self, uri: str) -> str | None:
        """The server a resource URI belongs to, listing again once if unknown."""
        owner = self.resource_owner.get(uri) or self.templates.owner(uri)
        if owner is None and self.may_relearn("resources"):
            await self.learn_resources()
            owner = self.resource_owner.get(uri) or self.templates.owner(uri)
        return owner

    async def template_server(self, template: str) -> str | None:
        """The server that listed ``template``, listing again once if unknown."""
        owner = self.templates.owner_of_template(template)
        if owner is None and self.may_relearn("resources"):
            await self.learn_resources()
            owner = self.templates.owner_of_template(template)
        return owner

    def may_relearn(self, what: str) -> bool:
        """Whether a name nobody listed may send the broker listing again.

        At most once per ``RELEARN_SECONDS``: otherwise any agent could make
        the broker list every server by asking for names that do not exist.
        """
        now = time.monotonic()
        if now - self.relearned.get(what, -math.inf) < RELEARN_SECONDS:
            return False
        self.relearned[what] = now
        return True

    async def learn_resources(self) -> None:
        """Which server offers which resources and templates, from every server."""
        for name, downstream in self.downstreams.items():
            if not downstream.connected:
                continue
            listed = await self.list_from(name, "resources/list", _list_resources)
            for resource in listed.resources if listed else ():
                self.resource_owner.setdefault(str(resource.uri), name)
            templates = await self.list_from(
                name, "resources/templates/list", _list_templates
            )
            for template in templates.resource_templates if templates else ():
                self.templates.add(template.uri_template, name)

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
            for prompt in result.prompts if result else ():
                shown = self.prompt_name(name, prompt.name)
                if self.prompt_owner.setdefault(shown, name) == name:
                    prompts.append(prompt.model_copy(update={"name": shown}))
        self.record_list(principal, "prompts/list", f"{len(prompts)} shown")
        return types.ListPromptsResult(prompts=prompts)

    async def get_prompt(
        self, ctx: ServerRequestContext[Any, Any], params: types.GetPromptRequestParams
    ) -> types.GetPromptResult:
        principal = require_principal(ctx)
        arguments = dict(params.arguments or {})
        findings = inspect(arguments)
        entry = self.new_entry(principal, "prompts/get", None, params.name, findings)
        resolved: list[str] = []  # the server's own name for the prompt

        async def decide() -> tuple[Decision, Downstream]:
            server, prompt = await self.prompt_target(params.name)
            resolved.append(prompt)
            return self.decide_prompt(principal, server, prompt, findings.classes)

        def forward(
            client: Client, relay: AgentRelay
        ) -> Awaitable[types.GetPromptResult]:
            return client.get_prompt(resolved[0], arguments)

        return await self.answer(ctx, principal, entry, decide, forward)

    def decide_prompt(
        self,
        principal: Principal,
        server: str | None,
        prompt: str,
        data: frozenset[str] = frozenset(),
    ) -> tuple[Decision, Downstream]:
        if server is None or server not in self.downstreams:
            raise NotFound(f"no server for prompt {prompt!r}")
        decision = self.engine.decide_prompt_get(
            principal, server, prompt, data=data, now=self.clock()
        )
        return decision, self.downstreams[server]

    def prompt_name(self, server: str, prompt: str) -> str:
        namespaced = self.downstreams[server].manifest.namespaced
        return f"{server}{SEPARATOR}{prompt}" if namespaced else prompt

    async def prompt_target(self, name: str) -> tuple[str | None, str]:
        """The server and the server's own name for the prompt an agent names."""
        server, sep, prompt = name.partition(SEPARATOR)
        downstream = self.downstreams.get(server)
        if sep and downstream is not None and downstream.manifest.namespaced:
            return server, prompt
        if name not in self.prompt_owner and self.may_relearn("prompts"):
            for owner, other in self.downstreams.items():
                if other.manifest.namespaced or not other.connected:
                    continue
                listed = await self.list_from(owner, "prompts/list", _list_prompts)
                for offered in listed.prompts if listed else ():
                    self.prompt_owner.setdefault(offered.name, owner)
        return self.prompt_owner.get(name), name

    # ---- completion and logging -------------------------------------------------

    async def complete(
        self, ctx: ServerRequestContext[Any, Any], params: types.CompleteRequestParams
    ) -> types.CompleteResult:
        """Completing an argument is decided as using what it belongs to."""
        principal = require_principal(ctx)
        ref = params.ref
        target = ref.name if isinstance(ref, types.PromptReference) else ref.uri
        entry = self.new_entry(principal, "completion/complete", None, target)
        resolved: list[types.PromptReference | types.ResourceTemplateReference] = []

        async def decide() -> tuple[Decision, Downstream]:
            if isinstance(ref, types.PromptReference):
                server, prompt = await self.prompt_target(ref.name)
                resolved.append(ref.model_copy(update={"name": prompt}))
                return self.decide_prompt(principal, server, prompt)
            resolved.append(ref)
            owner = await self.template_server(ref.uri)
            return self.decide_resource(principal, owner, ref.uri)

        def forward(
            client: Client, relay: AgentRelay
        ) -> Awaitable[types.CompleteResult]:
            # The SDK's client builds its CompletionArgument from this dict.
            argument = params.argument.model_dump()
            context = params.context.arguments if params.context else None
            return client.complete(resolved[0], argument, context)

        return await self.answer(ctx, principal, entry, decide, forward)

    async def set_logging_level(
        self, ctx: ServerRequestContext[Any, Any], params: types.SetLevelRequestParams
    ) -> types.EmptyResult:
        """The level of log messages relayed to this agent; servers are not told.

        A server is shared by every agent, so one agent's level must not
        change what the server sends the others; the broker filters instead.
        """
        principal = require_principal(ctx)
        # On record first: a level that cannot be recorded is not set.
        self.record_list(principal, "logging/setLevel", f"level {params.level}")
        self.levels.set(session_id(ctx), params.level)
        return types.EmptyResult()

    # ---- the one path from a decision to a downstream server ------------------

    async def answer(
        self,
        ctx: ServerRequestContext[Any, Any],
        principal: Principal,
        entry: AuditEntry,
        decide: Callable[[], Awaitable[tuple[Decision, Downstream]]],
        forward: Callable[[Client, AgentRelay], Awaitable[T]],
    ) -> T:
        """``mediate``, a denial told to the agent as a JSON-RPC error."""
        try:
            return await self.mediate(ctx, principal, entry, decide, forward)
        except Denied as denied:
            raise denial_error(denied) from None

    async def mediate(
        self,
        ctx: ServerRequestContext[Any, Any],
        principal: Principal,
        entry: AuditEntry,
        decide: Callable[[], Awaitable[tuple[Decision, Downstream]]],
        forward: Callable[[Client, AgentRelay], Awaitable[T]],
    ) -> T:
        """``settle`` for a request that came through the SDK's server."""

        def send(downstream: Downstream, entry: AuditEntry) -> Awaitable[T]:
            relay = AgentRelay(
                ctx=ctx,
                principal=principal,
                server=downstream.name,
                target=entry.tool or "",
                decision_id=entry.decision_id,
                gate=self.gate_server_request,
                levels=self.levels,
            )
            return downstream.forward(
                entry.method, lambda client: forward(client, relay), relay
            )

        return await self.settle(entry, decide, send)

    async def settle(
        self,
        entry: AuditEntry,
        decide: Decide,
        send: Callable[[Downstream, AuditEntry], Awaitable[T]],
    ) -> T:
        """Decide, record, and only then send; every failure is a recorded denial.

        The allowing entry is written before the request leaves, so a call
        that reached a server is on record even if the broker dies mid-call.
        A failure after that is recorded again under the same decision id.
        """
        started = time.perf_counter()
        what = entry.method
        try:
            decision, downstream = await decide()
            entry = replace(
                entry,
                server=downstream.name,
                reasons=decision.reasons,
                errors=decision.errors,
            )
            if decision.allowed:
                self.store.record(replace(entry, outcome="allow", category="allowed"))
            elif downstream.name in self.shadow:
                entry = replace(entry, shadow=True)
                self.store.record(replace(entry, detail="shadow mode: forwarded"))
            else:
                raise Forbidden("policy did not allow it")
            with self.metrics.forward_seconds.labels(downstream.name).time():
                return await send(downstream, entry)
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

    # ---- what a downstream server sends towards the agent ---------------------

    async def gate_server_request(self, relay: AgentSide, kind: Kind) -> None:
        """Decide and record a sampling or elicitation request during a call."""
        entry = self.new_entry(
            relay.principal, METHOD_OF[kind], relay.server, relay.target
        )
        entry = replace(entry, detail=f"asked during decision {relay.decision_id}")
        try:
            refuse_unaccepted(relay, kind)
            decision = self.engine.decide_server_request(
                relay.server, relay.principal, kind, now=self.clock()
            )
            entry = replace(entry, reasons=decision.reasons, errors=decision.errors)
            if not decision.allowed:
                raise Forbidden(f"policy did not allow {relay.server} to {kind}")
        except Denied as denied:
            denied.decision_id = entry.decision_id
            self.record_denial(entry, denied)
            raise
        except Exception as exc:
            log.exception("unexpected failure while deciding %s", METHOD_OF[kind])
            failed = Forbidden(
                f"broker failure: {type(exc).__name__}: {exc}",
                decision_id=entry.decision_id,
            )
            self.record_denial(entry, failed)
            raise failed from exc
        self.store.record(replace(entry, outcome="allow", category="allowed"))

    async def server_request(self, server: str, kind: str, params: Any) -> Any:
        """Sampling or elicitation outside any forwarded request: recorded and refused.

        With no request in flight on the session there is no agent it could
        be for, so there is nobody to decide for and nobody to relay it to.
        """
        method = METHOD_OF["sample" if kind == "sample" else "elicit"]
        entry = replace(self.new_entry(None, method), server=server)
        refused = Forbidden("a server asked for this outside any agent's request")
        self.record_denial(entry, refused)
        return types.ErrorData(
            code=DENIED_CODE, message=f"denied by the broker: {refused.category}"
        )

    async def notice(
        self, downstream: Downstream, message: types.ServerNotification
    ) -> None:
        """What a server announces outside any request."""
        if isinstance(message, types.ToolListChangedNotification):
            try:
                await self.refresh(downstream)
            except DownstreamFailed as exc:
                log.warning("re-listing %s failed: %s", downstream.name, exc.detail)
        elif isinstance(message, types.ResourceUpdatedNotification):
            for uri in await self.subscriptions.announce(str(message.params.uri)):
                try:
                    await downstream.request("resources/unsubscribe", _unsubscribe(uri))
                except DownstreamFailed as exc:
                    log.info("unsubscribing %s failed: %s", uri, exc.detail)

    # ---- pins -------------------------------------------------------------------

    async def refresh(self, downstream: Downstream) -> None:
        """Check one server's offered tools against the pins and record any drift."""
        await self.check_tools(downstream, await downstream.list_tools())

    async def check_tools(
        self, downstream: Downstream, unverified: list[types.Tool]
    ) -> None:
        for drift in self.catalog.refresh(downstream.name, unverified):
            self.record_drift(drift)

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


def _unsubscribe(uri: str) -> Callable[[Client], Awaitable[types.EmptyResult]]:
    def call(client: Client) -> Awaitable[types.EmptyResult]:
        return client.unsubscribe_resource(uri)

    return call


def _list_templates(client: Client) -> Awaitable[types.ListResourceTemplatesResult]:
    return client.list_resource_templates()


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
    """The only thing an agent learns about a denial: its category and decision id.

    An error the server itself answered is passed on as it came.
    """
    if isinstance(denied, DownstreamRefused):
        return MCPError(code=denied.code, message=denied.message, data=denied.data)
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
