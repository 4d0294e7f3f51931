"""Which server a resource belongs to, and who follows its updates.

Resources are addressed by URI, not by a server-qualified name, so the broker
learns each URI's server from the servers' own lists: a listed resource by
its URI, anything else by the first listed template it matches. A URI that no
listing accounts for belongs to nobody and is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mcp.server.session import ServerSession
from mcp.shared.uri_template import InvalidUriTemplate, UriTemplate

log = logging.getLogger("broker.resources")


@dataclass
class Templates:
    """Resource templates each server listed, in the order first seen."""

    _owners: dict[str, tuple[UriTemplate, str]] = field(default_factory=dict)

    def add(self, template: str, server: str) -> bool:
        """Remember ``server``'s template; False if another server has it."""
        known = self._owners.get(template)
        if known is not None:
            return known[1] == server
        try:
            parsed = UriTemplate.parse(template)
        except InvalidUriTemplate as exc:
            log.warning("server %s lists a bad template %r: %s", server, template, exc)
            return False
        self._owners[template] = (parsed, server)
        return True

    def owner(self, uri: str) -> str | None:
        """The server whose template matches ``uri``, if any."""
        for parsed, server in self._owners.values():
            if parsed.match(uri) is not None:
                return server
        return None

    def owner_of_template(self, template: str) -> str | None:
        known = self._owners.get(template)
        return known[1] if known is not None else None


@dataclass
class Subscriptions:
    """Agent sessions following a resource, by URI.

    The broker subscribes downstream once per URI, for the first agent, and
    unsubscribes when the last one leaves.
    """

    _followers: dict[str, dict[str, ServerSession]] = field(default_factory=dict)

    def add(self, uri: str, agent: str, session: ServerSession) -> bool:
        """Follow ``uri`` for ``agent``; True when it is the first follower."""
        followers = self._followers.setdefault(uri, {})
        first = not followers
        followers[agent] = session
        return first

    def remove(self, uri: str, agent: str) -> bool:
        """Stop following; True when nobody follows ``uri`` any more."""
        followers = self._followers.get(uri)
        if followers is None or followers.pop(agent, None) is None:
            return False
        if followers:
            return False
        del self._followers[uri]
        return True

    async def announce(self, uri: str) -> list[str]:
        """Tell every follower of ``uri`` that it changed.

        A follower that cannot be reached (its session ended) is dropped.
        Returns the URIs nobody follows any more, for the caller to
        unsubscribe downstream.
        """
        emptied: list[str] = []
        for agent, session in list(self._followers.get(uri, {}).items()):
            try:
                await session.send_resource_updated(uri)
            except Exception as exc:
                log.info("update of %s did not reach session %s: %s", uri, agent, exc)
                if self.remove(uri, agent):
                    emptied.append(uri)
        return emptied

    def __len__(self) -> int:
        return sum(len(f) for f in self._followers.values())
