"""Real broker processes for end-to-end tests.

A broker is started as its own process (``broker serve``) on a free loopback
port, with a configuration written for the test: the test identity provider
as issuer, the repository's policies unless told otherwise, and manifests
whose stdio servers record every request they receive to a file the test
reads.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from broker.audit import AuditEntry, SqliteStore

REPO = Path(__file__).resolve().parent.parent
POLICIES = REPO / "cedar_policies"
DEMO_MANIFEST = REPO / "tool_manifests" / "demo.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningBroker:
    port: int
    workdir: Path
    process: subprocess.Popen[bytes]

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.origin}/mcp"

    @property
    def record_path(self) -> Path:
        return self.workdir / "downstream-record.jsonl"

    def downstream_saw(self) -> list[dict[str, Any]]:
        """Every request the demo server received, in order."""
        if not self.record_path.exists():
            return []
        lines = self.record_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines]

    def audit(self) -> list[AuditEntry]:
        store = SqliteStore(self.workdir / "state.db")
        try:
            return store.entries(limit=100_000)
        finally:
            store.close()

    def log(self) -> str:
        return (self.workdir / "broker.log").read_text(
            encoding="utf-8", errors="replace"
        )


def write_config(
    workdir: Path,
    port: int,
    idp_issuer: str,
    jwks_url: str,
    *,
    policy_dir: Path = POLICIES,
    extra_broker: str = "",
    extra_tables: str = "",
    store: str = 'path = "state.db"',
    resource: str = "",
) -> Path:
    """A configuration for a broker on ``port``; ``extra_tables`` is appended.

    ``store`` is the body of the ``[store]`` table. ``resource`` is the
    broker's own URL unless given: replicas share the one of their service.
    """
    resource = resource or f"http://127.0.0.1:{port}/mcp"
    config = workdir / "broker.toml"
    config.write_text(
        f"""
[broker]
resource = "{resource}"
port = {port}
allowed_hosts = ["127.0.0.1:{port}"]
allowed_origins = ["http://127.0.0.1:{port}"]
policy_dir = "{policy_dir}"
manifest_dir = "manifests"
call_timeout_seconds = 5
{extra_broker}

[auth]
issuer = "{idp_issuer}"
jwks_url = "{jwks_url}"

[store]
{store}

{extra_tables}
""",
        encoding="utf-8",
    )
    return config


def install_manifest(workdir: Path, manifest: dict[str, Any] | None = None) -> None:
    target = workdir / "manifests"
    target.mkdir(exist_ok=True)
    if manifest is None:
        shutil.copy(DEMO_MANIFEST, target / "demo.json")
    else:
        path = target / f"{manifest['server']}.json"
        path.write_text(json.dumps(manifest), encoding="utf-8")


def stdio_manifest(*args: str, **transport: Any) -> dict[str, Any]:
    """The demo manifest's pins, served by ``{python} <args>`` instead."""
    manifest = demo_manifest()
    manifest["transport"] = {
        "type": "stdio",
        "command": "{python}",
        "args": list(args),
        **transport,
    }
    return manifest


def demo_manifest() -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads(DEMO_MANIFEST.read_text(encoding="utf-8"))
    return manifest


@contextmanager
def running_broker(
    workdir: Path,
    port: int,
    *,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
) -> Iterator[RunningBroker]:
    environment = {
        **os.environ,
        "DEMO_RECORD_PATH": str(workdir / "downstream-record.jsonl"),
        **(env or {}),
    }
    log = (workdir / "broker.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "broker.cli",
            "-c",
            str(workdir / "broker.toml"),
            "serve",
        ],
        cwd=workdir,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    broker = RunningBroker(port=port, workdir=workdir, process=process)
    try:
        _wait(broker, "/readyz" if wait_ready else "/healthz")
        yield broker
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait(broker: RunningBroker, path: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if broker.process.poll() is not None:
            raise RuntimeError(f"broker exited early:\n{broker.log()}")
        try:
            response = httpx2.get(broker.origin + path, timeout=1.0)
            if response.status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"broker not ready on {path}:\n{broker.log()}")


@asynccontextmanager
async def agent(
    url: str,
    token: str | None,
    *,
    mode: str = "legacy",
    headers: dict[str, str] | None = None,
    event_hooks: dict[str, list[Callable[..., Any]]] | None = None,
    **callbacks: Any,
) -> AsyncIterator[Client]:
    """The SDK's own client, as an agent would hold it, pointed at ``url``.

    ``event_hooks`` go to its HTTP client, to watch the exchanges;
    ``callbacks`` are the client's own (``sampling_callback`` and the like).
    """
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    async with httpx2.AsyncClient(
        headers=all_headers, timeout=30.0, event_hooks=event_hooks
    ) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=mode, cache=None, **callbacks) as client:  # type: ignore[arg-type]
            yield client
