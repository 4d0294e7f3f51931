"""Agents sending a mix of tool calls, and what became of each call.

Every agent acts for a user of the writers group and sends, in turn, a
call policy allows (``demo.echo``), one it forbids (a card number on its
way to ``demo.search_web``) and one that needs a human's approval
(``demo.delete_note``, with a title no approval was ever given for).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
from mcp import Client

from tests.approvals_support import DELETE, agent_token
from tests.harness import agent
from tests.idp import LocalIdP

# Luhn-valid, so the classifier finds a card number in it.
CARD = "4111 1111 1111 1111"


@dataclass(frozen=True)
class Kind:
    """One kind of call: the tool, its arguments, and what policy decides."""

    name: str
    tool: str
    arguments: Callable[[str], dict[str, Any]]
    # The category the agent is told when all is well: "allowed" for a call
    # that went through, else the category of the decided denial.
    decided: str


KINDS = (
    Kind("allowed", "demo.echo", lambda tag: {"text": tag}, "allowed"),
    Kind(
        "denied",
        "demo.search_web",
        lambda tag: {"query": f"{tag} {CARD}"},
        "forbidden",
    ),
    Kind("approval", DELETE, lambda tag: {"title": tag}, "pending_approval"),
)


@dataclass(frozen=True)
class Outcome:
    """One call: its kind, when it was sent and answered, and the category told."""

    kind: Kind
    started: float
    ended: float
    category: str

    @property
    def went_through(self) -> bool:
        return self.category == "allowed"


def category_of(result: Any) -> str:
    """ "allowed" for a result of the tool itself, else the denial's category."""
    if not result.is_error:
        return "allowed"
    return str(result.structured_content["broker"]["category"])


async def call_once(client: Client, kind: Kind, tag: str) -> Outcome:
    started = time.monotonic()
    result = await client.call_tool(kind.tool, kind.arguments(tag))
    return Outcome(kind, started, time.monotonic(), category_of(result))


async def run_agent(
    url: str,
    idp: LocalIdP,
    name: str,
    outcomes: list[Outcome],
    *,
    calls: int | None = None,
    until: anyio.Event | None = None,
) -> None:
    """One agent for user ``name``: ``calls`` calls, or calls until ``until`` is set.

    Call ``n`` is of kind ``KINDS[n % 3]``, its arguments tagged with the
    agent's name and ``n`` so that no two calls are the same.
    """
    async with agent(url, agent_token(idp, name)) as client:
        n = 0
        while (calls is None or n < calls) and not (until and until.is_set()):
            kind = KINDS[n % len(KINDS)]
            outcomes.append(await call_once(client, kind, f"{name} call {n}"))
            n += 1
