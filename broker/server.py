"""Assembling the broker: configuration in, one ASGI application out.

Everything is parsed and checked here, once, before the first request: the
manifests, the Cedar schema and policies, the audit store and the token
verifier. Any problem is a ConfigError and the broker does not start.
"""

from __future__ import annotations

import gc
import logging
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
from mcp.server import Server
from mcp.server.streamable_http_manager import (
    StreamableHTTPASGIApp,
    StreamableHTTPSessionManager,
)
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPDeprecationWarning
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from broker import __version__
from broker.approvals.model import Status
from broker.approvals.mount import approval_routes, build_approvals
from broker.audit import Store
from broker.auth.edge import BearerAuth, protected_resource_metadata
from broker.auth.tokens import TokenVerifier, build_verifier
from broker.catalog import Catalog
from broker.config import BrokerConfig
from broker.downstream import Downstream
from broker.errors import RecordFailed
from broker.lean import LeanCalls
from broker.limits import RateLimiter, build_limiter
from broker.manifest import load_manifests
from broker.mediation import Mediator
from broker.observability import MeteredStore, Metrics
from broker.policy import PolicyEngine
from broker.reload import PolicyWatcher
from broker.report_page import ReportPage
from broker.retention import check_at_start
from broker.stores import Probe, open_store, probe_for, say_if_unreachable

log = logging.getLogger("broker")

# How long start-up waits for downstream servers before serving anyway;
# calls to a server still connecting are denied until it is up.
STARTUP_CONNECT_SECONDS = 10.0


@dataclass
class Broker:
    config: BrokerConfig
    mediator: Mediator
    app: Starlette
    limiter: RateLimiter


def build_broker(config: BrokerConfig, *, store: Store | None = None) -> Broker:
    """Load and check everything; raise ConfigError on the first problem."""
    manifests = load_manifests(config.manifest_dir)
    catalog = Catalog(manifests)
    engine = PolicyEngine.load(config.policy_dir, catalog.pinned)
    if store is None:
        if config.development:
            # A fresh checkout has no state directory yet; production names
            # one that exists, and a missing one stops the start.
            Path(config.store.path).parent.mkdir(parents=True, exist_ok=True)
        store = open_store(config.store)
    record_probe = probe_for(store)
    say_if_unreachable(record_probe)
    check_at_start(store, config.store.retention_days, now=time.time())
    verifier = build_verifier(config)
    metrics = Metrics()
    store = MeteredStore(store, metrics)
    tool_names = [tool.qualified_name for tool in catalog.pinned]
    limiter = build_limiter(config.limits, config.store, tool_names)
    shadow = frozenset(
        name for name, m in manifests.items() if m.shadow or config.shadow
    )
    for name in sorted(shadow):
        log.warning(
            "SHADOW MODE for server %s: denials are recorded but NOT enforced", name
        )
    mediator = Mediator(
        engine=engine,
        catalog=catalog,
        downstreams={},
        store=store,
        limiter=limiter,
        shadow=shadow,
        metrics=metrics,
    )
    watcher = PolicyWatcher(mediator, config.policy_dir)
    downstreams = {
        name: Downstream(
            m,
            call_timeout=config.call_timeout_seconds,
            on_server_request=mediator.server_request,
            on_tools=mediator.check_tools,
            on_notice=mediator.notice,
            wire=config.lean_path,
        )
        for name, m in manifests.items()
    }
    for downstream in downstreams.values():
        downstream.credentials.check()
    mediator.downstreams = downstreams
    approvals = build_approvals(config, store, lambda: mediator.engine)
    mediator.approvals = approvals
    metrics.count_pending_with(lambda: approvals.store.count(Status.PENDING))

    mcp_server = _mcp_server(mediator)
    manager = StreamableHTTPSessionManager(
        app=mcp_server,
        stateless=config.sessions == "stateless",
        security_settings=TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=list(config.allowed_hosts),
            allowed_origins=list(config.allowed_origins),
        ),
    )

    async def on_denied(
        category: str, detail: str, decision_id: str, request_info: dict[str, Any]
    ) -> None:
        entry = mediator.new_entry(None, "http")
        mediator.keep_denial(
            replace(entry, decision_id=decision_id, category=category, detail=detail)
        )

    mcp_app: ASGIApp = StreamableHTTPASGIApp(manager)
    if config.lean_path:
        mcp_app = LeanCalls(mcp_app, mediator, manager)
    mcp_endpoint = BearerAuth(mcp_app, verifier, config, on_denied)
    routes = [
        Route("/mcp", endpoint=mcp_endpoint),
        Route("/report", endpoint=_report_page(mediator, verifier, config, on_denied)),
        protected_resource_metadata(config),
        Route("/healthz", endpoint=_healthz),
        Route("/readyz", endpoint=_readyz_for(mediator, watcher, record_probe)),
        metrics.route(),
        *approval_routes(config, approvals, verifier, on_denied),
    ]

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with manager.run(), anyio.create_task_group() as tasks:
            for downstream in downstreams.values():
                tasks.start_soon(downstream.supervise)
            tasks.start_soon(watcher.run)
            tasks.start_soon(approvals.run)
            with anyio.move_on_after(STARTUP_CONNECT_SECONDS):
                for downstream in downstreams.values():
                    await downstream.wait_connected()
            # What start-up built (modules, policies, schema, catalog) lasts as
            # long as the process; frozen, a full collection no longer walks it.
            gc.collect()
            gc.freeze()
            yield
            for downstream in downstreams.values():
                downstream.stop()
            tasks.cancel_scope.cancel()
        await limiter.aclose()
        store.close()
        approvals.store.close()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(HostGuard, config=config)
    return Broker(config=config, mediator=mediator, app=app, limiter=limiter)


def _mcp_server(mediator: Mediator) -> Server[Any]:
    # The SDK marks logging/setLevel deprecated for the newest protocol; the
    # broker still serves it to clients of the versions that have it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        return _mcp_server_with_logging(mediator)


def _mcp_server_with_logging(mediator: Mediator) -> Server[Any]:
    server: Server[Any] = Server(
        "mcp-broker",
        version=__version__,
        instructions="Policy decides every request; a denial names its decision id.",
        get_tool_input_schema=mediator.catalog.input_schema,
        on_list_tools=mediator.list_tools,
        on_call_tool=mediator.call_tool,
        on_list_resources=mediator.list_resources,
        on_list_resource_templates=mediator.list_resource_templates,
        on_read_resource=mediator.read_resource,
        on_subscribe_resource=mediator.subscribe_resource,
        on_unsubscribe_resource=mediator.unsubscribe_resource,
        on_list_prompts=mediator.list_prompts,
        on_get_prompt=mediator.get_prompt,
        on_completion=mediator.complete,
        on_set_logging_level=mediator.set_logging_level,
    )
    server.middleware.append(mediator.gate)
    return server


def _report_page(
    mediator: Mediator, verifier: TokenVerifier, config: BrokerConfig, on_denied: Any
) -> BearerAuth:
    """The denied-call report, behind the same bearer check as /mcp."""
    page = ReportPage(mediator.store, lambda: mediator.engine, mediator.clock)
    return BearerAuth(page, verifier, config, on_denied)


async def _healthz(request: Request) -> Response:
    return JSONResponse({"status": "alive"})


def _readyz_for(mediator: Mediator, watcher: PolicyWatcher, record_probe: Probe) -> Any:
    """Ready when every downstream is up, policies load and the record answers."""

    async def readyz(request: Request) -> Response:
        servers = {
            name: {"connected": d.connected, "last_error": d.last_error}
            for name, d in mediator.downstreams.items()
        }
        record = await _record_status(record_probe)
        ready = all(s["connected"] for s in servers.values()) and not watcher.error
        ready = ready and record["writable"] is True
        body = {
            "ready": ready,
            "servers": servers,
            "policies": watcher.status,
            "record": record,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    return readyz


async def _record_status(probe: Probe) -> dict[str, object]:
    # The probe blocks for up to the store's timeout; keep it off the loop.
    try:
        await anyio.to_thread.run_sync(probe)
    except RecordFailed as exc:
        return {"writable": False, "last_error": exc.detail}
    return {"writable": True, "last_error": None}


class HostGuard:
    """Refuses requests whose Host or Origin is not this broker's (DNS rebinding)."""

    def __init__(self, app: ASGIApp, config: BrokerConfig) -> None:
        self.app = app
        self.hosts = frozenset(h.lower() for h in config.allowed_hosts)
        self.origins = frozenset(o.lower().rstrip("/") for o in config.allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        host = headers.get(b"host", b"").decode("latin-1").lower()
        origin = headers.get(b"origin", b"").decode("latin-1").lower().rstrip("/")
        if host not in self.hosts:
            await JSONResponse({"error": "invalid_host"}, status_code=421)(
                scope, receive, send
            )
            return
        if origin and origin not in self.origins:
            await JSONResponse({"error": "invalid_origin"}, status_code=403)(
                scope, receive, send
            )
            return
        await self.app(scope, receive, send)
