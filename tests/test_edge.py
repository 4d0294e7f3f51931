"""The HTTP edge, driven over real HTTP through uvicorn on loopback."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from broker.auth.edge import PRINCIPAL_KEY, BearerAuth, protected_resource_metadata
from broker.auth.jwks import JwksCache
from broker.auth.tokens import TokenVerifier
from broker.config import AuthConfig, BrokerConfig
from broker.principal import Principal
from tests.idp import ISSUER, Clock, LocalIdP, serving

RESOURCE = "https://broker.example.test/mcp"
METADATA_URL = "https://broker.example.test/.well-known/oauth-protected-resource/mcp"
METADATA_PATH = "/.well-known/oauth-protected-resource/mcp"


@dataclass
class Recorder:
    """Collects the denials the middleware reports; can be made to fail."""

    fail: bool = False
    denials: list[tuple[str, str, str, dict[str, str]]] = field(default_factory=list)

    async def __call__(
        self, category: str, detail: str, decision_id: str, info: dict[str, str]
    ) -> None:
        self.denials.append((category, detail, decision_id, info))
        if self.fail:
            raise RuntimeError("audit sink unavailable")


async def whoami(scope: Scope, receive: Receive, send: Send) -> None:
    """The protected app: echoes the principal the middleware put in scope."""
    principal: Principal = scope[PRINCIPAL_KEY]
    body = {"subject": principal.subject, "client": principal.client_id}
    await JSONResponse(body)(scope, receive, send)


def challenge(response: httpx2.Response) -> dict[str, str]:
    """The parameters of a Bearer WWW-Authenticate header."""
    header = response.headers["www-authenticate"]
    assert header.startswith("Bearer ")
    return dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', header))


@pytest.fixture(scope="module")
def idp_server() -> Iterator[LocalIdP]:
    with LocalIdP(RESOURCE, Clock()) as provider:
        yield provider


@pytest.fixture
def idp(idp_server: LocalIdP) -> LocalIdP:
    idp_server.reset(Clock())
    return idp_server


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


EdgeStarter = Callable[..., AbstractAsyncContextManager[httpx2.AsyncClient]]


@pytest.fixture
def edge(idp: LocalIdP, recorder: Recorder) -> EdgeStarter:
    """A starter: serves the guarded app over uvicorn, yields a client for it."""

    @asynccontextmanager
    async def start(
        required_scopes: tuple[str, ...] = ("tools:call",),
        on_denied: Recorder = recorder,
    ) -> AsyncIterator[httpx2.AsyncClient]:
        auth = AuthConfig(
            issuer=ISSUER, jwks_url=idp.jwks_url, required_scopes=required_scopes
        )
        config = BrokerConfig(resource=RESOURCE, auth=auth)
        keys = JwksCache(idp.jwks_url, clock=idp.clock)
        verifier = TokenVerifier(config, {ISSUER: keys}, clock=idp.clock)
        guarded = BearerAuth(whoami, verifier, config, on_denied)
        routes = [protected_resource_metadata(config), Route("/mcp", guarded)]
        with serving(Starlette(routes=routes)) as server:
            async with httpx2.AsyncClient(base_url=server.url) as client:
                yield client

    return start


async def test_no_token_gets_challenge_with_metadata(
    edge: EdgeStarter, recorder: Recorder
) -> None:
    """No token: 401 naming the metadata URL and required scope, no error code."""
    async with edge() as client:
        response = await client.post("/mcp", json={})

    assert response.status_code == 401
    assert challenge(response) == {
        "scope": "tools:call",
        "resource_metadata": METADATA_URL,
    }
    assert response.json() == {
        "error": "unauthenticated",
        "decision_id": recorder.denials[0][2],
    }
    category, _, _, info = recorder.denials[0]
    assert category == "unauthenticated"
    assert info["method"] == "POST"
    assert info["path"] == "/mcp"


async def test_no_required_scopes_means_no_scope_param(edge: EdgeStarter) -> None:
    """Without required scopes the 401 challenge names only the metadata URL."""
    async with edge(required_scopes=()) as client:
        response = await client.get("/mcp")
    assert challenge(response) == {"resource_metadata": METADATA_URL}


@pytest.mark.parametrize(
    "headers",
    [
        [("authorization", "Basic YWxpY2U6c2VjcmV0")],
        [("authorization", "Bearer")],
        [("authorization", "Bearerabc.def.ghi")],
        [("authorization", "Bearer a.b.c"), ("authorization", "Bearer d.e.f")],
    ],
)
async def test_anything_but_one_bearer_header_is_no_token(
    edge: EdgeStarter, headers: list[tuple[str, str]]
) -> None:
    """Other schemes, empty or repeated headers count as no token at all."""
    async with edge() as client:
        response = await client.get("/mcp", headers=headers)
    assert response.status_code == 401
    assert "error" not in challenge(response)


async def test_bad_token_is_invalid_token_without_detail(
    edge: EdgeStarter, recorder: Recorder, idp: LocalIdP
) -> None:
    """An expired token: 401 invalid_token; the detail goes only to on_denied."""
    now = int(idp.clock())
    token = idp.token(idp.claims(exp=now - 600, iat=now - 1200))
    async with edge() as client:
        response = await client.get(
            "/mcp", headers={"authorization": f"Bearer {token}"}
        )

    assert response.status_code == 401
    assert challenge(response) == {
        "error": "invalid_token",
        "scope": "tools:call",
        "resource_metadata": METADATA_URL,
    }
    assert set(response.json()) == {"error", "decision_id"}
    _, detail, _, _ = recorder.denials[0]
    assert "expired" in detail
    assert "expired" not in response.text
    assert token not in detail


async def test_missing_scope_is_403_naming_it(
    edge: EdgeStarter, recorder: Recorder, idp: LocalIdP
) -> None:
    """A valid token without the required scope gets 403 insufficient_scope."""
    token = idp.token(idp.claims(scope="tools:read"))
    async with edge(required_scopes=("tools:read", "tools:call")) as client:
        response = await client.get(
            "/mcp", headers={"authorization": f"Bearer {token}"}
        )

    assert response.status_code == 403
    assert challenge(response) == {
        "error": "insufficient_scope",
        "scope": "tools:call",
        "resource_metadata": METADATA_URL,
    }
    assert response.json()["error"] == "insufficient_scope"
    assert recorder.denials[0][0] == "insufficient_scope"
    assert "tools:call" not in response.text


async def test_valid_token_reaches_app_with_principal(
    edge: EdgeStarter, recorder: Recorder, idp: LocalIdP
) -> None:
    """A good token (scheme in any case) passes and the app sees its principal."""
    token = idp.token()
    async with edge() as client:
        response = await client.get(
            "/mcp", headers={"authorization": f"bEaReR {token}"}
        )

    assert response.status_code == 200
    assert response.json() == {"subject": "alice", "client": "agent-7"}
    assert recorder.denials == []


async def test_failing_recorder_still_denies(
    edge: EdgeStarter, idp: LocalIdP, caplog: pytest.LogCaptureFixture
) -> None:
    """If on_denied raises the request is still refused, and no token is logged."""
    token = idp.token(idp.claims(aud="https://elsewhere.example.test"))
    failing = Recorder(fail=True)
    caplog.set_level(logging.DEBUG)
    async with edge(on_denied=failing) as client:
        response = await client.get(
            "/mcp", headers={"authorization": f"Bearer {token}"}
        )

    assert response.status_code == 401
    assert response.json()["error"] == "unauthenticated"
    assert len(failing.denials) == 1
    assert "denial_not_recorded" in caplog.text
    assert token not in caplog.text


async def test_each_denial_has_its_own_decision_id(
    edge: EdgeStarter, recorder: Recorder
) -> None:
    """Two refusals carry two different decision ids."""
    async with edge() as client:
        first = await client.get("/mcp")
        second = await client.get("/mcp")
    assert first.json()["decision_id"] != second.json()["decision_id"]
    assert len(recorder.denials) == 2


async def test_metadata_route_serves_rfc9728_document(edge: EdgeStarter) -> None:
    """The metadata path serves the resource, issuer, scopes and bearer method."""
    async with edge() as client:
        response = await client.get(METADATA_PATH)
    assert response.status_code == 200
    assert response.json() == {
        "resource": RESOURCE,
        "authorization_servers": [ISSUER],
        "scopes_supported": ["tools:call"],
        "bearer_methods_supported": ["header"],
        "resource_name": "MCP authorization broker",
    }


@pytest.mark.parametrize("kind", ["lifespan", "websocket"])
async def test_non_http_scopes_pass_through(idp: LocalIdP, kind: str) -> None:
    """Lifespan and websocket scopes reach the app untouched, without a principal."""
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    async def receive() -> Message:
        return {"type": f"{kind}.connect"}

    async def send(message: Message) -> None:
        raise AssertionError("the middleware must not answer")

    config = BrokerConfig(resource=RESOURCE)
    verifier = TokenVerifier(config, {})
    scope: Scope = {"type": kind, "headers": [], "path": "/mcp"}
    await BearerAuth(app, verifier, config, Recorder())(scope, receive, send)
    assert seen == [{"type": kind, "headers": [], "path": "/mcp"}]
