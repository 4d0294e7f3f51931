"""Redis for the approvals tests: the shared one, one of a test's own, a mute one.

- ``redis_approvals``: approval stores under a fresh prefix in the Redis on
  127.0.0.1:6379, as many as a test wants (each one a replica), the keys
  removed afterwards;
- ``RedisServer``: a ``redis-server`` process of the test's own on a free
  port, which the test may kill and start again (never the shared one);
- ``mute_port``: a port that accepts connections and never answers.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import AuthenticationError, RedisError

from broker.approvals.store_redis import RedisApprovalStore
from tests.harness import free_port
from tests.stores import REDIS_URL, redis_client

TIMEOUT = 0.5
START_SECONDS = 10.0


def new_prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"


def remove_keys(client: Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)


@contextmanager
def redis_approvals(
    url: str = REDIS_URL,
) -> Iterator[Callable[[], RedisApprovalStore]]:
    """A factory of stores sharing one fresh prefix; all closed and cleaned after."""
    client = redis_client()
    prefix = new_prefix()
    opened: list[RedisApprovalStore] = []

    def open_store() -> RedisApprovalStore:
        store = RedisApprovalStore.connect(url, timeout=TIMEOUT, prefix=prefix)
        opened.append(store)
        return store

    try:
        yield open_store
    finally:
        for store in opened:
            store.close()
        remove_keys(client, prefix)
        client.close()


class RedisServer:
    """A ``redis-server`` of the test's own on loopback, killed at the end.

    With ``directory`` it keeps an append-only file there, so what it held
    survives a kill and a start on the same port; without, it keeps nothing.
    ``options`` go on its command line (``--requirepass``, say). The test may
    pause it with SIGSTOP through ``process``.
    """

    def __init__(
        self, directory: Path | None = None, options: Sequence[str] = ()
    ) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed (.ci/run needs it too)")
        self.port = free_port()
        self.directory = directory
        self.options = tuple(options)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = ["--appendonly", "no"]
        if self.directory is not None:
            persistence = ["--appendonly", "yes", "--dir", str(self.directory)]
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--daemonize",
                "no",
                *persistence,
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_answering()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last save; what was written stays written."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def client(self, password: str | None = None) -> Redis:
        return Redis.from_url(
            self.url, password=password, socket_timeout=2, decode_responses=True
        )

    def _wait_answering(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        with self.client() as client:
            while time.monotonic() < deadline:
                try:
                    if client.ping():
                        return
                except AuthenticationError:
                    return  # it answers; it wants a password first
                except RedisError as exc:
                    if "NOAUTH" in str(exc):
                        return
                    time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer")


@contextmanager
def redis_server(
    directory: Path | None = None, options: Sequence[str] = ()
) -> Iterator[RedisServer]:
    """A started ``RedisServer``, killed when the block ends."""
    server = RedisServer(directory, options)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@contextmanager
def mute_port() -> Iterator[int]:
    """A loopback port whose connections are accepted and never answered.

    The kernel completes each handshake into the listen backlog; nothing ever
    reads, so a client's command waits for a reply until its own timeout.
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield int(listener.getsockname()[1])
