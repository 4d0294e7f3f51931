"""Shadow mode forwards would-be denials on record; limits deny past the rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.harness import (
    agent,
    demo_manifest,
    install_manifest,
    running_broker,
    write_config,
)
from tests.idp import LocalIdP


async def test_shadow_server_forwards_and_marks_would_be_denials(
    tmp_path: Path, live_idp: LocalIdP, port: int
) -> None:
    """In shadow mode a call policy would deny is forwarded, recorded as shadow."""
    write_config(tmp_path, port, live_idp.issuer, live_idp.jwks_url)
    manifest: dict[str, Any] = {**demo_manifest(), "shadow": True}
    install_manifest(tmp_path, manifest)
    with running_broker(tmp_path, port) as broker:
        async with agent(broker.url, live_idp.token()) as client:
            result = await client.call_tool(
                "demo.write_note", {"title": "t", "body": "b"}
            )
            allowed = await client.call_tool("demo.echo", {"text": "x"})
        entries = [e for e in broker.audit() if e.method == "tools/call"]
        log = broker.log()
    assert result.is_error is False
    assert allowed.is_error is False
    assert [r["tool"] for r in broker.downstream_saw() if r["kind"] == "call"] == [
        "write_note",
        "echo",
    ]
    by_tool = {e.tool: e for e in entries}
    shadowed = by_tool["demo.write_note"]
    assert (shadowed.outcome, shadowed.shadow) == ("deny", True)
    assert (
        by_tool["demo.echo"].shadow is True or by_tool["demo.echo"].outcome == "allow"
    )
    assert by_tool["demo.echo"].outcome == "allow"
    assert "SHADOW MODE for server demo" in log


async def test_rate_limit_denies_past_the_limit_and_records_it(
    tmp_path: Path, live_idp: LocalIdP, port: int
) -> None:
    """Two calls a minute per principal: the third is denied as rate_limited."""
    write_config(
        tmp_path,
        port,
        live_idp.issuer,
        live_idp.jwks_url,
        extra_tables='[[limits]]\nper = "principal"\ncalls = 2\nseconds = 60\n',
    )
    install_manifest(tmp_path)
    with running_broker(tmp_path, port) as broker:
        async with agent(broker.url, live_idp.token()) as client:
            results = [
                await client.call_tool("demo.echo", {"text": str(n)}) for n in range(3)
            ]
        async with agent(broker.url, live_idp.token(live_idp.claims(sub="bob"))) as c:
            other = await c.call_tool("demo.echo", {"text": "bob"})
        entries = [e for e in broker.audit() if e.method == "tools/call"]
    assert [r.is_error for r in results] == [False, False, True]
    assert results[2].structured_content["broker"]["category"] == "rate_limited"
    assert other.is_error is False
    assert [e.category for e in entries if e.subject == "alice"] == [
        "allowed",
        "allowed",
        "rate_limited",
    ]


async def test_record_keeps_the_callers_groups_and_scopes(
    tmp_path: Path, live_idp: LocalIdP, port: int
) -> None:
    """Each entry says which groups and scopes the decision saw, for replay."""
    write_config(tmp_path, port, live_idp.issuer, live_idp.jwks_url)
    install_manifest(tmp_path)
    with running_broker(tmp_path, port) as broker:
        async with agent(broker.url, live_idp.token()) as client:
            await client.call_tool("demo.echo", {"text": "x"})
        entry = next(e for e in broker.audit() if e.method == "tools/call")
    assert entry.groups == ("eng", "oncall")
    assert entry.scopes == ("tools:call", "tools:read")
