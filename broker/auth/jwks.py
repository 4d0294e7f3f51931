"""Signature keys of the issuers the broker trusts.

Keys are parsed once per JWKS document and served from memory. Two bounds
shape the cache: fetched keys are trusted for ``cache_seconds`` (so an
identity provider that is down does not stop the broker at once, and one
that stays down stops it in the end), and an unknown ``kid`` causes at most
one refetch per cooldown (so forged tokens cannot turn into a flood of
requests to the identity provider). Every failure to get a key is an
``Unauthenticated`` whose detail tells the operator what went wrong.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx2
import jwt

from broker.errors import ConfigError, Unauthenticated

MAX_JWKS_BYTES = 256 * 1024

# A JWKS holds public keys. A symmetric or "none" entry there is either a
# mistake or an attack on algorithm confusion, so it never becomes a key.
_REFUSED_ALGORITHMS = frozenset({"none", "HS256", "HS384", "HS512"})
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "k"})


class KeySource(Protocol):
    """Where the verifier finds the key that signed a token."""

    async def get_key(self, kid: str | None) -> jwt.PyJWK:
        """The key for ``kid``; ``None`` asks for the issuer's only key."""
        ...


@dataclass(frozen=True, slots=True)
class KeySet:
    """The usable signature keys of one JWKS document."""

    keys: tuple[jwt.PyJWK, ...]
    skipped: int = 0

    def find(self, kid: str | None) -> jwt.PyJWK | None:
        """The key named ``kid``, or the only key when ``kid`` is ``None``."""
        if kid is None:
            return self.keys[0] if len(self.keys) == 1 else None
        return next((key for key in self.keys if key.key_id == kid), None)


def parse_jwks(document: object) -> KeySet:
    """Keep the signature keys of a JWKS document; raise ValueError if none."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError("document has no 'keys' list")
    entries: list[object] = document["keys"]
    keys: list[jwt.PyJWK] = []
    kids: set[str] = set()
    for entry in entries:
        key = _usable_key(entry)
        if key is None or key.key_id in kids:
            continue
        keys.append(key)
        if key.key_id is not None:
            kids.add(key.key_id)
    skipped = len(entries) - len(keys)
    if not keys:
        raise ValueError(f"no usable signature key among {len(entries)} entries")
    return KeySet(tuple(keys), skipped)


def _usable_key(entry: object) -> jwt.PyJWK | None:
    if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
        return None
    if entry.get("alg") in _REFUSED_ALGORITHMS or entry.get("kty") == "oct":
        return None
    if _PRIVATE_MEMBERS & entry.keys():
        return None
    try:
        return jwt.PyJWK(entry)
    except (jwt.PyJWTError, NotImplementedError):
        return None


class JwksCache:
    """Keys of one issuer, fetched from its JWKS URL and cached."""

    def __init__(
        self,
        url: str,
        *,
        http_client: httpx2.AsyncClient | None = None,
        cache_seconds: float = 3600.0,
        refetch_cooldown_seconds: float = 30.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self._client = http_client
        self._cache_seconds = cache_seconds
        self._cooldown = refetch_cooldown_seconds
        self._timeout = timeout
        self._clock = clock
        self._keys: KeySet | None = None
        self._fetched_at = 0.0
        self._attempted_at: float | None = None
        self._attempts = 0
        self._last_error: str | None = None
        self._lock = asyncio.Lock()

    async def get_key(self, kid: str | None) -> jwt.PyJWK:
        """The key for ``kid``, refetching when allowed; else Unauthenticated."""
        key = self._current_key(kid)
        if key is not None:
            return key

        # Single flight: whoever waited for the lock while another caller
        # fetched uses that result instead of fetching again.
        attempts_seen = self._attempts
        async with self._lock:
            if self._attempts == attempts_seen:
                await self._refetch_unless_cooling_down()

        key = self._current_key(kid)
        if key is None:
            raise Unauthenticated(self._why_missing(kid))
        return key

    def _current_key(self, kid: str | None) -> jwt.PyJWK | None:
        if self._keys is None or not self._fresh():
            return None
        return self._keys.find(kid)

    def _fresh(self) -> bool:
        return self._clock() - self._fetched_at < self._cache_seconds

    async def _refetch_unless_cooling_down(self) -> None:
        now = self._clock()
        last = self._attempted_at
        if last is not None and now - last < self._cooldown:
            return
        self._attempted_at = now
        self._attempts += 1
        try:
            self._keys = await self._fetch()
        except Unauthenticated as exc:
            self._last_error = exc.detail
            return
        self._fetched_at = now
        self._last_error = None

    async def _fetch(self) -> KeySet:
        # Whatever goes wrong with the identity provider (network, status,
        # body, keys) must end as a denial, never as an error page. The
        # overall timeout stops a provider that trickles its answer byte by
        # byte from holding every caller behind the lock.
        try:
            async with asyncio.timeout(self._timeout):
                body = await self._download()
            return parse_jwks(json.loads(body))
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            detail = f"JWKS fetch from {self._url} failed: {reason}"
            raise Unauthenticated(detail) from exc

    async def _download(self) -> bytes:
        if self._client is not None:
            return await self._read(self._client)
        async with httpx2.AsyncClient(timeout=self._timeout) as client:
            return await self._read(client)

    async def _read(self, client: httpx2.AsyncClient) -> bytes:
        headers = {"accept": "application/json"}
        async with client.stream(
            "GET", self._url, headers=headers, timeout=self._timeout
        ) as response:
            if response.status_code != 200:
                raise ValueError(f"HTTP status {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"document exceeds {MAX_JWKS_BYTES} bytes")
            return bytes(body)

    def _why_missing(self, kid: str | None) -> str:
        if self._keys is None or not self._fresh():
            reason = self._last_error or "refetch is cooling down"
            return f"no current keys from {self._url}: {reason}"
        if kid is None:
            return f"token has no kid and {self._url} has several keys"
        return (
            f"no signature key {shown(kid)} at {self._url} "
            f"({self._keys.skipped} entries skipped as unusable; "
            f"refetch at most every {self._cooldown:g}s)"
        )


class StaticKeys:
    """Keys fixed at start-up, such as the development signing key."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        try:
            self._keys = parse_jwks(jwks)
        except ValueError as exc:
            raise ConfigError(f"static signing keys are unusable: {exc}") from exc

    async def get_key(self, kid: str | None) -> jwt.PyJWK:
        """The key for ``kid``, or Unauthenticated."""
        key = self._keys.find(kid)
        if key is None:
            raise Unauthenticated(f"no static signature key {shown(kid)}")
        return key


def shown(value: object) -> str:
    """A short printable form of a value taken from an unverified token.

    Only for details that go to the record: a claim or header an attacker
    chose must not be able to make the record arbitrarily long.
    """
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
