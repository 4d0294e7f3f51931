"""A small identity provider for tests, served over real HTTP on loopback.

It holds an RSA and an EC signing key, publishes them as a JWKS through
uvicorn on a free port of 127.0.0.1, counts the fetches, and mints tokens
with any claims and headers: good ones, and the hostile ones an attacker
would try. Keys can be rotated or withdrawn and the server can be stopped.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import jwt
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

ISSUER = "https://idp.example.test"
SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class Clock:
    """A clock that moves only when the test moves it."""

    def __init__(self, now: float = 1_900_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ServerThread:
    """An ASGI app served by uvicorn on a free loopback port in its own thread."""

    def __init__(self, app: ASGIApp) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(app, lifespan="off", log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )
        self.stopped = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.stopped = True
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._socket.close()


@contextmanager
def serving(app: ASGIApp) -> Iterator[ServerThread]:
    """Serve ``app`` for the duration of the block."""
    server = ServerThread(app)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class LocalIdP:
    """Signing keys, a JWKS endpoint and a token mint, reset between tests."""

    def __init__(self, resource: str, clock: Callable[[], float]) -> None:
        self.resource = resource
        self._initial_keys: dict[str, SigningKey] = {
            "rsa-1": rsa.generate_private_key(65537, 2048),
            "ec-1": ec.generate_private_key(ec.SECP256R1()),
        }
        self._server = self._new_server()
        self.reset(clock)

    def __enter__(self) -> LocalIdP:
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop()

    def reset(self, clock: Callable[[], float]) -> None:
        """Back to the first two keys, no fetches, and serving if it was down."""
        self.clock = clock
        self.issuer = ISSUER
        self.fetches = 0
        self.status = 200
        self.raw_body: bytes | None = None
        self.delay_seconds = 0.0
        self.keys: dict[str, SigningKey] = dict(self._initial_keys)
        self.uses = dict.fromkeys(self.keys, "sig")
        if self._server.stopped:
            self._server = self._new_server()
            self._server.start()

    @property
    def jwks_url(self) -> str:
        return f"{self._server.url}/jwks"

    def down(self) -> None:
        """Stop answering: later fetches fail to connect."""
        self._server.stop()

    def publish(self, kid: str, key: SigningKey, use: str = "sig") -> None:
        self.keys[kid] = key
        self.uses[kid] = use

    def withdraw(self, kid: str) -> None:
        del self.keys[kid]

    def rotate(self, old_kid: str = "rsa-1", new_kid: str = "rsa-2") -> None:
        """Replace one RSA key with a fresh one under a new kid."""
        self.withdraw(old_kid)
        self.publish(new_kid, rsa.generate_private_key(65537, 2048))

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self._public_jwk(kid) for kid in list(self.keys)]}

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Good claims for the broker; an override of None drops that claim."""
        now = int(self.clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": "alice",
            "aud": [self.resource],
            "azp": "agent-7",
            "scope": "tools:read tools:call",
            "groups": ["eng", "oncall"],
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "jti": uuid.uuid4().hex,
        }
        claims.update(overrides)
        return {name: value for name, value in claims.items() if value is not None}

    def token(
        self,
        claims: dict[str, Any] | None = None,
        *,
        kid: str | None = "rsa-1",
        key: SigningKey | None = None,
        headers: dict[str, Any] | None = None,
    ) -> str:
        """A token signed properly by ``key`` (default: the key named ``kid``)."""
        signing_key = key if key is not None else self.keys[str(kid)]
        algorithm = "RS256" if isinstance(signing_key, rsa.RSAPrivateKey) else "ES256"
        extra = {"kid": kid} if kid is not None else {}
        return jwt.encode(
            claims if claims is not None else self.claims(),
            signing_key,
            algorithm=algorithm,
            headers={**extra, **(headers or {})},
        )

    def unsigned(self, claims: dict[str, Any], alg: str = "none") -> str:
        """A token with an empty signature, as ``alg: none`` would have."""
        header = {"alg": alg, "typ": "JWT", "kid": "rsa-1"}
        return f"{_segment(header)}.{_segment(claims)}."

    def hmac_with_public_key(self, claims: dict[str, Any], kid: str = "rsa-1") -> str:
        """HS256 keyed with the issuer's public key PEM: algorithm confusion."""
        public = self.keys[kid].public_key()
        secret = public.public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
        header = {"alg": "HS256", "typ": "JWT", "kid": kid}
        signing_input = f"{_segment(header)}.{_segment(claims)}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64(mac)}"

    async def _serve_jwks(self, request: Request) -> Response:
        self.fetches += 1
        await asyncio.sleep(self.delay_seconds)
        if self.raw_body is not None:
            return Response(self.raw_body, self.status, media_type="application/json")
        return JSONResponse(self.jwks(), self.status)

    def _new_server(self) -> ServerThread:
        return ServerThread(Starlette(routes=[Route("/jwks", self._serve_jwks)]))

    def _public_jwk(self, kid: str) -> dict[str, Any]:
        key = self.keys[kid]
        if isinstance(key, rsa.RSAPrivateKey):
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            jwk["alg"] = "RS256"
        else:
            jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
            jwk["alg"] = "ES256"
        return {**jwk, "kid": kid, "use": self.uses[kid]}


def tampered(token: str, **changes: Any) -> str:
    """The same token with its payload edited and the signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(_unb64(payload))
    claims.update(changes)
    return f"{header}.{_segment(claims)}.{signature}"


def _segment(value: dict[str, Any]) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
