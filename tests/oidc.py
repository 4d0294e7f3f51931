"""A small OpenID provider for tests, over real HTTP on loopback.

It signs in whoever ``user`` names, without a form: the authorize endpoint
answers at once with a code, as a provider would after the user logged in.
It insists on what the broker's page must do (PKCE with S256, a nonce, the
registered redirect URI, the client secret) and records each authorize
request so tests can check them.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tests.idp import ServerThread

CLIENT_ID = "broker-approvals"
CLIENT_SECRET = "test-client-secret"
KID = "oidc-1"


@dataclass
class User:
    sub: str = "carol"
    name: str = "Carol Approver"
    groups: list[str] = field(default_factory=lambda: ["approvers"])


@dataclass
class Grant:
    redirect_uri: str
    challenge: str
    nonce: str
    user: User


class OidcProvider:
    """Discovery, authorize, token and JWKS endpoints for one client."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(65537, 2048)
        self.user = User()
        self.redirect_uris: set[str] = set()
        self.authorize_requests: list[dict[str, str]] = []
        self._grants: dict[str, Grant] = {}
        routes = [
            Route("/.well-known/openid-configuration", self._discovery),
            Route("/authorize", self._authorize),
            Route("/token", self._token, methods=["POST"]),
            Route("/jwks", self._jwks),
        ]
        self._server = ServerThread(Starlette(routes=routes))

    def __enter__(self) -> OidcProvider:
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop()

    @property
    def issuer(self) -> str:
        return self._server.url

    async def _discovery(self, request: Request) -> Response:
        return JSONResponse(
            {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token",
                "jwks_uri": f"{self.issuer}/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            }
        )

    async def _authorize(self, request: Request) -> Response:
        query = dict(request.query_params)
        self.authorize_requests.append(query)
        redirect_uri = query.get("redirect_uri", "")
        good = (
            query.get("client_id") == CLIENT_ID
            and query.get("response_type") == "code"
            and query.get("code_challenge_method") == "S256"
            and query.get("code_challenge")
            and query.get("nonce")
            and redirect_uri in self.redirect_uris
        )
        if not good:
            return JSONResponse({"error": "invalid_request"}, status_code=400)
        code = secrets.token_urlsafe(16)
        self._grants[code] = Grant(
            redirect_uri, query["code_challenge"], query["nonce"], self.user
        )
        answer = urlencode({"code": code, "state": query.get("state", "")})
        return RedirectResponse(f"{redirect_uri}?{answer}", status_code=302)

    async def _token(self, request: Request) -> Response:
        form = await request.form()
        grant = self._grants.pop(str(form.get("code")), None)
        if (
            grant is None
            or not self._client_authenticated(request)
            or form.get("redirect_uri") != grant.redirect_uri
            or _s256(str(form.get("code_verifier", ""))) != grant.challenge
        ):
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        return JSONResponse(
            {
                "access_token": secrets.token_urlsafe(16),
                "token_type": "Bearer",
                "expires_in": 300,
                "id_token": self._id_token(grant),
            }
        )

    async def _jwks(self, request: Request) -> Response:
        jwk = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return JSONResponse({"keys": [{**jwk, "kid": KID, "alg": "RS256"}]})

    def _client_authenticated(self, request: Request) -> bool:
        expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        return request.headers.get("authorization") == f"Basic {expected}"

    def _id_token(self, grant: Grant) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": grant.user.sub,
            "aud": CLIENT_ID,
            "iat": now,
            "exp": now + 300,
            "nonce": grant.nonce,
            "name": grant.user.name,
            "groups": grant.user.groups,
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": KID})


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
