"""The broker is transparent to the MCP protocol, by the official conformance suite.

The suite's server scenarios run three times: against the fixture server
directly; through the bearer shim alone (which proves the shim changes
nothing); and through the shim and a broker fronting the fixture with a
policy that allows everything. Every check must come out the same each time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from broker.audit import AuditEntry
from tests.conformance.servers import (
    FIXTURE,
    SHIM,
    allow_all_policies,
    allow_hosts,
    install_fixture_manifest,
    pin_fixture_tools,
    running_script,
)
from tests.conformance.suite import (
    Run,
    SuiteMissing,
    differences,
    report,
    require_installed,
    run_suite,
)
from tests.harness import free_port, running_broker, write_config
from tests.idp import LocalIdP

# What the fixture passes directly with suite 0.1.16 and mcp 2.3.0; fewer
# means the fixture broke or the suite did not really run.
MIN_DIRECT_PASSES = 44
# The fixture reads no Authorization header; the shim still sends one.
UNCHECKED_TOKEN = "not-checked-by-the-fixture"
RESUMABLE = "2025-11-25"
BOTH = {"accept": "application/json, text/event-stream"}


@dataclass
class Runs:
    direct: Run
    shim: Run
    broker: Run | None
    # Why there is no broker run, or what the broker denied and why.
    broker_note: str
    # Tool calls the broker allowed and recorded: proof the run went through it.
    broker_calls: int = 0


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the runs keep their output and the processes their logs."""
    return tmp_path_factory.mktemp("conformance")


@pytest.fixture(scope="module")
def fixture_origin(workspace: Path) -> Iterator[str]:
    """The fixture server, running for the whole module."""
    port = free_port()
    with running_script(FIXTURE, port, log=workspace / "fixture.log"):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def runs(workspace: Path, fixture_origin: str, session_idp: LocalIdP) -> Runs:
    """The suite run once against each of the three paths to the fixture."""
    try:
        require_installed()
    except SuiteMissing as exc:
        pytest.fail(str(exc))
    fixture_url = f"{fixture_origin}/mcp"
    direct = run_suite(fixture_url, workspace / "direct")
    shim = _through_shim(workspace, "shim", fixture_origin, UNCHECKED_TOKEN)
    try:
        broker, record = _through_broker(workspace, fixture_url, session_idp)
    except RuntimeError as exc:
        return Runs(direct, shim, None, str(exc))
    calls = sum(e.method == "tools/call" and e.outcome == "allow" for e in record)
    return Runs(direct, shim, broker, _denials(record), calls)


def _through_shim(base: Path, name: str, upstream: str, token: str) -> Run:
    port = free_port()
    env = {"SHIM_TOKEN": token}
    with running_script(SHIM, port, upstream, log=base / f"{name}.log", env=env):
        return run_suite(f"http://127.0.0.1:{port}/mcp", base / name)


def _through_broker(
    base: Path, fixture_url: str, idp: LocalIdP
) -> tuple[Run, list[AuditEntry]]:
    workdir = base / "broker"
    workdir.mkdir()
    port, shim_port = free_port(), free_port()
    idp.reset(time.time)
    idp.resource = f"http://127.0.0.1:{port}/mcp"
    policies = allow_all_policies(workdir / "policies")
    config = write_config(workdir, port, idp.issuer, idp.jwks_url, policy_dir=policies)
    allow_hosts(config, f"http://127.0.0.1:{shim_port}")
    install_fixture_manifest(workdir, fixture_url)
    pin_fixture_tools(workdir)
    origin = f"http://127.0.0.1:{port}"
    with running_broker(workdir, port) as broker:
        env = {"SHIM_TOKEN": idp.token()}
        log = base / "broker-shim.log"
        with running_script(SHIM, shim_port, origin, log=log, env=env):
            run = run_suite(f"http://127.0.0.1:{shim_port}/mcp", base / "through")
        return run, broker.audit()


def _denials(record: list[AuditEntry]) -> str:
    denied = [
        f"  {e.method} {e.tool}: {e.category}: {e.detail}"
        for e in record
        if e.outcome == "deny"
    ]
    said = "\n".join(denied) or "  (nothing)"
    return f"The broker's record of what it denied:\n{said}"


def test_fixture_passes_the_suite_directly(runs: Runs) -> None:
    """The fixture server passes at least the known number of checks on its own."""
    passed = runs.direct.passed()
    failing = [
        runs.direct.describe(scenario)
        for scenario, checks in runs.direct.scenarios.items()
        if any(check.status == "FAILURE" for check in checks)
    ]
    assert passed >= MIN_DIRECT_PASSES, "\n".join(
        [f"only {passed} checks passed directly:", *failing, runs.direct.output]
    )


def test_shim_changes_nothing(runs: Runs) -> None:
    """Suite, shim, fixture: every check as it is directly."""
    changed = differences(runs.direct, runs.shim)
    assert not changed, report(runs.direct, runs.shim, changed)


def test_broker_is_transparent(runs: Runs) -> None:
    """Suite, shim, broker allowing all, fixture: every check as it is directly."""
    assert runs.broker is not None, f"the broker did not run: {runs.broker_note}"
    assert runs.broker_calls > 0, "the broker recorded no tool call: was it bypassed?"
    changed = differences(runs.direct, runs.broker)
    assert not changed, "\n\n".join(
        [report(runs.direct, runs.broker, changed), runs.broker_note]
    )


def test_shim_relays_a_resumed_stream(workspace: Path, fixture_origin: str) -> None:
    """A stream closed mid-call, resumed by Last-Event-ID, then DELETE: as directly."""
    direct = _resumed_call(f"{fixture_origin}/mcp")
    port = free_port()
    log, env = workspace / "resume-shim.log", {"SHIM_TOKEN": UNCHECKED_TOKEN}
    with running_script(SHIM, port, fixture_origin, log=log, env=env):
        through = _resumed_call(f"http://127.0.0.1:{port}/mcp")
    assert direct[0] == [""], "the fixture answered before closing the stream"
    assert direct[1]["result"]["isError"] is False
    assert through == direct


def _resumed_call(url: str) -> tuple[list[str], dict[str, Any], int]:
    """What a client of 2025-11-25 sees calling ``test_reconnection``.

    The data of the events on the call's own stream, the answer read from
    the stream resumed after the last of them, and the status of ending the
    session.
    """
    initialize = _request(
        1,
        "initialize",
        protocolVersion=RESUMABLE,
        capabilities={},
        clientInfo={"name": "shim-check", "version": "1"},
    )
    call = _request(2, "tools/call", name="test_reconnection", arguments={})
    with httpx2.Client(timeout=10.0) as http:
        opened = http.post(url, json=initialize, headers=BOTH)
        session = {
            "mcp-session-id": opened.headers["mcp-session-id"],
            "mcp-protocol-version": RESUMABLE,
        }
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        http.post(url, json=initialized, headers={**BOTH, **session})
        with http.stream("POST", url, json=call, headers={**BOTH, **session}) as first:
            events = list(_events(first.iter_lines()))
        resume = {"accept": "text/event-stream", "last-event-id": events[-1][0]}
        with http.stream("GET", url, headers={**resume, **session}) as again:
            answer = next(
                json.loads(data) for _, data in _events(again.iter_lines()) if data
            )
        ended = http.delete(url, headers=session)
    return [data for _, data in events], answer, ended.status_code


def _request(number: int, method: str, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": number, "method": method, "params": params}


def _events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """Server-sent events as (id, data), from the lines of a stream."""
    event_id, data = "", ""
    for line in lines:
        if line.startswith("id:"):
            event_id = line.removeprefix("id:").strip()
        elif line.startswith("data:"):
            data = line.removeprefix("data:").strip()
        elif not line:
            yield event_id, data
            event_id, data = "", ""
