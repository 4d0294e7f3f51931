"""The denied-call report: selecting, counting, and printing for people and tools."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import pytest

from broker import report as reporting
from broker.audit import AuditEntry, SqliteStore
from broker.report import Filters, build, filters_from, read_denials
from broker.report_render import safe_cell, to_csv, to_json, to_table
from broker.when import iso, parse_instant, parse_span

NOW = 1_800_000_000.0  # on the hour
HOUR = 3600.0
DAY_AGO = NOW - 24 * HOUR


def denial(
    decision_id: str,
    when: float,
    subject: str | None,
    tool: str | None,
    category: str = "forbidden",
    reasons: tuple[str, ...] = (),
    **more: object,
) -> AuditEntry:
    return AuditEntry(
        decision_id=decision_id,
        time=when,
        method=str(more.pop("method", "tools/call")),
        outcome="deny",
        category=category,
        subject=subject,
        client_id=str(more.pop("client_id", "agent-7")) if subject else None,
        server=tool.split(".")[0] if tool else None,
        tool=tool,
        reasons=reasons,
        **more,  # type: ignore[arg-type]
    )


SEEDED = (
    denial("d-old", NOW - 48 * HOUR, "carol", "demo.transfer", reasons=("x",)),
    denial("d1", NOW - 5 * HOUR + 10, "alice", "demo.write_note"),
    denial(
        "d2", NOW - 5 * HOUR + 20, "alice", "demo.transfer", reasons=("transfer-limit",)
    ),
    denial(
        "d3",
        NOW - 2 * HOUR,
        "bob",
        "demo.search_web",
        reasons=("no-secrets-to-open-world",),
        client_id="agent-9",
        data_classes=("card_number",),
    ),
    denial(
        "d4", NOW - 2 * HOUR + 5, "bob", "demo.nope", "not_found", client_id="agent-9"
    ),
    denial("d5", NOW - HOUR, None, None, "unauthenticated", method="http"),
    denial(
        "d6",
        NOW - 60,
        "mallory",
        "demo.delete_note",
        reasons=("destructive-needs-approval",),
        shadow=True,
    ),
    AuditEntry("a1", NOW - 30, "tools/call", "allow", "allowed", subject="alice"),
)
LAST_DAY = Filters(since=DAY_AGO)


@pytest.fixture
def day() -> reporting.Report:
    return build(SEEDED, LAST_DAY, now=NOW)


def test_the_report_counts_each_grouping(day: reporting.Report) -> None:
    """Over the last day: six denials, counted by principal, tool, policy, reason."""
    assert day.total == 6
    assert day.shadow == 1
    assert dict(day.by_principal) == {
        "alice": 2,
        "bob": 2,
        "mallory": 1,
        "(no subject)": 1,
    }
    assert dict(day.by_client) == {"agent-7": 3, "agent-9": 2, "(no client)": 1}
    assert dict(day.by_tool) == {
        "demo.write_note": 1,
        "demo.transfer": 1,
        "demo.search_web": 1,
        "demo.nope": 1,
        "demo.delete_note": 1,
        "http": 1,
    }
    assert dict(day.by_policy) == {
        "(no policy permits)": 1,
        "transfer-limit": 1,
        "no-secrets-to-open-world": 1,
        "destructive-needs-approval": 1,
    }
    assert day.by_category == (
        ("forbidden", 4),
        ("not_found", 1),
        ("unauthenticated", 1),
    )


def test_denials_are_grouped_per_hour_over_a_day(day: reporting.Report) -> None:
    """A day is 24 hourly buckets, empty ones included, each counted by reason."""
    counts = [bucket.count for bucket in day.over_time]

    assert day.bucket_seconds == HOUR
    assert len(counts) == 24
    assert {n: c for n, c in enumerate(counts) if c} == {19: 2, 22: 2, 23: 2}
    assert dict(day.over_time[23].by_category) == {
        "forbidden": 1,
        "unauthenticated": 1,
    }


def test_json_output_carries_the_same_counts(day: reporting.Report) -> None:
    """The JSON document has the totals, every grouping and every denial."""
    document = json.loads(to_json(day))

    assert (document["total"], document["shadow"]) == (6, 1)
    assert {g["name"]: g["count"] for g in document["by_principal"]} == dict(
        day.by_principal
    )
    assert {g["name"]: g["count"] for g in document["by_policy"]} == dict(day.by_policy)
    assert [b["count"] for b in document["over_time"]["buckets"]] == [
        b.count for b in day.over_time
    ]
    assert [d["decision_id"] for d in document["denials"]] == [
        "d1",
        "d2",
        "d3",
        "d4",
        "d5",
        "d6",
    ]
    assert document["denials"][5]["shadow"] is True
    assert document["since"] == iso(DAY_AGO)


def test_csv_output_has_one_row_per_denial(day: reporting.Report) -> None:
    """Counting the CSV's rows gives the report's counts."""
    rows = list(csv.DictReader(io.StringIO(to_csv(day))))

    assert len(rows) == 6
    assert Counter(r["subject"] or "(no subject)" for r in rows) == Counter(
        dict(day.by_principal)
    )
    assert Counter(r["category"] for r in rows) == Counter(dict(day.by_category))
    assert [r["shadow"] for r in rows] == ["", "", "", "", "", "yes"]
    assert rows[2]["data_classes"] == "card_number"
    assert rows[0]["policies"] == "(no policy permits)"


def test_table_output_shows_counts_and_every_decision(day: reporting.Report) -> None:
    """The table has the total, the groups, the timeline and each decision id."""
    text = to_table(day)

    assert "6 denials (1 in shadow mode: recorded, not enforced)" in text
    assert any(line.split() == ["transfer-limit", "1"] for line in text.splitlines())
    assert any(line.split() == ["forbidden", "4"] for line in text.splitlines())
    assert "Over time (per hour)" in text
    for decision_id in ("d1", "d2", "d3", "d4", "d5", "d6"):
        assert decision_id in text
    assert "d-old" not in text
    shadow_row = next(line for line in text.splitlines() if " d6 " in line)
    assert shadow_row.rstrip().endswith("shadow")


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (Filters(since=DAY_AGO, subject="alice"), ["d1", "d2"]),
        (Filters(since=DAY_AGO, client="agent-9"), ["d3", "d4"]),
        (Filters(since=DAY_AGO, server="demo"), ["d1", "d2", "d3", "d4", "d6"]),
        (Filters(since=DAY_AGO, tool="demo.transfer"), ["d2"]),
        (Filters(since=DAY_AGO, category="not_found"), ["d4"]),
        (Filters(since=DAY_AGO, policy="transfer-limit"), ["d2"]),
        (Filters(since=DAY_AGO, policy="(no policy permits)"), ["d1"]),
        (Filters(since=NOW - 2 * HOUR, until=NOW - HOUR), ["d3", "d4"]),
        (Filters(), ["d-old", "d1", "d2", "d3", "d4", "d5", "d6"]),
    ],
)
def test_each_filter_narrows_the_denials(filters: Filters, expected: list[str]) -> None:
    """Each filter keeps exactly the denials that match it; allows never show."""
    selected = reporting.select(SEEDED, filters)

    assert [entry.decision_id for entry in selected] == expected


def test_deciding_policies_name_default_denials_and_errors() -> None:
    """A forbidden call without reasons is a default deny, or a policy error."""
    no_permit = denial("x", NOW, "a", "demo.echo")
    erroring = denial("y", NOW, "a", "demo.echo", errors=("policy p: boom",))
    not_found = denial("z", NOW, "a", "demo.nope", "not_found")

    assert reporting.deciding_policies(no_permit) == (reporting.NO_PERMIT,)
    assert reporting.deciding_policies(erroring) == (reporting.POLICY_ERROR,)
    assert reporting.deciding_policies(not_found) == ()


def test_csv_cells_cannot_start_a_formula() -> None:
    """Agent-chosen values that a spreadsheet would evaluate are defused."""
    hostile = denial("f", NOW, '=HYPERLINK("http://x")', "@SUM(A1)", detail="+1")
    report = build([hostile], Filters(), now=NOW)

    row = next(csv.DictReader(io.StringIO(to_csv(report))))

    assert row["subject"] == '\'=HYPERLINK("http://x")'
    assert row["tool"] == "'@SUM(A1)"
    assert row["detail"] == "'+1"
    assert safe_cell("plain") == "plain"


def test_the_table_shows_control_characters_as_escapes() -> None:
    """A terminal escape in an agent's value cannot reach the reviewer's terminal."""
    hostile = denial("t", NOW, "eve\x1b[2J", "demo.echo\r")
    report = build([hostile], Filters(), now=NOW)

    text = to_table(report)

    assert "\x1b" not in text
    assert "\r" not in text
    assert "eve\\x1b[2J" in text


def test_buckets_grow_with_the_range() -> None:
    """Hours up to two days, days up to ninety, weeks beyond."""
    assert reporting.bucket_seconds_for(2 * 86_400) == HOUR
    assert reporting.bucket_seconds_for(30 * 86_400) == 86_400
    assert reporting.bucket_seconds_for(365 * 86_400) == 7 * 86_400


def test_filters_from_text_default_to_the_last_day() -> None:
    """No range given means the 24 hours before now; empty fields are not filters."""
    filters = filters_from({"tool": "demo.echo", "subject": ""}, now=NOW)

    assert filters == Filters(since=DAY_AGO, tool="demo.echo")


def test_filters_from_text_read_spans_and_times() -> None:
    """``last`` counts back from ``until``; ``since`` is an ISO time in UTC."""
    spanned = filters_from({"last": "2h", "until": "2027-01-15T08:00"}, now=NOW)
    dated = filters_from({"since": "2027-01-15"}, now=NOW)

    assert spanned.until == parse_instant("2027-01-15T08:00Z")
    assert spanned.since == spanned.until - 2 * HOUR
    assert dated.since == parse_instant("2027-01-15T00:00+00:00")


@pytest.mark.parametrize(
    "values",
    [{"since": "2027-01-15", "last": "1h"}, {"last": "forever"}, {"since": "soon"}],
)
def test_filters_that_do_not_parse_say_why(values: dict[str, str]) -> None:
    """Both range starts, an unknown span or a bad time are refused."""
    with pytest.raises(ValueError, match=r"either since or last|span|ISO 8601"):
        filters_from(values, now=NOW)


def test_spans_need_a_unit_and_a_positive_count() -> None:
    """``0h`` and ``12`` are not spans; ``2w`` is two weeks."""
    assert parse_span("2w") == 14 * 86_400
    for bad in ("0h", "12", "h"):
        with pytest.raises(ValueError, match="span"):
            parse_span(bad)


def test_reading_denials_says_when_the_store_held_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the report's limit the oldest denials are counted and truncation flagged."""
    monkeypatch.setattr(reporting, "REPORT_LIMIT", 3)
    store = SqliteStore(tmp_path / "audit.db")
    try:
        for entry in SEEDED:
            store.record(entry)
        entries, truncated = read_denials(store, Filters())
        recent, more = read_denials(store, Filters(since=NOW - HOUR))
    finally:
        store.close()

    assert ([e.decision_id for e in entries], truncated) == (
        ["d-old", "d1", "d2"],
        True,
    )
    assert ([e.decision_id for e in recent], more) == (["d5", "d6"], False)
    assert "The store held more" in to_table(
        build(entries, Filters(), now=NOW, truncated=truncated)
    )
