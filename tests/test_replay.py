"""Replay: calls decided against policy directories, with nothing forwarded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from broker import replay
from broker.audit import AuditEntry
from broker.catalog import Catalog
from broker.config import config_from_dict
from broker.errors import ConfigError
from broker.manifest import ToolSpec, load_manifests
from broker.policy import PolicyEngine
from broker.when import parse_instant

REPO = Path(__file__).resolve().parents[1]
NOW = 1_800_000_000.0
CONFIG = config_from_dict(
    {"broker": {"resource": "http://127.0.0.1:1/mcp", "development": True}}
)

BEFORE = """
@id("read-for-all")
permit (principal, action in Action::"call_tool", resource)
when { resource.privilege == "read" };

@id("write-for-writers")
permit (principal in Group::"writers", action in Action::"call_tool", resource)
when { resource.privilege == "write" };

@id("destructive-needs-approval")
forbid (principal, action in Action::"call_tool", resource)
when { resource.destructive } unless { context.approval.granted };

@id("no-cards-to-open-world")
forbid (principal, action in Action::"call_tool", resource)
when { resource.open_world && context.data.contains("card_number") };
"""

# The change under test: nothing to open-world tools, and a transfer limit
# above which a human must approve.
AFTER_EXTRA = """
@id("no-open-world")
forbid (principal, action in Action::"call_tool", resource)
when { resource.open_world };
"""
AFTER_DEMO = """
@id("transfer-needs-approval-above-50")
forbid (principal, action == Action::"call:demo.transfer", resource)
when { context.input.amount > 5000 } unless { context.approval.granted };
"""

READER = {"sub": "alice", "groups": ["eng"], "scope": "tools:call"}
WRITER = {"sub": "wanda", "groups": ["writers"], "scope": "tools:call tools:write"}


def line(who: dict[str, object], tool: str, **more: object) -> dict[str, object]:
    """One call as a calls file holds it; ``arguments`` and the rest in ``more``."""
    return {"principal": who, "tool": tool, "arguments": {}, **more}


CALLS = [
    line(READER, "echo", server="demo", arguments={"text": "x"}),
    line(READER, "demo.search_web", arguments={"query": "sun"}),
    line(WRITER, "demo.transfer", arguments={"amount": 1000, "to": "b"}),
    line(WRITER, "demo.transfer", arguments={"amount": 9000, "to": "b"}),
    line(WRITER, "demo.delete_note", arguments={"title": "t"}),
    line(
        WRITER,
        "demo.delete_note",
        arguments={"title": "t"},
        approval={"granted": True, "approvers": ["carol"]},
    ),
    line(READER, "demo.transfer", arguments={"amount": 1, "to": "b"}),
    line(READER, "demo.nope"),
    line(
        READER,
        "demo.search_web",
        client="agent-9",
        arguments={"query": "4111 1111 1111 1111"},
    ),
]


def policy_dir(path: Path, text: str, demo: str = "") -> Path:
    path.mkdir()
    shutil.copy(REPO / "cedar_policies" / "broker.cedarschema", path)
    (path / "policies.cedar").write_text(text, encoding="utf-8")
    if demo:
        (path / "demo").mkdir()
        (path / "demo" / "limits.cedar").write_text(demo, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tools() -> dict[str, ToolSpec]:
    pinned = Catalog(load_manifests(REPO / "tool_manifests")).pinned
    return {tool.qualified_name: tool for tool in pinned}


@pytest.fixture
def engines(
    tmp_path: Path, tools: dict[str, ToolSpec]
) -> tuple[PolicyEngine, PolicyEngine]:
    before = policy_dir(tmp_path / "before", BEFORE)
    after = policy_dir(tmp_path / "after", BEFORE + AFTER_EXTRA, AFTER_DEMO)
    return (
        PolicyEngine.load(before, tools.values()),
        PolicyEngine.load(after, tools.values()),
    )


def calls(raw: list[dict[str, object]] = CALLS) -> list[replay.Call]:
    lines = [json.dumps(call) for call in raw]
    return replay.calls_from_lines(lines, CONFIG, now=NOW)


def test_each_call_gets_its_outcome_and_deciding_policies(
    engines: tuple[PolicyEngine, PolicyEngine], tools: dict[str, ToolSpec]
) -> None:
    """Allow, deny, needs approval, not found: each with its deciding policies."""
    results = replay.replay(calls(), tools, engines[0])

    outcomes = [(r.call.source, r.before.outcome) for r in results]
    assert outcomes == [
        ("line 1", "allow"),
        ("line 2", "allow"),
        ("line 3", "allow"),
        ("line 4", "allow"),
        ("line 5", "needs_approval"),
        ("line 6", "allow"),
        ("line 7", "deny"),
        ("line 8", "not_found"),
        ("line 9", "deny"),
    ]
    assert results[0].before.policies == ("read-for-all",)
    assert results[4].before.policies == ("destructive-needs-approval",)
    assert results[8].before.policies == ("no-cards-to-open-world",)
    assert all(r.after is None and not r.changed for r in results)


def test_two_policy_sets_report_exactly_the_calls_that_change(
    engines: tuple[PolicyEngine, PolicyEngine], tools: dict[str, ToolSpec]
) -> None:
    """Only the open-world search and the large transfer change outcome."""
    results = replay.replay(calls(), tools, *engines)

    changed = [
        (r.call.source, r.before.outcome, r.after.outcome if r.after else None)
        for r in results
        if r.changed
    ]
    assert changed == [
        ("line 2", "allow", "deny"),
        ("line 4", "allow", "needs_approval"),
    ]
    large = results[3].after
    assert large is not None
    assert large.policies == ("transfer-needs-approval-above-50",)


def test_a_call_is_decided_at_its_own_time(
    tmp_path: Path, tools: dict[str, ToolSpec]
) -> None:
    """The ``time`` of a call is the ``now`` its policies see."""
    cutover = parse_instant("2027-01-15T08:00Z")
    timed = policy_dir(
        tmp_path / "timed",
        BEFORE
        + '@id("frozen") forbid (principal, action in Action::"call_tool", resource) '
        + f"when {{ context.now >= {int(cutover)} }};",
    )
    engine = PolicyEngine.load(timed, tools.values())
    early = {**CALLS[0], "time": "2027-01-15T07:59:59Z"}
    late = {**CALLS[0], "time": cutover}

    results = replay.replay(calls([early, late]), tools, engine)

    assert [r.before.outcome for r in results] == ["allow", "deny"]
    assert results[1].before.policies == ("frozen",)


def test_claims_are_read_as_the_broker_reads_a_token() -> None:
    """Scopes, groups and the client come from the claims and the call's client."""
    (call,) = calls([{**CALLS[8]}])

    assert call.principal.subject == "alice"
    assert call.principal.client_id == "agent-9"
    assert call.principal.groups == frozenset({"eng"})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", r"calls line 2: not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"tool": "demo.echo"}', "principal must be an object"),
        ('{"principal": {"sub": "a"}, "tool": "echo"}', "give server"),
        ('{"principal": {}, "tool": "demo.echo"}', "no subject"),
        (
            '{"principal": {"sub": "a"}, "tool": "demo.echo", "approval": "yes"}',
            "approval must be an object",
        ),
        ('{"principal": {"sub": "a"}, "tool": "demo.echo", "time": "soon"}', "ISO"),
    ],
)
def test_a_call_that_does_not_fit_names_its_line(line: str, message: str) -> None:
    """Every problem in a calls file is a ConfigError naming the line."""
    good = json.dumps(CALLS[0])

    with pytest.raises(ConfigError, match=message) as failure:
        replay.calls_from_lines([good, line], CONFIG, now=NOW)

    assert "line 2" in str(failure.value)


def test_blank_lines_are_skipped() -> None:
    """Empty lines in a calls file are not calls, and numbering stays true."""
    lines = ["", json.dumps(CALLS[0]), "   "]

    (call,) = replay.calls_from_lines(lines, CONFIG, now=NOW)

    assert call.source == "line 2"


def test_recorded_calls_keep_their_classification(
    engines: tuple[PolicyEngine, PolicyEngine], tools: dict[str, ToolSpec]
) -> None:
    """A recorded call's data classes decide, though its arguments are redacted."""
    recorded = AuditEntry(
        decision_id="r1",
        time=NOW,
        method="tools/call",
        outcome="deny",
        category="forbidden",
        subject="alice",
        client_id="agent-7",
        server="demo",
        tool="demo.search_web",
        arguments={"query": "[REDACTED:card_number]"},
        data_classes=("card_number",),
        groups=("eng",),
        scopes=("tools:call",),
    )
    listing = AuditEntry("r2", NOW, "tools/list", "allow", "allowed", subject="a")

    replayed = replay.calls_from_record([recorded, listing])
    (result,) = replay.replay(replayed, tools, engines[0])

    assert replayed[0].source == "decision r1"
    assert replayed[0].principal.groups == frozenset({"eng"})
    assert result.before.outcome == "deny"
    assert result.before.policies == ("no-cards-to-open-world",)
    assert replay.without_claims(replayed) == 0


def test_recorded_calls_without_claims_are_counted() -> None:
    """Calls recorded without groups or scopes are counted, to be said aloud."""
    bare = AuditEntry(
        "r3", NOW, "tools/call", "allow", "allowed", subject="a", tool="demo.echo"
    )

    assert replay.without_claims(replay.calls_from_record([bare])) == 1
