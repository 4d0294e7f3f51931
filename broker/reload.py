"""Policy hot reload: a changed policy directory takes effect without a restart.

The watcher looks at every file under the policy directory once a second
(path, modification time, size and a hash of the content). When anything
changed it loads the whole set again, schema included, for the same pinned
tools. A set that loads replaces the one in force in a single assignment,
so a decision uses either the old set or the new, never a mix. A set that
does not load changes nothing: the last valid set stays in force, the error
is logged, and readiness reports it until a valid set is loaded again.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from broker.policy import PolicyEngine

if TYPE_CHECKING:
    from broker.mediation import Mediator

log = logging.getLogger("broker.reload")

POLL_SECONDS = 1.0

Fingerprint = tuple[tuple[str, int, int, str], ...]


def fingerprint(policy_dir: Path) -> Fingerprint:
    """What the directory holds now; any edit, however small, changes it."""
    seen = []
    for path in sorted(policy_dir.rglob("*")):
        try:
            if not path.is_file():
                continue
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            # Unreadable now; the reload that follows says why.
            seen.append((str(path), -1, -1, f"unreadable: {exc.strerror}"))
            continue
        seen.append((str(path), stat.st_mtime_ns, stat.st_size, digest))
    return tuple(seen)


class PolicyWatcher:
    """Reloads the mediator's policy set when the policy directory changes."""

    def __init__(
        self, mediator: Mediator, policy_dir: Path, *, interval: float = POLL_SECONDS
    ) -> None:
        self.mediator = mediator
        self.policy_dir = policy_dir
        self.interval = interval
        self.error = ""  # why the newest files do not load; empty when they do
        self._seen = fingerprint(policy_dir)

    @property
    def status(self) -> str:
        """``ok``, or ``error: ...`` while the files on disk do not load."""
        return f"error: {self.error}" if self.error else "ok"

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await anyio.sleep(self.interval)
            await self.poll()

    async def poll(self) -> bool:
        """Reload if anything changed since the last look; True if swapped."""
        seen = await anyio.to_thread.run_sync(fingerprint, self.policy_dir)
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            engine = await anyio.to_thread.run_sync(self._load)
        except Exception as exc:
            # Whatever went wrong (a PolicyError names the file and policy),
            # the set in force was valid and stays.
            self.error = str(exc) or type(exc).__name__
            log.error("policy reload failed, last valid set kept: %s", self.error)
            return False
        self.mediator.engine = engine
        self.error = ""
        log.info(
            "policies reloaded from %s: %d policies",
            self.policy_dir,
            engine.policy_count,
        )
        return True

    def _load(self) -> PolicyEngine:
        return self.mediator.engine.reload(
            self.policy_dir, self.mediator.catalog.pinned
        )
