"""The development signing key: tokens for trying the broker without an IdP.

Tokens signed with this key carry the issuer ``DEV_ISSUER``, which the broker
trusts only when ``config.development`` is true. Outside development mode
the key may exist on disk and tokens may be minted with it, but the verifier
refuses them as coming from an untrusted issuer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from broker.config import DEV_ISSUER
from broker.errors import ConfigError

DEV_ALGORITHM = "ES256"


def load_or_create_dev_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read the P-256 key at ``path``, creating it (mode 0600) if absent.

    Only meaningful with ``config.development``: the verifier trusts what
    this key signs in development mode and nowhere else.
    """
    if not path.exists():
        _create_key_file(path)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise ConfigError(f"development key {path} is readable by others: chmod 600")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"development key {path} is unreadable: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
        key.curve, ec.SECP256R1
    ):
        raise ConfigError(f"development key {path} is not an EC P-256 key")
    return key


def _create_key_file(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # O_EXCL: if another process created the file meanwhile, keep theirs.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as file:
        file.write(pem)


def dev_jwks(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """The public JWK set of the development key (development mode only)."""
    public = _public_jwk(key)
    return {"keys": [{**public, "kid": _thumbprint(public), "use": "sig"}]}


def mint_dev_token(
    key: ec.EllipticCurvePrivateKey,
    *,
    resource: str,
    subject: str,
    groups: Iterable[str] = (),
    scopes: Iterable[str] = (),
    client_id: str = "dev-agent",
    ttl_seconds: int = 3600,
    clock: Callable[[], float] = time.time,
) -> str:
    """A token for ``resource`` signed with the development key.

    The broker accepts it only when ``config.development`` is true.
    """
    now = int(clock())
    claims = {
        "iss": DEV_ISSUER,
        "sub": subject,
        "aud": [resource],
        "client_id": client_id,
        "scope": " ".join(scopes),
        "groups": list(groups),
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
    }
    kid = _thumbprint(_public_jwk(key))
    return jwt.encode(claims, key, algorithm=DEV_ALGORITHM, headers={"kid": kid})


def _public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    public = {name: jwk[name] for name in ("kty", "crv", "x", "y")}
    public["alg"] = DEV_ALGORITHM
    return public


def _thumbprint(public: dict[str, Any]) -> str:
    """RFC 7638 thumbprint: SHA-256 of the required members, sorted, no spaces."""
    required = {name: public[name] for name in ("crv", "kty", "x", "y")}
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
