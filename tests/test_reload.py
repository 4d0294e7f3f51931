"""Policy hot reload: an edit applies without a restart, a broken one never applies."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from broker.reload import fingerprint
from tests.harness import (
    POLICIES,
    RunningBroker,
    agent,
    install_manifest,
    running_broker,
    write_config,
)
from tests.idp import LocalIdP
from tests.waiting import readyz, until

NO_ECHO = """
@id("no-echo-today")
forbid (principal, action in Action::"call_tool", resource)
when { resource.name == "echo" };
"""

TYPO = """
@id("typo-in-attribute")
permit (principal, action in Action::"call_tool", resource)
when { resource.privilige == "read" };
"""


@pytest.fixture
def policies(tmp_path: Path, live_idp: LocalIdP, port: int) -> Path:
    """A copy of the shipped policies, which the broker under test reads."""
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    write_config(
        tmp_path, port, live_idp.issuer, live_idp.jwks_url, policy_dir=policies
    )
    install_manifest(tmp_path)
    return policies


def denial(result: Any) -> dict[str, Any]:
    assert result.is_error, result
    broker_part: dict[str, Any] = result.structured_content["broker"]
    return broker_part


def failing(broker: RunningBroker) -> dict[str, Any] | None:
    """The body of /readyz if it answers 503, else None."""
    status, body = readyz(broker)
    return body if status == 503 else None


async def reloads(broker: RunningBroker, count: int) -> None:
    """Wait until the broker has logged ``count`` successful reloads."""
    await until(
        lambda: broker.log().count("policies reloaded") >= count, what="a reload"
    )


async def test_an_edited_policy_applies_without_a_restart(
    policies: Path, port: int, live_idp: LocalIdP
) -> None:
    """A forbid added to a policy file denies the very next call."""
    tools = policies / "tools.cedar"
    with running_broker(policies.parent, port) as broker:
        async with agent(broker.url, live_idp.token()) as client:
            before = await client.call_tool("demo.echo", {"text": "hi"})
            tools.write_text(tools.read_text(encoding="utf-8") + NO_ECHO)
            await reloads(broker, 1)
            after = await client.call_tool("demo.echo", {"text": "hi"})
        ready = readyz(broker)
        entry = next(
            e for e in broker.audit() if e.decision_id == denial(after)["decision_id"]
        )
    assert before.is_error is False
    assert denial(after)["category"] == "forbidden"
    assert "no-echo-today" in entry.reasons
    assert ready == (200, {**ready[1], "ready": True, "policies": "ok"})


async def test_a_broken_policy_keeps_the_last_valid_set_until_fixed(
    policies: Path, port: int, live_idp: LocalIdP
) -> None:
    """An invalid edit changes nothing and fails /readyz; fixing it recovers."""
    tools = policies / "tools.cedar"
    shipped = tools.read_text(encoding="utf-8")
    with running_broker(policies.parent, port) as broker:
        tools.write_text(shipped + NO_ECHO)
        await reloads(broker, 1)
        tools.write_text(shipped + NO_ECHO + TYPO)
        body = await until(lambda: failing(broker), what="/readyz failing")
        async with agent(broker.url, live_idp.token()) as client:
            echo = await client.call_tool("demo.echo", {"text": "hi"})
            add = await client.call_tool("demo.add", {"a": 1, "b": 2})
            tools.write_text(shipped)
            await reloads(broker, 2)
            fixed = await client.call_tool("demo.echo", {"text": "hi"})
        assert readyz(broker) == (
            200,
            {
                "ready": True,
                "servers": {"demo": {"connected": True, "last_error": ""}},
                "policies": "ok",
                "record": {"writable": True, "last_error": None},
            },
        )
    assert body["ready"] is False
    assert body["policies"].startswith("error: ")
    assert "typo-in-attribute" in body["policies"]
    assert denial(echo)["category"] == "forbidden"
    assert add.is_error is False
    assert fixed.is_error is False
    assert "typo-in-attribute" in broker.log()


def test_an_edit_keeping_size_and_time_is_still_seen(tmp_path: Path) -> None:
    """A change of content alone, same size and same mtime, changes the fingerprint."""
    policy = tmp_path / "a.cedar"
    policy.write_text("permit (principal, action, resource);", encoding="utf-8")
    stat = policy.stat()
    before = fingerprint(tmp_path)
    policy.write_text("forbid (principal, action, resource);", encoding="utf-8")
    os.utime(policy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert policy.stat().st_size == stat.st_size
    assert fingerprint(tmp_path) != before


def test_files_in_server_directories_are_watched(tmp_path: Path) -> None:
    """A policy in a server's subdirectory counts as much as one at the top."""
    (tmp_path / "demo").mkdir()
    before = fingerprint(tmp_path)
    (tmp_path / "demo" / "limits.cedar").write_text("", encoding="utf-8")
    assert fingerprint(tmp_path) != before
