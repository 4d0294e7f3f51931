"""Putting approvals into the broker: the service, its API and its page."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.routing import BaseRoute, Mount
from starlette.types import ASGIApp

from broker.approvals.api import APPROVER_SCOPE, api_app, openapi_route
from broker.approvals.gate import Approvals
from broker.approvals.page import page_app
from broker.approvals.signin import SignIn
from broker.approvals.store import ApprovalStore, SqliteApprovalStore
from broker.approvals.store_redis import RedisApprovalStore
from broker.audit import Store
from broker.auth.edge import BearerAuth, OnDenied
from broker.auth.tokens import TokenVerifier
from broker.config import BrokerConfig, StoreConfig, redis_password
from broker.errors import ConfigError
from broker.policy import PolicyEngine

log = logging.getLogger("broker.approvals")


def build_approvals(
    config: BrokerConfig, audit: Store, policy: Callable[[], PolicyEngine]
) -> Approvals:
    """The approvals service, its pending actions where ``[store] type`` says."""
    return Approvals(config.approvals, open_approval_store(config.store), audit, policy)


def open_approval_store(config: StoreConfig) -> ApprovalStore:
    """Redis beside the Redis record (shared by replicas), else the state file."""
    if config.type != "redis":
        return SqliteApprovalStore(config.path)
    try:
        return RedisApprovalStore.connect(
            config.redis_url,
            password=redis_password(config),
            timeout=config.redis_timeout_seconds,
            prefix=config.redis_key_prefix,
        )
    except ValueError as exc:
        # The client's message never repeats the URL, which may hold a password.
        raise ConfigError(f"[store] redis_url cannot be used: {exc}") from exc


def approval_routes(
    config: BrokerConfig,
    approvals: Approvals,
    verifier: TokenVerifier,
    on_denied: OnDenied,
) -> list[BaseRoute]:
    """The API (bearer, scope approvals:decide), its OpenAPI, and the page.

    The page is served only when an OpenID provider is configured for it.
    """
    api = BearerAuth(
        api_app(approvals),
        verifier,
        config,
        on_denied,
        required_scopes=(APPROVER_SCOPE,),
    )
    routes: list[BaseRoute] = [
        openapi_route(config.approvals.public_url),
        Mount("/approvals/api", app=api),
    ]
    if config.approvals.oidc_issuer:
        routes.append(Mount("/approvals", app=_page(config, approvals)))
    return routes


def _page(config: BrokerConfig, approvals: Approvals) -> ASGIApp:
    settings = config.approvals
    public = urlsplit(settings.public_url)
    origin = f"{public.scheme}://{public.netloc}".lower()
    if origin not in {o.lower().rstrip("/") for o in config.allowed_origins}:
        raise ConfigError(
            f"[broker] allowed_origins must list {origin}, where approvers "
            "post the page's forms from"
        )
    signin = SignIn(settings, os.environ.get(settings.oidc_client_secret_env))
    return page_app(
        approvals,
        signin,
        _session_secret(settings.session_secret_env),
        public.scheme == "https",
    )


def _session_secret(variable: str) -> str:
    secret = os.environ.get(variable, "")
    if secret:
        return secret
    # Sessions then end when the broker restarts, and replicas do not share
    # them; setting the variable keeps approvers signed in across both.
    log.warning("%s is not set; approver sessions last until restart", variable)
    return secrets.token_urlsafe(32)
