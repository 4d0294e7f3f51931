"""Telling a team about each new pending action, by a JSON POST to a webhook.

The POST is made in the background, after the action is stored, so a slow
or failing webhook delays no call and loses no action: the action stays on
the page and in the API whatever the webhook answers. A failure is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import httpx2

from broker.approvals.model import PendingAction

log = logging.getLogger("broker.approvals.webhook")

TIMEOUT_SECONDS = 5.0
# Announcements waiting to be posted; past this, new ones are dropped (logged).
QUEUE_SIZE = 256


class Webhook:
    def __init__(
        self,
        url: str,
        describe: Callable[[PendingAction], dict[str, Any]],
        *,
        timeout: float = TIMEOUT_SECONDS,
    ) -> None:
        self.url = url
        self._describe = describe
        self._timeout = timeout
        self._send, self._receive = anyio.create_memory_object_stream[dict[str, Any]](
            QUEUE_SIZE
        )

    def announce(self, action: PendingAction) -> None:
        """Queue one POST about ``action``; never blocks, never raises."""
        body = {"event": "approval.pending", "action": self._describe(action)}
        try:
            self._send.send_nowait(body)
        except anyio.WouldBlock:
            log.warning("webhook queue full; action %s not announced", action.id)

    async def run(self) -> None:
        """Post queued announcements one by one until cancelled."""
        async with httpx2.AsyncClient(timeout=self._timeout) as http:
            async for body in self._receive:
                await self._post(http, body)

    async def _post(self, http: httpx2.AsyncClient, body: dict[str, Any]) -> None:
        action_id = body["action"]["id"]
        try:
            response = await http.post(self.url, json=body)
        except httpx2.HTTPError as exc:
            log.warning(
                "webhook failed for action %s: %s", action_id, type(exc).__name__
            )
            return
        if response.status_code >= 300:
            log.warning(
                "webhook answered %d for action %s", response.status_code, action_id
            )
