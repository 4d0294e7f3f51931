"""Approvers sign in to the page through the organisation's OpenID provider.

Authorization code with PKCE (S256), a nonce and a state, all kept by
Authlib in the signed session cookie until the provider sends the browser
back. The verified ID token's subject and groups become the approver's
Principal; the session then keeps only those, for at most SESSION_SECONDS.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from authlib.integrations.starlette_client import OAuth
from starlette.requests import Request
from starlette.responses import Response

from broker.config import ApprovalsConfig
from broker.errors import Unauthenticated
from broker.principal import Principal

SESSION_SECONDS = 8 * 3600
_APPROVER_KEY = "approver"


class SignIn:
    def __init__(
        self,
        config: ApprovalsConfig,
        client_secret: str | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.redirect_uri = f"{config.public_url}/approvals/callback"
        metadata_url = config.oidc_metadata_url or (
            config.oidc_issuer.rstrip("/") + "/.well-known/openid-configuration"
        )
        client_kwargs = {"scope": "openid profile", "code_challenge_method": "S256"}
        if not client_secret:
            # A public client: PKCE alone proves the code is ours. (S105: the
            # name of a method, not a password.)
            client_kwargs["token_endpoint_auth_method"] = "none"  # noqa: S105
        self._client: Any = OAuth().register(
            "approvers",
            client_id=config.oidc_client_id,
            client_secret=client_secret or None,
            server_metadata_url=metadata_url,
            client_kwargs=client_kwargs,
        )

    async def start(self, request: Request) -> Response:
        """The redirect to the provider's authorization endpoint."""
        try:
            response: Response = await self._client.authorize_redirect(
                request, self.redirect_uri
            )
        except Exception as exc:
            # The provider is unreachable or its metadata unusable: no sign-in.
            raise Unauthenticated(f"sign-in unavailable: {type(exc).__name__}") from exc
        return response

    async def finish(self, request: Request) -> Principal:
        """Verify the provider's answer and keep the approver in the session."""
        try:
            token = await self._client.authorize_access_token(request)
        except Exception as exc:
            # Authlib, joserfc and httpx2 each raise their own errors here; every
            # one means the same: this browser is not signed in.
            raise Unauthenticated(f"sign-in failed: {type(exc).__name__}") from exc
        claims = token.get("userinfo")
        if (
            not isinstance(claims, Mapping)
            or claims.get("iss") != self.config.oidc_issuer
        ):
            raise Unauthenticated("ID token missing or from another issuer")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("ID token has no subject")
        groups = claims.get(self.config.oidc_groups_claim)
        request.session[_APPROVER_KEY] = {
            "sub": subject,
            "groups": [g for g in groups if isinstance(g, str)]
            if isinstance(groups, list)
            else [],
            "name": str(claims.get("name") or subject),
            "until": self.clock() + SESSION_SECONDS,
        }
        approver = self.approver(request)
        if approver is None:
            raise Unauthenticated("session not kept")
        return approver

    def approver(self, request: Request) -> Principal | None:
        """The signed-in approver of this session, if the session is still good."""
        kept = request.session.get(_APPROVER_KEY)
        if not isinstance(kept, dict) or kept.get("until", 0) <= self.clock():
            return None
        return Principal(
            subject=str(kept["sub"]),
            issuer=self.config.oidc_issuer,
            client_id=self.config.oidc_client_id,
            groups=frozenset(kept.get("groups", [])),
            expires_at=float(kept["until"]),
        )

    def display_name(self, request: Request) -> str:
        kept = request.session.get(_APPROVER_KEY)
        return str(kept.get("name", "")) if isinstance(kept, dict) else ""
