"""Broker replicas for end-to-end tests: processes that share one Redis.

Every replica is its own ``broker serve`` on its own port and directory,
with the same resource URI (that of the service behind a load balancer),
the same policies and manifests, and the same ``[store]`` table: the audit
record and the approvals in Redis under one prefix.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from broker.audit import AuditEntry
from broker.audit_redis import RedisStore
from tests.harness import (
    RunningBroker,
    free_port,
    install_manifest,
    running_broker,
    write_config,
)
from tests.idp import LocalIdP
from tests.redis_support import new_prefix, remove_keys
from tests.stores import REDIS_URL, redis_client

# Long enough for a Redis on loopback under a busy test machine.
REDIS_TIMEOUT = 0.5


@dataclass(frozen=True)
class SharedRedis:
    """Where replicas keep their record and approvals: a URL and a prefix."""

    url: str
    prefix: str

    def store_table(self, timeout: float = REDIS_TIMEOUT) -> str:
        return (
            'type = "redis"\n'
            'path = "state.db"\n'
            f'redis_url = "{self.url}"\n'
            f'redis_key_prefix = "{self.prefix}"\n'
            f"redis_timeout_seconds = {timeout}\n"
        )

    def record(self) -> list[AuditEntry]:
        """Every audit entry the replicas wrote, oldest first."""
        store = RedisStore.connect(self.url, timeout=5.0, prefix=self.prefix)
        try:
            return store.entries(limit=1_000_000)
        finally:
            store.close()


@contextmanager
def shared_redis() -> Iterator[SharedRedis]:
    """A fresh prefix in the Redis on 127.0.0.1:6379, its keys removed after."""
    client = redis_client()
    shared = SharedRedis(REDIS_URL, new_prefix())
    try:
        yield shared
    finally:
        remove_keys(client, shared.prefix)
        client.close()


def approvals_table(wait: float) -> str:
    return f"[approvals]\nwait_seconds = {wait}\nexpiry_seconds = 120\n"


@contextmanager
def running_replicas(
    base: Path,
    idp: LocalIdP,
    redis: SharedRedis,
    *,
    count: int = 2,
    wait: float = 3.0,
    timeout: float = REDIS_TIMEOUT,
    wait_ready: bool = True,
) -> Iterator[list[RunningBroker]]:
    """``count`` replicas whose calls wait ``wait`` seconds for an approver.

    ``idp`` issues tokens for the service the replicas share, whichever
    replica a token is sent to.
    """
    ports = [free_port() for _ in range(count)]
    resource = f"http://127.0.0.1:{ports[0]}/mcp"
    idp.reset(time.time)  # type: ignore[arg-type]
    idp.resource = resource
    starting = []
    for n, port in enumerate(ports):
        workdir = base / f"replica-{n}"
        workdir.mkdir()
        write_config(
            workdir,
            port,
            idp.issuer,
            idp.jwks_url,
            store=redis.store_table(timeout),
            extra_tables=approvals_table(wait),
            resource=resource,
        )
        install_manifest(workdir)
        starting.append(running_broker(workdir, port, wait_ready=wait_ready))
    # Side by side: a broker takes seconds to start on a busy machine.
    with ExitStack() as stack, ThreadPoolExecutor(count) as pool:
        yield list(pool.map(stack.enter_context, starting))


def audit_verify(replica: RunningBroker) -> subprocess.CompletedProcess[str]:
    """``broker audit verify`` as an operator runs it beside ``replica``."""
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", "-c", "broker.toml", "audit", "verify"],
        cwd=replica.workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
