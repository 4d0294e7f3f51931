"""The broker presents its own credential downstream; the agent's token stays home."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.harness import (
    agent,
    demo_manifest,
    free_port,
    install_manifest,
    running_broker,
    write_config,
)
from tests.idp import LocalIdP, serving


@pytest.fixture
def http_demo(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The demo server over Streamable HTTP, recording the headers it receives."""
    port = free_port()
    record = tmp_path / "http-demo-record.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "broker.demo_server", "--http", str(port)],
        env={"DEMO_RECORD_PATH": str(record), "PATH": "/usr/bin:/bin"},
    )
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        _wait_for_port(port)
        yield url, record
    finally:
        process.terminate()
        process.wait(timeout=10)


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx2.get(f"http://127.0.0.1:{port}/", timeout=0.5)
            return
        except httpx2.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("demo server did not start")


def authorizations(record: Path) -> list[str]:
    """The Authorization header of every MCP request the server received."""
    lines = record.read_text(encoding="utf-8").splitlines()
    return [
        entry["authorization"]
        for entry in map(json.loads, lines)
        if entry["kind"] == "http" and entry["path"] == "/mcp"
    ]


def http_manifest(url: str, credential: dict[str, Any]) -> dict[str, Any]:
    manifest = demo_manifest()
    manifest["transport"] = {"type": "http", "url": url}
    manifest["credential"] = credential
    return manifest


async def test_static_secret_goes_downstream_not_the_agent_token(
    tmp_path: Path, live_idp: LocalIdP, port: int, http_demo: tuple[str, Path]
) -> None:
    """An HTTP server sees the broker's secret on every request, never the agent's."""
    url, record = http_demo
    write_config(tmp_path, port, live_idp.issuer, live_idp.jwks_url)
    install_manifest(
        tmp_path, http_manifest(url, {"type": "env", "variable": "DEMO_SECRET"})
    )
    agent_token = live_idp.token()
    with running_broker(tmp_path, port, env={"DEMO_SECRET": "broker-own-secret"}) as b:
        async with agent(b.url, agent_token) as client:
            result = await client.call_tool("demo.add", {"a": 1, "b": 2})
    assert result.is_error is False
    seen = authorizations(record)
    assert seen
    assert set(seen) == {"Bearer broker-own-secret"}
    assert agent_token not in record.read_text(encoding="utf-8")


class TokenEndpoint:
    """An OAuth token endpoint of the test's own, for the client-credentials grant."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []

    async def token(self, request: Request) -> Response:
        form = dict(await request.form())
        basic = request.headers.get("authorization", "")
        expected = "Basic " + base64.b64encode(b"broker-client:cc-secret").decode()
        if basic != expected or form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        self.requests.append({k: str(v) for k, v in form.items()})
        issued = f"cc-token-{len(self.requests)}"
        return JSONResponse({"access_token": issued, "expires_in": 3600})


async def test_client_credentials_token_is_fetched_once_and_used(
    tmp_path: Path, live_idp: LocalIdP, port: int, http_demo: tuple[str, Path]
) -> None:
    """The broker fetches its own token for the downstream's audience and reuses it."""
    url, record = http_demo
    endpoint = TokenEndpoint()
    app = Starlette(routes=[Route("/token", endpoint.token, methods=["POST"])])
    with serving(app) as token_server:
        credential = {
            "type": "client_credentials",
            "token_url": f"{token_server.url}/token",
            "client_id": "broker-client",
            "client_secret_variable": "DEMO_CC_SECRET",
            "audience": url,
            "scope": "demo.call",
        }
        write_config(tmp_path, port, live_idp.issuer, live_idp.jwks_url)
        install_manifest(tmp_path, http_manifest(url, credential))
        env = {"DEMO_CC_SECRET": "cc-secret"}
        with running_broker(tmp_path, port, env=env) as broker:
            async with agent(broker.url, live_idp.token()) as client:
                for n in range(3):
                    await client.call_tool("demo.add", {"a": n, "b": 1})
    assert len(endpoint.requests) == 1
    assert endpoint.requests[0]["resource"] == url
    assert endpoint.requests[0]["scope"] == "demo.call"
    assert set(authorizations(record)) == {"Bearer cc-token-1"}
