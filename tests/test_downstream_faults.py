"""Downstream servers that die, hang or talk garbage: denied, recorded, restarted."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.shared.exceptions import MCPError

from tests.harness import (
    RunningBroker,
    agent,
    install_manifest,
    running_broker,
    stdio_manifest,
    write_config,
)
from tests.idp import LocalIdP
from tests.waiting import readyz, until

FAULTY_SERVER = Path(__file__).resolve().parent / "faulty_server.py"


def children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="utf-8")
        except OSError:
            continue
        state, parent = stat.rpartition(")")[2].split()[:2]
        if int(parent) == pid and state != "Z":
            found.append(int(entry.name))
    return found


async def server_pid(broker: RunningBroker, other_than: int | None = None) -> int:
    """The broker's stdio server process, once connected (and not ``other_than``)."""

    def connected() -> int | None:
        pids = [p for p in children(broker.process.pid) if p != other_than]
        demo = readyz(broker)[1]["servers"]["demo"]
        return pids[0] if len(pids) == 1 and demo["connected"] else None

    pid: int = await until(connected, what="a connected downstream process")
    return pid


def denial(result: Any) -> dict[str, Any]:
    assert result.is_error, result
    broker_part: dict[str, Any] = result.structured_content["broker"]
    return broker_part


def entry_for(broker: RunningBroker, decision_id: str) -> Any:
    """The last entry of a decision (one allowed and then denied has two)."""
    return [e for e in broker.audit() if e.decision_id == decision_id][-1]


def faulty_workdir(workdir: Path, live_idp: LocalIdP, port: int, **env: str) -> Path:
    """A broker configuration whose demo server is ``faulty_server.py``."""
    write_config(workdir, port, live_idp.issuer, live_idp.jwks_url)
    manifest = stdio_manifest(
        str(FAULTY_SERVER), env=env, passthrough=["DEMO_RECORD_PATH"]
    )
    install_manifest(workdir, manifest)
    return workdir


async def call_during(
    broker: RunningBroker,
    token: str,
    call: tuple[str, dict[str, Any]],
    fault: Callable[[], Awaitable[None]],
) -> tuple[Any, Any]:
    """Make ``call`` while ``fault`` runs; then one echo call. Both results."""
    results: dict[str, Any] = {}
    async with agent(broker.url, token) as client:

        async def first() -> None:
            results["first"] = await client.call_tool(*call)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(first)
            await fault()
        after = await client.call_tool("demo.echo", {"text": "back again"})
    return results["first"], after


async def test_server_killed_mid_call_is_denied_then_restarted(
    broker: RunningBroker, live_idp: LocalIdP
) -> None:
    """A server killed mid-call: that call is denied and recorded, later ones work."""
    first = await server_pid(broker)

    async def kill_once_called() -> None:
        saw = broker.downstream_saw
        await until(lambda: [r for r in saw() if r.get("tool") == "slow"])
        os.kill(first, signal.SIGKILL)

    started = time.monotonic()
    slow, after = await call_during(
        broker, live_idp.token(), ("demo.slow", {"seconds": 20}), kill_once_called
    )
    denied = denial(slow)
    assert denied["category"] == "downstream_unavailable"
    assert time.monotonic() - started < 15
    assert entry_for(broker, denied["decision_id"]).outcome == "deny"
    assert after.is_error is False
    assert await server_pid(broker, other_than=first) != first
    assert broker.process.poll() is None


async def test_hung_server_is_denied_then_replaced(
    broker: RunningBroker, live_idp: LocalIdP
) -> None:
    """A frozen server: its call is denied at the timeout and the server replaced."""
    first = await server_pid(broker)
    os.kill(first, signal.SIGSTOP)
    try:
        async with agent(broker.url, live_idp.token()) as client:
            echo = await client.call_tool("demo.echo", {"text": "anyone there?"})
            assert readyz(broker)[0] in (200, 503)
            second = await server_pid(broker, other_than=first)
            after = await client.call_tool("demo.echo", {"text": "back again"})
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first, signal.SIGCONT)
    denied = denial(echo)
    assert denied["category"] == "downstream_unavailable"
    assert "did not answer" in entry_for(broker, denied["decision_id"]).detail
    assert second != first
    assert after.is_error is False


async def test_garbage_on_stdout_denies_and_restarts(
    tmp_path: Path, live_idp: LocalIdP, port: int
) -> None:
    """A server that answers with a line that is not JSON is denied and replaced."""
    faulty_workdir(tmp_path, live_idp, port, FAULTY_GARBLE="garble-now")
    with running_broker(tmp_path, port) as broker:
        first = await server_pid(broker)
        started = time.monotonic()
        async with agent(broker.url, live_idp.token()) as client:
            garbled = await client.call_tool("demo.echo", {"text": "garble-now"})
            elapsed = time.monotonic() - started
            after = await client.call_tool("demo.echo", {"text": "plain"})
        denied = denial(garbled)
        assert denied["category"] == "downstream_unavailable"
        assert elapsed < 4, "denied at once, not at the call timeout"
        assert entry_for(broker, denied["decision_id"]).outcome == "deny"
        assert after.is_error is False
        assert await server_pid(broker, other_than=first) != first
        assert "unreadable message" in broker.log()


async def test_readyz_reports_a_server_that_cannot_restart(
    tmp_path: Path, live_idp: LocalIdP, port: int
) -> None:
    """A server that dies idle is noticed; /readyz shows its error until it is back."""
    refuse = tmp_path / "refuse-to-start"
    faulty_workdir(tmp_path, live_idp, port, FAULTY_REFUSE=str(refuse))
    with running_broker(tmp_path, port) as broker:
        first = await server_pid(broker)
        assert readyz(broker) == (
            200,
            {
                "ready": True,
                "servers": {"demo": {"connected": True, "last_error": ""}},
                "policies": "ok",
                "record": {"writable": True, "last_error": None},
            },
        )
        refuse.touch()
        os.kill(first, signal.SIGKILL)

        def down() -> dict[str, Any] | None:
            status, body = readyz(broker)
            demo: dict[str, Any] = body["servers"]["demo"]
            return demo if status == 503 and demo["last_error"] else None

        state = await until(down, what="/readyz reporting the dead server")
        assert state["connected"] is False
        refuse.unlink()
        await until(lambda: readyz(broker)[0] == 200, what="/readyz ready again")
        async with agent(broker.url, live_idp.token()) as client:
            after = await client.call_tool("demo.echo", {"text": "back"})
        assert after.is_error is False


async def test_error_answer_keeps_the_session(
    broker: RunningBroker, live_idp: LocalIdP
) -> None:
    """An error the server answers (an unknown prompt) denies without a restart."""
    first = await server_pid(broker)
    async with agent(broker.url, live_idp.token()) as client:
        with pytest.raises(MCPError):
            await client.get_prompt("demo.no_such_prompt", {})
        await anyio.sleep(0.5)
        after = await client.call_tool("demo.echo", {"text": "same server"})
    assert after.is_error is False
    assert children(broker.process.pid) == [first]
    gets = [
        (e.outcome, e.category) for e in broker.audit() if e.method == "prompts/get"
    ]
    assert gets[-1] == ("deny", "downstream_error")


async def test_server_that_never_finishes_its_handshake_is_reported(
    tmp_path: Path, live_idp: LocalIdP, port: int
) -> None:
    """A server that starts and never answers is given up on and /readyz says so."""
    write_config(tmp_path, port, live_idp.issuer, live_idp.jwks_url)
    install_manifest(tmp_path, stdio_manifest("-c", "import time; time.sleep(120)"))
    with running_broker(tmp_path, port, wait_ready=False) as broker:

        def given_up() -> str:
            error: str = readyz(broker)[1]["servers"]["demo"]["last_error"]
            return error

        error = await until(given_up, what="/readyz naming the handshake timeout")
        status, _ = readyz(broker)
    assert "did not start within" in error
    assert status == 503
