"""End to end: broker processes whose audit record is kept in Redis."""

from __future__ import annotations

import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx2
import pytest

from tests.harness import (
    RunningBroker,
    agent,
    free_port,
    install_manifest,
    running_broker,
    write_config,
)
from tests.idp import LocalIdP
from tests.stores import REDIS_URL, RedisBacking, redis_backing

pytestmark = pytest.mark.redis


def _store_table(url: str, prefix: str) -> str:
    return (
        f'path = "state.db"\ntype = "redis"\nredis_url = "{url}"\n'
        f'redis_key_prefix = "{prefix}"\nredis_timeout_seconds = 0.5'
    )


def _workdir(root: Path, name: str, port: int, idp: LocalIdP, store: str) -> Path:
    workdir = root / name
    workdir.mkdir()
    write_config(workdir, port, idp.issuer, idp.jwks_url, store=store)
    install_manifest(workdir)
    return workdir


def _token(idp: LocalIdP, broker: RunningBroker) -> str:
    return idp.token(idp.claims(aud=[broker.url]))


@pytest.fixture
def kept() -> Iterator[RedisBacking]:
    with redis_backing() as backing:
        yield backing


@pytest.fixture
def idp(session_idp: LocalIdP) -> LocalIdP:
    session_idp.reset(time.time)  # type: ignore[arg-type]
    return session_idp


async def _echo(broker: RunningBroker, token: str, texts: list[str]) -> None:
    async with agent(broker.url, token) as client:
        for text in texts:
            result = await client.call_tool("demo.echo", {"text": text})
            assert result.is_error is False


async def test_two_brokers_keep_one_chain_that_verifies(
    tmp_path: Path, idp: LocalIdP, kept: RedisBacking
) -> None:
    """Calls on two broker processes land in one Redis chain; verify counts them all."""
    store = _store_table(REDIS_URL, kept.prefix)
    ports = free_port(), free_port()
    first = _workdir(tmp_path, "a", ports[0], idp, store)
    second = _workdir(tmp_path, "b", ports[1], idp, store)

    with running_broker(first, ports[0]) as a, running_broker(second, ports[1]) as b:
        async with anyio.create_task_group() as calls:
            calls.start_soon(_echo, a, _token(idp, a), [f"a{n}" for n in range(6)])
            calls.start_soon(_echo, b, _token(idp, b), [f"b{n}" for n in range(6)])
    command = [sys.executable, "-m", "broker.cli", "-c", str(first / "broker.toml")]
    with anyio.fail_after(30):
        verified = await anyio.run_process([*command, "audit", "verify"], check=False)

    reader = kept.open()
    count = reader.count()
    texts = {
        e.arguments["text"]
        for e in reader.entries(limit=10_000)
        if e.method == "tools/call" and isinstance(e.arguments, dict)
    }
    reader.close()
    output = verified.stdout.decode()
    assert verified.returncode == 0, output + verified.stderr.decode()
    assert output.startswith(f"chain intact: {count} entries checked")
    assert texts == {f"a{n}" for n in range(6)} | {f"b{n}" for n in range(6)}
    assert "audit_entries" not in _tables(first / "state.db")


def _tables(path: Path) -> set[str]:
    """The tables in the SQLite file at ``[store] path``, none if it is new."""
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master")}


async def test_a_broker_without_redis_starts_denies_and_says_so(
    tmp_path: Path, idp: LocalIdP
) -> None:
    """Redis unreachable: the broker serves, is not ready, and denies every call."""
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    port = free_port()
    workdir = _workdir(tmp_path, "a", port, idp, _store_table(nowhere, "none:"))

    with running_broker(workdir, port, wait_ready=False) as broker:
        ready = httpx2.get(f"{broker.origin}/readyz", timeout=5.0)
        async with agent(broker.url, _token(idp, broker)) as client:
            result = await client.call_tool("demo.echo", {"text": "unrecorded"})
        log = broker.log()

    assert ready.status_code == 503
    record = ready.json()["record"]
    assert record["writable"] is False
    assert "ConnectionError" in record["last_error"]
    assert result.is_error
    assert result.structured_content["broker"]["category"] == "record_unavailable"
    assert not [r for r in broker.downstream_saw() if r.get("tool") == "echo"]
    assert "AUDIT STORE UNREACHABLE" in log
