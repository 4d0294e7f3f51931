"""The denied-call report printed for people (a table) and for tools (JSON, CSV).

Most of what is printed came from agents: tool names, subjects, redacted
arguments. The table shows control characters as escapes, so that a value
cannot move or recolour the reviewer's terminal; a CSV cell that a
spreadsheet would run as a formula is prefixed with an apostrophe.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence

from broker.audit import AuditEntry
from broker.report import Counts, Report, deciding_policies, principal_of, tool_of
from broker.when import iso, shown

FORMATS = ("table", "json", "csv")

CSV_COLUMNS = (
    "time",
    "decision_id",
    "subject",
    "client_id",
    "server",
    "tool",
    "method",
    "category",
    "policies",
    "errors",
    "data_classes",
    "shadow",
    "detail",
    "arguments",
)

_LISTING_HEADER = (
    "TIME",
    "DECISION ID",
    "PRINCIPAL",
    "AGENT",
    "TOOL",
    "REASON",
    "POLICIES",
    "SHADOW",
)
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_CELL_WIDTH = 28
_BAR_WIDTH = 40


def render(report: Report, form: str) -> str:
    """``report`` in one of FORMATS."""
    if form == "json":
        return to_json(report)
    if form == "csv":
        return to_csv(report)
    return to_table(report)


def denial_fields(entry: AuditEntry) -> dict[str, object]:
    """One denial as plain JSON values, as the JSON output and the page use it."""
    return {
        "time": iso(entry.time),
        "decision_id": entry.decision_id,
        "subject": entry.subject,
        "client_id": entry.client_id,
        "server": entry.server,
        "tool": tool_of(entry),
        "method": entry.method,
        "category": entry.category,
        "policies": list(deciding_policies(entry)),
        "errors": list(entry.errors),
        "data_classes": list(entry.data_classes),
        "shadow": entry.shadow,
        "detail": entry.detail,
        "arguments": entry.arguments,
    }


# ---- JSON ---------------------------------------------------------------------


def to_json(report: Report) -> str:
    document = {
        "since": None if report.since is None else iso(report.since),
        "until": None if report.until is None else iso(report.until),
        "filters": report.filters.given(),
        "total": report.total,
        "shadow": report.shadow,
        "truncated": report.truncated,
        "by_principal": _named(report.by_principal),
        "by_client": _named(report.by_client),
        "by_tool": _named(report.by_tool),
        "by_policy": _named(report.by_policy),
        "by_category": _named(report.by_category),
        "over_time": {
            "bucket_seconds": report.bucket_seconds,
            "buckets": [
                {
                    "start": iso(bucket.start),
                    "count": bucket.count,
                    "by_category": dict(bucket.by_category),
                }
                for bucket in report.over_time
            ],
        },
        "denials": [denial_fields(entry) for entry in report.denials],
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _named(counts: Counts) -> list[dict[str, object]]:
    return [{"name": name, "count": count} for name, count in counts]


# ---- CSV ----------------------------------------------------------------------


def to_csv(report: Report) -> str:
    """One row per denial; the groups are left to the tool that reads it."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for entry in report.denials:
        writer.writerow([safe_cell(value) for value in _csv_row(entry)])
    return out.getvalue()


def _csv_row(entry: AuditEntry) -> list[str]:
    return [
        iso(entry.time),
        entry.decision_id,
        entry.subject or "",
        entry.client_id or "",
        entry.server or "",
        tool_of(entry),
        entry.method,
        entry.category,
        ";".join(deciding_policies(entry)),
        ";".join(entry.errors),
        ";".join(entry.data_classes),
        "yes" if entry.shadow else "",
        entry.detail,
        json.dumps(entry.arguments, ensure_ascii=False, sort_keys=True),
    ]


def safe_cell(value: str) -> str:
    """``value``, unable to start a spreadsheet formula."""
    return "'" + value if value.startswith(_FORMULA_STARTS) else value


# ---- the table ------------------------------------------------------------------


def to_table(report: Report) -> str:
    lines = _heading(report)
    sections = (
        ("By principal", report.by_principal),
        ("By agent (OAuth client)", report.by_client),
        ("By tool", report.by_tool),
        ("By deciding policy", report.by_policy),
        ("By reason", report.by_category),
    )
    names = [printable(name) for _, counts in sections for name, _ in counts]
    width = min(max([12, *map(len, names)]), 60)
    for title, counts in sections:
        lines += _section(title, counts, width)
    lines += _timeline(report)
    lines += _listing(report.denials)
    return "\n".join(lines) + "\n"


def _heading(report: Report) -> list[str]:
    since = "the start" if report.since is None else shown(report.since)
    until = "now" if report.until is None else shown(report.until)
    lines = [f"Denied calls from {since} to {until} (UTC)"]
    given = report.filters.given()
    if given:
        lines.append("Filters: " + ", ".join(f"{k}={v}" for k, v in given.items()))
    total = f"{report.total} denial" + ("" if report.total == 1 else "s")
    if report.shadow:
        total += f" ({report.shadow} in shadow mode: recorded, not enforced)"
    lines.append(total)
    if report.truncated:
        lines.append("The store held more; only the oldest ones read are counted.")
    return lines


def _section(title: str, counts: Counts, width: int) -> list[str]:
    if not counts:
        return []
    rows = [f"  {_fit(name, width):<{width}}  {count:>6}" for name, count in counts]
    return ["", title, *rows]


def _timeline(report: Report) -> list[str]:
    if not report.over_time:
        return []
    unit = {3600.0: "hour", 86_400.0: "day"}.get(report.bucket_seconds, "week")
    peak = max(bucket.count for bucket in report.over_time) or 1
    rows = [
        f"  {shown(b.start)[:16]}  {b.count:>6}  {_bar(b.count, peak)}".rstrip()
        for b in report.over_time
    ]
    return ["", f"Over time (per {unit})", *rows]


def _bar(count: int, peak: int) -> str:
    return "#" * round(_BAR_WIDTH * count / peak)


def _listing(denials: Sequence[AuditEntry]) -> list[str]:
    if not denials:
        return ["", "No denials match."]
    rows = [_listing_row(entry) for entry in denials]
    return ["", "Denials", *columns([_LISTING_HEADER, *rows])]


def _listing_row(entry: AuditEntry) -> tuple[str, ...]:
    return (
        shown(entry.time),
        entry.decision_id,
        principal_of(entry),
        entry.client_id or "",
        tool_of(entry),
        entry.category,
        ", ".join(deciding_policies(entry)),
        "shadow" if entry.shadow else "",
    )


def columns(rows: Sequence[Sequence[str]]) -> Iterable[str]:
    """Rows of cells as aligned, indented lines.

    The first two columns (a time or call, and a decision id) and the last
    one are never cut: a reviewer copies them whole. The others are cut to
    a fixed width.
    """
    last = len(rows[0]) - 1
    cells = [
        [printable(c) if n < 2 or n == last else _fit(c) for n, c in enumerate(row)]
        for row in rows
    ]
    widths = [max(len(row[n]) for row in cells) for n in range(last + 1)]
    for row in cells:
        padded = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        yield ("  " + "  ".join(padded)).rstrip()


def _fit(text: str, width: int = _CELL_WIDTH) -> str:
    text = printable(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def printable(text: str) -> str:
    """``text`` with every control character shown as an escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
