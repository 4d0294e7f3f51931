"""Authentication: bearer tokens in, verified Principals out.

``tokens`` verifies JWTs against the keys of trusted issuers (``jwks``, and
``devkey`` in development mode); ``edge`` is the ASGI middleware that turns
a missing or failing token into a 401 or 403 before the MCP endpoint.
"""

from broker.auth.edge import (
    PRINCIPAL_KEY,
    BearerAuth,
    OnDenied,
    protected_resource_metadata,
)
from broker.auth.jwks import JwksCache, KeySource, StaticKeys
from broker.auth.tokens import TokenVerifier, build_verifier

__all__ = [
    "PRINCIPAL_KEY",
    "BearerAuth",
    "JwksCache",
    "KeySource",
    "OnDenied",
    "StaticKeys",
    "TokenVerifier",
    "build_verifier",
    "protected_resource_metadata",
]
