"""The HTTP edge: nothing reaches the MCP endpoint without a verified token.

``BearerAuth`` answers every request it refuses itself, with the challenge
RFC 6750 and RFC 9728 describe, and tells the caller's ``on_denied`` about
it first. The agent sees only a category and a decision id; the detail of
the refusal goes to ``on_denied`` for the record. The metadata route tells
clients which authorization server issues tokens for this resource.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.auth.tokens import TokenVerifier
from broker.config import BrokerConfig
from broker.errors import Denied, InsufficientScope, Unauthenticated
from broker.principal import Principal

PRINCIPAL_KEY = "broker.principal"
RESOURCE_NAME = "MCP authorization broker"

OnDenied = Callable[[str, str, str, dict[str, str]], Awaitable[None]]
"""``on_denied(category, detail, decision_id, request_info)``."""

_log = logging.getLogger(__name__)


class BearerAuth:
    """ASGI middleware that admits only requests with a verified bearer token."""

    def __init__(
        self,
        app: ASGIApp,
        verifier: TokenVerifier,
        config: BrokerConfig,
        on_denied: OnDenied,
        *,
        required_scopes: tuple[str, ...] | None = None,
    ) -> None:
        """``required_scopes`` replaces ``[auth] required_scopes`` when given."""
        self._app = app
        self._verifier = verifier
        self._on_denied = on_denied
        self._required = (
            config.auth.required_scopes if required_scopes is None else required_scopes
        )
        self._metadata_param = f"resource_metadata={_quoted(config.metadata_url)}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        token = bearer_token(scope)
        try:
            principal = await self._authenticate(token)
        except Denied as denial:
            await self._refuse(denial, token is not None, scope, receive, send)
            return

        scope[PRINCIPAL_KEY] = principal
        # The SDK binds a stateful session to the identity that opened it and
        # answers anyone else as if the session did not exist.
        scope["user"] = session_owner(principal)
        await self._app(scope, receive, send)

    async def _authenticate(self, token: str | None) -> Principal:
        if token is None:
            raise Unauthenticated("request carries no bearer token")
        try:
            principal = await self._verifier.verify(token)
        except Denied:
            raise
        except Exception as exc:
            # A fault in verification is a denial, never a way through.
            detail = f"token verification failed: {type(exc).__name__}"
            raise Unauthenticated(detail) from exc
        missing = [name for name in self._required if name not in principal.scopes]
        if missing:
            raise InsufficientScope(" ".join(missing))
        return principal

    async def _refuse(
        self,
        denial: Denied,
        token_given: bool,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        decision_id = uuid.uuid4().hex
        denial.decision_id = decision_id
        await self._record(denial, decision_id, scope)

        forbidden = isinstance(denial, InsufficientScope)
        response = JSONResponse(
            {"error": denial.category, "decision_id": decision_id},
            status_code=403 if forbidden else 401,
            headers={
                "WWW-Authenticate": self._challenge(denial, token_given),
                "Cache-Control": "no-store",
            },
        )
        await response(scope, receive, send)

    async def _record(self, denial: Denied, decision_id: str, scope: Scope) -> None:
        info = request_info(scope)
        try:
            await self._on_denied(denial.category, denial.detail, decision_id, info)
        except Exception as exc:
            # The refusal stands whether or not it could be recorded.
            _log.warning(
                "denial_not_recorded decision_id=%s error=%s",
                decision_id,
                type(exc).__name__,
            )

    def _challenge(self, denial: Denied, token_given: bool) -> str:
        params: list[str] = []
        if isinstance(denial, InsufficientScope):
            params += ['error="insufficient_scope"', f"scope={_quoted(denial.scope)}"]
        else:
            if token_given:
                params.append('error="invalid_token"')
            if self._required:
                params.append(f"scope={_quoted(' '.join(self._required))}")
        params.append(self._metadata_param)
        return "Bearer " + ", ".join(params)


def bearer_token(scope: Scope) -> str | None:
    """The token of a single ``Authorization: Bearer`` header, else None."""
    values = [value for name, value in scope["headers"] if name == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, credentials = values[0].decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip() or None


def request_info(scope: Scope) -> dict[str, str]:
    """What the record keeps about a refused request: never its headers."""
    client = scope.get("client")
    return {
        "method": str(scope.get("method", "")),
        "path": str(scope.get("path", "")),
        "client": str(client[0]) if client else "",
    }


def metadata_document(config: BrokerConfig) -> dict[str, Any]:
    """RFC 9728 protected resource metadata for ``config.resource``."""
    document: dict[str, Any] = {"resource": config.resource}
    if config.auth.issuer:
        document["authorization_servers"] = [config.auth.issuer]
    document["scopes_supported"] = list(config.auth.required_scopes)
    document["bearer_methods_supported"] = ["header"]
    document["resource_name"] = RESOURCE_NAME
    return document


def protected_resource_metadata(config: BrokerConfig) -> Route:
    """A route serving the metadata document at the path of metadata_url."""
    document: Mapping[str, Any] = metadata_document(config)

    async def endpoint(request: Request) -> Response:
        return JSONResponse(document)

    return Route(urlsplit(config.metadata_url).path, endpoint, methods=["GET"])


def _quoted(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def session_owner(principal: Principal) -> AuthenticatedUser:
    """The principal as the SDK identifies a session's owner (never the token)."""
    return AuthenticatedUser(
        AccessToken(
            token="",
            client_id=principal.client_id,
            scopes=sorted(principal.scopes),
            expires_at=int(principal.expires_at) or None,
            subject=principal.subject,
            claims={"iss": principal.issuer},
        )
    )
