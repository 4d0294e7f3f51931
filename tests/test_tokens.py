"""Token verification against a real identity provider on loopback."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from broker.auth.devkey import dev_jwks, load_or_create_dev_key, mint_dev_token
from broker.auth.jwks import JwksCache, StaticKeys
from broker.auth.tokens import TokenVerifier, build_verifier
from broker.config import DEV_ISSUER, AuthConfig, BrokerConfig
from broker.errors import ConfigError, Unauthenticated
from broker.principal import Principal
from tests.idp import ISSUER, Clock, LocalIdP, tampered

RESOURCE = "https://broker.example.test/mcp"
CACHE_SECONDS = 3600
COOLDOWN = 30


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def idp_server() -> Iterator[LocalIdP]:
    with LocalIdP(RESOURCE, Clock()) as provider:
        yield provider


@pytest.fixture
def idp(idp_server: LocalIdP, clock: Clock) -> LocalIdP:
    idp_server.reset(clock)
    return idp_server


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient() as client:
        yield client


@pytest.fixture
def config(idp: LocalIdP) -> BrokerConfig:
    auth = AuthConfig(issuer=ISSUER, jwks_url=idp.jwks_url)
    return BrokerConfig(resource=RESOURCE, auth=auth)


def make_verifier(
    config: BrokerConfig,
    idp: LocalIdP,
    clock: Clock,
    http: httpx2.AsyncClient | None,
    **cache_options: float,
) -> TokenVerifier:
    options = {
        "cache_seconds": CACHE_SECONDS,
        "refetch_cooldown_seconds": COOLDOWN,
        **cache_options,
    }
    cache = JwksCache(idp.jwks_url, http_client=http, clock=clock, **options)
    return TokenVerifier(config, {ISSUER: cache}, clock=clock)


@pytest.fixture
def verifier(
    config: BrokerConfig, idp: LocalIdP, clock: Clock, http: httpx2.AsyncClient
) -> TokenVerifier:
    return make_verifier(config, idp, clock, http)


async def refused(verifier: TokenVerifier, token: str) -> str:
    """Verify ``token``, expect a refusal, and return its detail."""
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(token)
    return caught.value.detail


# The good path.


async def test_good_token_gives_principal(
    verifier: TokenVerifier, idp: LocalIdP, clock: Clock
) -> None:
    """A valid RSA token yields subject, issuer, client, scopes, groups, expiry."""
    claims = idp.claims(jti="token-1")
    principal = await verifier.verify(idp.token(claims))
    assert principal == Principal(
        subject="alice",
        issuer=ISSUER,
        client_id="agent-7",
        scopes=frozenset({"tools:read", "tools:call"}),
        groups=frozenset({"eng", "oncall"}),
        expires_at=clock() + 600,
        token_id="token-1",
    )


async def test_ec_token_with_scp_list_and_client_id(
    verifier: TokenVerifier, idp: LocalIdP
) -> None:
    """An ES256 token reads scopes from scp and falls back to client_id."""
    claims = idp.claims(
        scope=None, scp=["a", "b", 3], azp=None, client_id="cli", groups="eng"
    )
    principal = await verifier.verify(idp.token(claims, kid="ec-1"))
    assert principal.scopes == {"a", "b"}
    assert principal.client_id == "cli"
    assert principal.groups == frozenset()


async def test_client_unknown_without_client_claims(
    verifier: TokenVerifier, idp: LocalIdP
) -> None:
    """A token naming no client gets client_id "unknown"."""
    principal = await verifier.verify(idp.token(idp.claims(azp=None)))
    assert principal.client_id == "unknown"


async def test_audience_as_plain_string(verifier: TokenVerifier, idp: LocalIdP) -> None:
    """An aud that is the broker's resource as a single string is accepted."""
    principal = await verifier.verify(idp.token(idp.claims(aud=RESOURCE)))
    assert principal.subject == "alice"


async def test_expiry_within_leeway_is_accepted(
    verifier: TokenVerifier, idp: LocalIdP, clock: Clock
) -> None:
    """A token expired by less than the leeway still passes."""
    claims = idp.claims(exp=int(clock()) - 10, iat=int(clock()) - 100)
    assert (await verifier.verify(idp.token(claims))).subject == "alice"


# Hostile and broken tokens.


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "é.é.é", "x" * 20_000])
async def test_malformed_token_refused(verifier: TokenVerifier, token: str) -> None:
    """No token, garbage, non-ASCII and oversized strings are refused."""
    await refused(verifier, token)


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none_refused_before_key_lookup(
    verifier: TokenVerifier, idp: LocalIdP, alg: str
) -> None:
    """An unsigned token is refused without the IdP ever being asked."""
    detail = await refused(verifier, idp.unsigned(idp.claims(), alg=alg))
    assert "algorithm" in detail
    assert idp.fetches == 0


async def test_hs256_with_public_key_refused(
    verifier: TokenVerifier, idp: LocalIdP
) -> None:
    """HS256 keyed with the issuer's public key PEM is refused unseen."""
    detail = await refused(verifier, idp.hmac_with_public_key(idp.claims()))
    assert "algorithm 'HS256'" in detail
    assert idp.fetches == 0


async def test_hs256_refused_even_with_keys_cached(
    verifier: TokenVerifier, idp: LocalIdP
) -> None:
    """Algorithm confusion fails also when the RSA key is already in the cache."""
    await verifier.verify(idp.token())
    await refused(verifier, idp.hmac_with_public_key(idp.claims()))


async def test_alg_mismatching_key_refused(
    verifier: TokenVerifier, idp: LocalIdP
) -> None:
    """An ES256 signature presented under the RSA key's kid is refused."""
    token = idp.token(kid="rsa-1", key=idp.keys["ec-1"])
    await refused(verifier, token)


@pytest.mark.parametrize(
    "aud",
    [
        "https://other.example.test/mcp",
        ["https://other.example.test/mcp", "https://third.example.test"],
        [RESOURCE + "/extra"],
        "https://broker.example.test/MCP",
        [],
        None,
    ],
)
async def test_wrong_audience_refused(
    verifier: TokenVerifier, idp: LocalIdP, aud: object
) -> None:
    """aud must contain the broker's resource exactly; absent aud is refused."""
    await refused(verifier, idp.token(idp.claims(aud=aud)))


async def test_wrong_issuer_refused(verifier: TokenVerifier, idp: LocalIdP) -> None:
    """A token whose iss is not a trusted issuer is refused."""
    token = idp.token(idp.claims(iss="https://evil.example.test"))
    detail = await refused(verifier, token)
    assert "not trusted" in detail


async def test_dev_issuer_refused_outside_development(
    config: BrokerConfig, tmp_path: Path
) -> None:
    """A dev-signed token is refused when development mode is off."""
    key = load_or_create_dev_key(tmp_path / "dev.pem")
    verifier = TokenVerifier(config, {DEV_ISSUER: StaticKeys(dev_jwks(key))})
    token = mint_dev_token(key, resource=RESOURCE, subject="dev")
    assert "not trusted" in await refused(verifier, token)


async def test_expired_token_refused(
    verifier: TokenVerifier, idp: LocalIdP, clock: Clock
) -> None:
    """A token expired by more than the leeway is refused."""
    claims = idp.claims(exp=int(clock()) - 31, iat=int(clock()) - 600)
    assert "expired" in await refused(verifier, idp.token(claims))


async def test_nbf_in_future_refused(
    verifier: TokenVerifier, idp: LocalIdP, clock: Clock
) -> None:
    """A token not valid until after the leeway is refused."""
    claims = idp.claims(nbf=int(clock()) + 120)
    assert "nbf" in await refused(verifier, idp.token(claims))


async def test_iat_in_future_refused(
    verifier: TokenVerifier, idp: LocalIdP, clock: Clock
) -> None:
    """A token issued beyond the leeway in the future is refused."""
    claims = idp.claims(iat=int(clock()) + 120)
    assert "iat" in await refused(verifier, idp.token(claims))


@pytest.mark.parametrize("exp", [None, "9999999999", True, float("inf")])
async def test_missing_or_bogus_exp_refused(
    verifier: TokenVerifier, idp: LocalIdP, exp: object
) -> None:
    """exp is required and must be a finite number."""
    await refused(verifier, idp.token(idp.claims(exp=exp)))


@pytest.mark.parametrize("sub", [None, "", 42])
async def test_missing_sub_refused(
    verifier: TokenVerifier, idp: LocalIdP, sub: object
) -> None:
    """A token without a string subject is refused."""
    await refused(verifier, idp.token(idp.claims(sub=sub)))


async def test_tampered_payload_refused(verifier: TokenVerifier, idp: LocalIdP) -> None:
    """Editing the payload of a good token breaks its signature."""
    token = idp.token()
    await verifier.verify(token)
    assert "Signature" in await refused(verifier, tampered(token, sub="admin"))


async def test_crit_header_refused(verifier: TokenVerifier, idp: LocalIdP) -> None:
    """A token declaring critical extensions the broker does not know is refused."""
    token = idp.token(headers={"crit": ["exp"], "exp": 1})
    await refused(verifier, token)


async def test_missing_kid_with_several_keys_refused(
    verifier: TokenVerifier, idp: LocalIdP
) -> None:
    """Without a kid the issuer's key is ambiguous when it publishes several."""
    token = idp.token(kid=None, key=idp.keys["rsa-1"])
    assert "no kid" in await refused(verifier, token)


async def test_missing_kid_with_single_key_accepted(
    verifier: TokenVerifier, idp: LocalIdP
) -> None:
    """Without a kid the issuer's only key is used."""
    idp.withdraw("ec-1")
    token = idp.token(kid=None, key=idp.keys["rsa-1"])
    assert (await verifier.verify(token)).subject == "alice"


async def test_encryption_key_ignored(verifier: TokenVerifier, idp: LocalIdP) -> None:
    """A key published with use "enc" never verifies a signature."""
    idp.publish("enc-1", ec.generate_private_key(ec.SECP256R1()), use="enc")
    await refused(verifier, idp.token(kid="enc-1"))


# Key fetching, rotation and outages.


async def test_flood_of_unknown_kids_costs_one_fetch(
    verifier: TokenVerifier, idp: LocalIdP, clock: Clock
) -> None:
    """Fifty forged kids cause at most one refetch per cooldown."""
    await verifier.verify(idp.token())
    clock.advance(COOLDOWN + 1)
    forger = ec.generate_private_key(ec.SECP256R1())
    tokens = [idp.token(kid=f"forged-{n}", key=forger) for n in range(50)]

    results = await asyncio.gather(
        *(verifier.verify(token) for token in tokens), return_exceptions=True
    )

    assert all(isinstance(result, Unauthenticated) for result in results)
    assert idp.fetches == 2


async def test_unknown_kid_within_cooldown_does_not_fetch(
    verifier: TokenVerifier, idp: LocalIdP
) -> None:
    """An unknown kid right after a fetch is refused without another fetch."""
    await verifier.verify(idp.token())
    forger = ec.generate_private_key(ec.SECP256R1())
    detail = await refused(verifier, idp.token(kid="forged", key=forger))
    assert "'forged'" in detail
    assert idp.fetches == 1


async def test_concurrent_cold_misses_share_one_fetch(
    verifier: TokenVerifier, idp: LocalIdP
) -> None:
    """Twenty first requests at once cause a single JWKS fetch."""
    tokens = [idp.token() for _ in range(20)]
    await asyncio.gather(*(verifier.verify(token) for token in tokens))
    assert idp.fetches == 1


async def test_rotated_key_accepted_after_cooldown(
    verifier: TokenVerifier, idp: LocalIdP, clock: Clock
) -> None:
    """A new key is refused within the cooldown of the last fetch, then accepted."""
    await verifier.verify(idp.token())
    idp.rotate("rsa-1", "rsa-2")
    clock.advance(COOLDOWN / 2)
    await refused(verifier, idp.token(kid="rsa-2"))

    clock.advance(COOLDOWN / 2 + 1)
    principal = await verifier.verify(idp.token(kid="rsa-2"))

    assert principal.subject == "alice"
    assert idp.fetches == 2


async def test_cached_keys_survive_outage_until_cache_seconds(
    verifier: TokenVerifier, idp: LocalIdP, clock: Clock
) -> None:
    """With the IdP down, cached keys verify until cache_seconds, then refuse."""
    await verifier.verify(idp.token())
    idp.down()

    clock.advance(CACHE_SECONDS - 1)
    assert (await verifier.verify(idp.token())).subject == "alice"

    clock.advance(2)
    detail = await refused(verifier, idp.token())
    assert idp.jwks_url in detail


async def test_refetch_after_cache_seconds_when_idp_up(
    verifier: TokenVerifier, idp: LocalIdP, clock: Clock
) -> None:
    """Keys older than cache_seconds are fetched again before use."""
    await verifier.verify(idp.token())
    clock.advance(CACHE_SECONDS + 1)
    await verifier.verify(idp.token())
    assert idp.fetches == 2


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (503, b"{}", "HTTP status 503"),
        (200, b"not json", "Expecting value"),
        (200, b'{"keys": "many"}', "no 'keys' list"),
        (200, b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "no usable"),
        (200, b'{"keys": [{"kty": "RSA", "n": "AQAB"}]}', "no usable"),
    ],
)
async def test_fetch_errors_become_unauthenticated(
    verifier: TokenVerifier, idp: LocalIdP, status: int, body: bytes, reason: str
) -> None:
    """Any JWKS failure is a refusal whose detail names the URL and the fault."""
    idp.status, idp.raw_body = status, body
    detail = await refused(verifier, idp.token())
    assert idp.jwks_url in detail
    assert reason in detail


async def test_slow_idp_times_out(
    config: BrokerConfig, idp: LocalIdP, clock: Clock, http: httpx2.AsyncClient
) -> None:
    """A JWKS answer slower than the timeout is a refusal, not a hang."""
    verifier = make_verifier(config, idp, clock, http, timeout=0.1)
    idp.delay_seconds = 0.5
    assert "Timeout" in await refused(verifier, idp.token())


async def test_unreachable_idp_without_cache_refused(
    config: BrokerConfig, idp: LocalIdP, clock: Clock
) -> None:
    """With no client given and the IdP down, the first token is refused."""
    verifier = make_verifier(config, idp, clock, None)
    idp.down()
    assert "failed" in await refused(verifier, idp.token())


async def test_own_http_client_used_when_none_given(
    config: BrokerConfig, idp: LocalIdP, clock: Clock
) -> None:
    """Without an http_client the cache fetches with a client of its own."""
    verifier = make_verifier(config, idp, clock, None)
    assert (await verifier.verify(idp.token())).subject == "alice"


# The verified-token cache.


async def test_same_token_is_cache_hit(
    config: BrokerConfig,
    idp: LocalIdP,
    clock: Clock,
    http: httpx2.AsyncClient,
) -> None:
    """A verified token is answered from cache even after its keys lapse."""
    verifier = make_verifier(config, idp, clock, http, cache_seconds=60)
    token = idp.token()
    await verifier.verify(token)
    idp.down()
    clock.advance(120)

    assert (await verifier.verify(token)).subject == "alice"
    await refused(verifier, idp.token())
    assert idp.fetches == 1


async def test_cache_entry_ends_at_expiry(
    verifier: TokenVerifier, idp: LocalIdP, clock: Clock
) -> None:
    """A cached token is refused once it expires."""
    token = idp.token(idp.claims(exp=int(clock()) + 60))
    await verifier.verify(token)
    clock.advance(100)
    assert "expired" in await refused(verifier, token)


async def test_cache_entry_ends_after_five_minutes(
    config: BrokerConfig,
    idp: LocalIdP,
    clock: Clock,
    http: httpx2.AsyncClient,
) -> None:
    """A cached token is verified afresh after 300 s, however long it lives."""
    verifier = make_verifier(config, idp, clock, http, cache_seconds=60)
    token = idp.token(idp.claims(exp=int(clock()) + 3600))
    await verifier.verify(token)
    idp.down()
    clock.advance(301)
    await refused(verifier, token)


async def test_cache_drops_oldest_when_full(
    config: BrokerConfig,
    idp: LocalIdP,
    clock: Clock,
    http: httpx2.AsyncClient,
) -> None:
    """Beyond its size the cache forgets the oldest token first."""
    cache = JwksCache(idp.jwks_url, http_client=http, cache_seconds=60, clock=clock)
    verifier = TokenVerifier(config, {ISSUER: cache}, clock=clock, cache_size=2)
    first, second, third = (idp.token() for _ in range(3))
    for token in (first, second, third):
        await verifier.verify(token)
    idp.down()
    clock.advance(120)

    await refused(verifier, first)
    assert (await verifier.verify(third)).subject == "alice"


# Development mode.


async def test_build_verifier_trusts_dev_key_in_development(tmp_path: Path) -> None:
    """In development mode a minted dev token verifies through build_verifier."""
    config = BrokerConfig(
        resource=RESOURCE, development=True, dev_key_path=tmp_path / "k" / "dev.pem"
    )
    verifier = build_verifier(config)
    key = load_or_create_dev_key(config.dev_key_path)
    token = mint_dev_token(
        key, resource=RESOURCE, subject="dev", groups=["ops"], scopes=["tools:call"]
    )
    principal = await verifier.verify(token)
    assert (principal.issuer, principal.client_id) == (DEV_ISSUER, "dev-agent")
    assert principal.groups == {"ops"}
    assert principal.scopes == {"tools:call"}


def test_dev_key_file_is_private_and_stable(tmp_path: Path) -> None:
    """The dev key is created 0600 in a new directory and reloaded unchanged."""
    path = tmp_path / "new" / "dev.pem"
    first = load_or_create_dev_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert dev_jwks(load_or_create_dev_key(path)) == dev_jwks(first)
    kid = dev_jwks(first)["keys"][0]["kid"]
    token = mint_dev_token(first, resource=RESOURCE, subject="dev")
    assert jwt.get_unverified_header(token)["kid"] == kid


def test_dev_key_readable_by_others_refused(tmp_path: Path) -> None:
    """A dev key file that others may read stops the start."""
    path = tmp_path / "dev.pem"
    load_or_create_dev_key(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_dev_key(path)


def test_build_verifier_needs_jwks_url_with_issuer() -> None:
    """An issuer without a JWKS URL is a configuration error."""
    config = BrokerConfig(
        resource=RESOURCE, development=True, auth=AuthConfig(issuer=ISSUER)
    )
    with pytest.raises(ConfigError, match="jwks_url"):
        build_verifier(config)
