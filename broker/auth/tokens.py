"""Bearer token verification: a compact JWT becomes a Principal or a denial.

The order of checks is the defence. The header's algorithm is compared with
the configured list before any key is looked up, so ``none`` and HMAC tokens
never meet a key. The unverified issuer only chooses where to look for the
key; after the signature holds, every claim is checked again as verified
data. PyJWT checks signature, issuer and audience; times are checked here
against the injected clock, with one leeway from the configuration.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx2
import jwt
from jwt.types import Options

from broker.auth.devkey import dev_jwks, load_or_create_dev_key
from broker.auth.jwks import JwksCache, KeySource, StaticKeys, shown
from broker.config import DEV_ISSUER, BrokerConfig
from broker.errors import ConfigError, Unauthenticated
from broker.principal import Principal

MAX_TOKEN_LENGTH = 16 * 1024
VERIFIED_CACHE_SECONDS = 300.0
VERIFIED_CACHE_SIZE = 10_000
_REQUIRED_CLAIMS = ["iss", "aud", "sub", "exp"]


class TokenVerifier:
    """Turns a bearer token into a Principal, or raises Unauthenticated."""

    def __init__(
        self,
        config: BrokerConfig,
        key_sources: Mapping[str, KeySource],
        clock: Callable[[], float] = time.time,
        *,
        cache_size: int = VERIFIED_CACHE_SIZE,
    ) -> None:
        self._config = config
        self._sources = dict(key_sources)
        self._clock = clock
        self._verified = VerifiedTokenCache(cache_size)

    async def verify(self, token: str) -> Principal:
        """The Principal behind ``token``; any fault raises Unauthenticated."""
        _check_shape(token)
        digest = hashlib.sha256(token.encode("ascii")).digest()
        principal = self._verified.get(digest, self._clock())
        if principal is None:
            principal = await self._verify_uncached(token)
            self._verified.put(digest, principal, self._clock())
        return principal

    async def _verify_uncached(self, token: str) -> Principal:
        unverified_header = _decoded_header(token)
        self._check_algorithm(unverified_header)
        unverified_issuer = _issuer_of(token)
        source = self._source_for(unverified_issuer)
        key = await source.get_key(_kid_of(unverified_header))

        claims = self._verified_claims(token, key, unverified_issuer)
        self._check_times(claims, self._clock())
        return principal_from_claims(claims, self._config)

    def _check_algorithm(self, unverified_header: Mapping[str, Any]) -> None:
        alg = unverified_header.get("alg")
        if alg not in self._config.auth.algorithms:
            raise Unauthenticated(f"token algorithm {shown(alg)} is not accepted")
        # No extension is understood here, so none may be declared critical.
        if "crit" in unverified_header:
            raise Unauthenticated("token declares critical header extensions")

    def _source_for(self, unverified_issuer: str) -> KeySource:
        source = self._sources.get(unverified_issuer)
        if unverified_issuer not in self._config.trusted_issuers or source is None:
            raise Unauthenticated(f"issuer {shown(unverified_issuer)} is not trusted")
        return source

    def _verified_claims(
        self, token: str, key: jwt.PyJWK, issuer: str
    ) -> dict[str, Any]:
        # The algorithms come from the configuration, and a PyJWK also binds
        # its own algorithm, so the token's header cannot choose one.
        # PyJWT's time checks read the wall clock; ours use self._clock.
        options: Options = {
            "require": _REQUIRED_CLAIMS,
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
        }
        try:
            return jwt.decode(
                token,
                key,
                algorithms=list(self._config.auth.algorithms),
                audience=self._config.resource,
                issuer=issuer,
                options=options,
            )
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"token rejected: {exc}") from exc

    def _check_times(self, claims: Mapping[str, Any], now: float) -> None:
        leeway = self._config.auth.leeway_seconds
        exp = _time_claim(claims, "exp")
        if exp is None or now >= exp + leeway:
            raise Unauthenticated("token has expired")
        nbf = _time_claim(claims, "nbf")
        if nbf is not None and nbf > now + leeway:
            raise Unauthenticated("token is not valid yet (nbf)")
        iat = _time_claim(claims, "iat")
        if iat is not None and iat > now + leeway:
            raise Unauthenticated("token was issued in the future (iat)")


def principal_from_claims(claims: Mapping[str, Any], config: BrokerConfig) -> Principal:
    """Build the Principal from claims that have passed every check."""
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise Unauthenticated("token has no subject")
    token_id = claims.get("jti")
    return Principal(
        subject=subject,
        issuer=str(claims["iss"]),
        client_id=_client_id(claims, config.auth.client_claim),
        scopes=_scopes(claims),
        groups=_strings(claims.get(config.auth.groups_claim)),
        expires_at=float(claims["exp"]),
        token_id=token_id if isinstance(token_id, str) else None,
    )


class VerifiedTokenCache:
    """Principals of recently verified tokens, by SHA-256 of the whole token.

    Keying on the digest of the exact token string means a forged token can
    only ever hit an entry made by that same string. An entry lives until the
    token expires and at most VERIFIED_CACHE_SECONDS; the oldest entry goes
    first when the cache is full.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: dict[bytes, tuple[float, Principal]] = {}

    def get(self, digest: bytes, now: float) -> Principal | None:
        """The cached Principal for ``digest``, if its entry is still live."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        until, principal = entry
        if now >= until:
            del self._entries[digest]
            return None
        return principal

    def put(self, digest: bytes, principal: Principal, now: float) -> None:
        """Remember ``principal`` until its expiry or the cache lifetime."""
        until = min(principal.expires_at, now + VERIFIED_CACHE_SECONDS)
        self._entries.pop(digest, None)
        while self._entries and len(self._entries) >= self._size:
            del self._entries[next(iter(self._entries))]
        self._entries[digest] = (until, principal)


def build_verifier(
    config: BrokerConfig, http_client: httpx2.AsyncClient | None = None
) -> TokenVerifier:
    """A verifier for the configured issuer, plus the dev key in development."""
    sources: dict[str, KeySource] = {}
    auth = config.auth
    if auth.issuer:
        if not auth.jwks_url:
            raise ConfigError("[auth] issuer is set but jwks_url is empty")
        sources[auth.issuer] = JwksCache(
            auth.jwks_url,
            http_client=http_client,
            cache_seconds=auth.jwks_cache_seconds,
            refetch_cooldown_seconds=auth.jwks_refetch_cooldown_seconds,
            timeout=auth.jwks_timeout_seconds,
        )
    if config.development:
        dev_key = load_or_create_dev_key(config.dev_key_path)
        sources[DEV_ISSUER] = StaticKeys(dev_jwks(dev_key))
    return TokenVerifier(config, sources)


def _check_shape(token: str) -> None:
    if not token or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        raise Unauthenticated("token is empty, oversized or not ASCII")
    if token.count(".") != 2:
        raise Unauthenticated("token is not a compact JWS")


def _decoded_header(token: str) -> dict[str, Any]:
    try:
        return jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise Unauthenticated(f"malformed token header: {exc}") from exc


def _issuer_of(token: str) -> str:
    try:
        unverified_claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise Unauthenticated(f"malformed token payload: {exc}") from exc
    unverified_issuer = unverified_claims.get("iss")
    if not isinstance(unverified_issuer, str):
        raise Unauthenticated("token has no issuer")
    return unverified_issuer


def _kid_of(unverified_header: Mapping[str, Any]) -> str | None:
    kid = unverified_header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise Unauthenticated("token kid is not a string")
    return kid


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # bool is an int in Python, and JSON may carry Infinity or NaN.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthenticated(f"token claim {name} is not a number")
    if not math.isfinite(value):
        raise Unauthenticated(f"token claim {name} is not finite")
    return float(value)


def _client_id(claims: Mapping[str, Any], client_claim: str) -> str:
    for name in (client_claim, "client_id"):
        value = claims.get(name)
        if isinstance(value, str) and value:
            return value
    return "unknown"


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    scope = claims.get("scope")
    if isinstance(scope, str):
        return frozenset(scope.split())
    return _strings(claims.get("scp"))


def _strings(value: object) -> frozenset[str]:
    if not isinstance(value, list):
        return frozenset()
    return frozenset(item for item in value if isinstance(item, str))
