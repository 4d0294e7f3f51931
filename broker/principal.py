"""Who is calling: the verified identity behind a bearer token."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Principal:
    """A caller whose token has passed every check.

    Only the token verifier builds one; nothing here is unverified input.
    """

    subject: str
    issuer: str
    client_id: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    groups: frozenset[str] = field(default_factory=frozenset)
    expires_at: float = 0.0
    token_id: str | None = None
