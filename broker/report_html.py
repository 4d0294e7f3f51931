"""The denied-call report drawn as one HTML page, charts in inline SVG.

Nothing on the page runs: there is no script, and the stylesheet is one
fixed block that the page's Content-Security-Policy admits by its hash
(``STYLE_HASH``). No element carries a ``style`` attribute, since the policy
would refuse it; colours in the charts are SVG presentation attributes.

Every value that came from the record goes through ``_e`` (HTML escaping,
quotes included) on its way into the page. Subjects, tool names and
arguments were chosen by agents; one holding markup shows as text.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import urlencode

from broker.audit import AuditEntry
from broker.report import Bucket, Counts, Report, deciding_policies, tool_of
from broker.when import iso, shown

# The newest denials listed one by one; the counts and charts cover them all.
LISTED = 500

_ARGUMENT_CHARS = 160
FORMS = ("json", "csv")

# Reason categories in a fixed colour each; others take the spare ones in turn.
_PALETTE = (
    "#e8590c",
    "#7048e8",
    "#868e96",
    "#f59f00",
    "#1c7ed6",
    "#0ca678",
    "#c2255c",
    "#5c940d",
    "#1098ad",
    "#ae3ec9",
)
_KNOWN = (
    "forbidden",
    "unauthenticated",
    "not_found",
    "quarantined",
    "method_refused",
    "downstream_unavailable",
    "record_unavailable",
    "insufficient_scope",
)

STYLE = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto,
  "Helvetica Neue", Arial, sans-serif; color: #1f2933; background: #f4f6f8; }
header { background: #102a43; color: #f0f4f8; padding: 18px 32px; }
header h1 { margin: 0; font-size: 20px; font-weight: 600; }
header p { margin: 4px 0 0; color: #9fb3c8; }
main { padding: 20px 32px 40px; max-width: 1440px; }
form { display: flex; flex-wrap: wrap; gap: 8px; align-items: end;
  margin-bottom: 18px; }
label { display: flex; flex-direction: column; font-size: 11px; color: #52606d;
  text-transform: uppercase; letter-spacing: .04em; }
input { font: inherit; font-size: 13px; padding: 4px 8px; width: 128px;
  border: 1px solid #bcccdc; border-radius: 6px; background: #fff; }
input::placeholder { color: #bcccdc; }
button { font: inherit; padding: 6px 14px; border: 0; border-radius: 6px;
  background: #243b53; color: #fff; cursor: pointer; }
.cards { display: grid; grid-template-columns: repeat(5, 1fr); gap: 12px;
  margin-bottom: 18px; }
.card { background: #fff; border-radius: 10px; padding: 14px 16px;
  box-shadow: 0 1px 3px rgba(16, 42, 67, .12); }
.card b { display: block; font-size: 28px; font-weight: 650; color: #102a43; }
.card span { color: #627d98; font-size: 12px; text-transform: uppercase;
  letter-spacing: .05em; }
.card.alert b { color: #c92a2a; }
.card.shadow b { color: #5f3dc4; }
.panel { background: #fff; border-radius: 10px; padding: 16px 18px;
  box-shadow: 0 1px 3px rgba(16, 42, 67, .12); margin-bottom: 18px; }
.panel h2 { margin: 0 0 10px; font-size: 15px; color: #243b53; }
.row { display: grid; grid-template-columns: 2fr 1fr; gap: 18px; }
.groups { display: grid; grid-template-columns: repeat(4, 1fr); gap: 18px; }
.legend { display: flex; flex-wrap: wrap; gap: 14px; font-size: 12px;
  color: #52606d; margin-top: 6px; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px;
  margin-right: 5px; vertical-align: -1px; }
table { width: 100%; border-collapse: collapse; }
th { text-align: left; font-size: 11px; text-transform: uppercase;
  letter-spacing: .05em; color: #627d98; border-bottom: 1px solid #d9e2ec;
  padding: 6px 8px; }
td { padding: 6px 8px; border-bottom: 1px solid #edf2f7; vertical-align: top; }
table.denials { font-size: 13px; }
table.denials td.nowrap { white-space: nowrap; }
table.denials td.args { max-width: 300px; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
code, .id { font: 12px/1.4 ui-monospace, "SFMono-Regular", Menlo, Consolas,
  monospace; }
code { color: #334e68; word-break: break-all; }
.id { color: #486581; }
.pill { display: inline-block; padding: 1px 8px; border-radius: 999px;
  color: #fff; font-size: 12px; white-space: nowrap; }
.badge { display: inline-block; padding: 1px 7px; border-radius: 4px;
  background: #e5dbff; color: #5f3dc4; font-size: 11px; font-weight: 600;
  text-transform: uppercase; letter-spacing: .05em; }
tr.shadowed td { background: #f8f5ff; }
.note { color: #627d98; font-size: 12px; }
.empty { color: #829ab1; padding: 24px 0; text-align: center; }
a { color: #1c7ed6; }
""" + "".join(
    f".c{n} {{ background: {colour}; }}\n" for n, colour in enumerate(_PALETTE)
)

STYLE_HASH = "sha256-" + base64.b64encode(
    hashlib.sha256(STYLE.encode()).digest()
).decode("ascii")


def page(report: Report, *, viewer: str, query: Mapping[str, str]) -> str:
    """The whole page for ``report``, as read by ``viewer``."""
    colours = _colours(name for name, _ in report.by_category)
    body = "".join(
        [
            _header(report, viewer),
            "<main>",
            _form(query),
            _cards(report),
            _charts(report, colours),
            _groups(report),
            _listing(report.denials, colours),
            _downloads(query),
            "</main>",
        ]
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>Denied calls · MCP broker</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )


def message_page(title: str, text: str) -> str:
    """A page that says one thing, for refusals and errors."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)} · MCP broker</title><style>{STYLE}</style></head>"
        f"<body><header><h1>{_e(title)}</h1></header>"
        f"<main><div class=panel><p>{_e(text)}</p></div></main></body></html>"
    )


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _colours(categories: Iterable[str]) -> dict[str, str]:
    colours: dict[str, str] = {}
    spare = len(_KNOWN)
    for name in sorted(categories):
        if name in _KNOWN:
            colours[name] = _PALETTE[_KNOWN.index(name)]
        else:
            colours[name] = _PALETTE[spare % len(_PALETTE)]
            spare += 1
    return colours


def _palette_class(colour: str) -> str:
    return f"c{_PALETTE.index(colour)}"


# ---- the top of the page ---------------------------------------------------------


def _header(report: Report, viewer: str) -> str:
    since = "the first entry" if report.since is None else shown(report.since)
    until = "now" if report.until is None else shown(report.until)
    return (
        "<header><h1>Denied calls</h1>"
        f"<p>{_e(since)} to {_e(until)} UTC · read by {_e(viewer)}</p></header>"
    )


_FORM_FIELDS = (
    ("last", "Last", "24h"),
    ("since", "Since (UTC)", "2026-12-01T00:00"),
    ("until", "Until (UTC)", ""),
    ("subject", "Principal", ""),
    ("client", "Agent", ""),
    ("tool", "Tool", "server.tool"),
    ("category", "Reason", "forbidden"),
    ("policy", "Policy", "@id"),
)


def _form(query: Mapping[str, str]) -> str:
    inputs = "".join(
        f'<label>{_e(label)}<input name={_e(name)} value="{_e(query.get(name, ""))}"'
        f' placeholder="{_e(hint)}"></label>'
        for name, label, hint in _FORM_FIELDS
    )
    return f'<form method="get" action="/report">{inputs}<button>Apply</button></form>'


def _cards(report: Report) -> str:
    cards = (
        ("Denials", report.total, "alert" if report.total else ""),
        ("Principals", len(report.by_principal), ""),
        ("Agents", len(report.by_client), ""),
        ("Tools", len(report.by_tool), ""),
        ("Shadow, not enforced", report.shadow, "shadow" if report.shadow else ""),
    )
    inner = "".join(
        f'<div class="card {kind}"><b>{count}</b><span>{_e(label)}</span></div>'
        for label, count, kind in cards
    )
    note = ""
    if report.truncated:
        note = "<p class=note>The store held more denials than one report reads.</p>"
    return f"<section class=cards>{inner}</section>{note}"


# ---- charts ------------------------------------------------------------------------


def _charts(report: Report, colours: Mapping[str, str]) -> str:
    legend = "".join(
        f'<span><i class="swatch {_palette_class(colour)}"></i>{_e(name)}</span>'
        for name, colour in colours.items()
    )
    unit = {3600.0: "hour", 86_400.0: "day"}.get(report.bucket_seconds, "week")
    return (
        "<section class=row>"
        f"<div class=panel><h2>Denials over time, per {unit}</h2>"
        f"{timeline_svg(report.over_time, report.bucket_seconds, colours)}"
        f"<div class=legend>{legend}</div></div>"
        "<div class=panel><h2>By reason</h2>"
        f"{reasons_svg(report.by_category, colours)}</div>"
        "</section>"
    )


def timeline_svg(
    buckets: Sequence[Bucket], size: float, colours: Mapping[str, str]
) -> str:
    """Stacked bars, one per bucket, coloured by reason; a title on each."""
    if not buckets:
        return "<p class=empty>No denials in this range.</p>"
    width, height, left, bottom, top = 760, 230, 36, 26, 10
    plot = height - bottom - top
    peak = _nice_ceiling(max(bucket.count for bucket in buckets))
    right = width - 16  # room for the last label
    step = (right - left) / len(buckets)
    parts = [_grid(peak, left, right, top, plot)]
    for n, bucket in enumerate(buckets):
        x = left + n * step
        parts.append(_stack(bucket, x, step, top + plot, plot / peak, colours, size))
        if n % max(1, len(buckets) // 8) == 0:
            parts.append(_x_label(x + step / 2, height - 8, bucket.start, size))
    return _svg(width, height, "Denials over time, stacked by reason", parts)


def _grid(peak: int, left: int, width: int, top: int, plot: int) -> str:
    lines = []
    for tick in _ticks(peak):
        y = top + plot - plot * tick / peak
        lines.append(
            f'<line x1="{left}" x2="{width}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#e4e7eb" stroke-width="1"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" '
            f'font-size="11" fill="#7b8794">{tick}</text>'
        )
    return "".join(lines)


def _stack(
    bucket: Bucket,
    x: float,
    step: float,
    base: float,
    scale: float,
    colours: Mapping[str, str],
    size: float,
) -> str:
    bar = max(step * 0.72, 1.0)
    offset = x + (step - bar) / 2
    rects = []
    y = base
    for category, count in bucket.by_category:
        h = count * scale
        y -= h
        label = f"{_when(bucket.start, size)}: {count} {category}"
        rects.append(
            f'<rect x="{offset:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
            f'rx="2" fill="{colours[category]}"><title>{_e(label)}</title></rect>'
        )
    return "".join(rects)


def _x_label(x: float, y: float, start: float, size: float) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="middle" font-size="11" '
        f'fill="#7b8794">{_e(_when(start, size))}</text>'
    )


def reasons_svg(counts: Counts, colours: Mapping[str, str]) -> str:
    """Horizontal bars, one per reason category, with its count."""
    if not counts:
        return "<p class=empty>Nothing was denied.</p>"
    width, row, label_width = 360, 30, 150
    height = row * len(counts) + 4
    peak = max(count for _, count in counts)
    parts = []
    for n, (name, count) in enumerate(counts):
        y = n * row + 4
        bar = max((width - label_width - 40) * count / peak, 2)
        parts.append(
            f'<text x="0" y="{y + 15}" font-size="12" fill="#334e68">{_e(name)}</text>'
            f'<rect x="{label_width}" y="{y + 3}" width="{bar:.1f}" height="16" '
            f'rx="3" fill="{colours[name]}"><title>{_e(name)}: {count}</title></rect>'
            f'<text x="{label_width + bar + 6:.1f}" y="{y + 15}" font-size="12" '
            f'font-weight="600" fill="#243b53">{count}</text>'
        )
    return _svg(width, height, "Denials by reason", parts)


def _svg(width: int, height: int, title: str, parts: Iterable[str]) -> str:
    return (
        f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" '
        f'aria-label="{_e(title)}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{_e(title)}</title>{''.join(parts)}</svg>"
    )


def _nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50... that is at least ``value``."""
    ceiling = 1
    while ceiling < value:
        ceiling = _next_nice(ceiling)
    return ceiling


def _next_nice(value: int) -> int:
    digits = int(10 ** math.floor(math.log10(value)))
    lead = value // digits
    return (2 if lead == 1 else 5 if lead == 2 else 10) * digits


def _ticks(peak: int) -> list[int]:
    """Grid lines for a nice ``peak``: four or five steps of a round size."""
    digits = int(10 ** math.floor(math.log10(peak)))
    step = max(1, peak // (4 if peak // digits == 2 else 5))
    return list(range(0, peak + 1, step))


def _when(start: float, size: float) -> str:
    text = shown(start)
    return text[11:16] if size < 86_400 else text[:10]


# ---- counts and the listing ------------------------------------------------------


def _groups(report: Report) -> str:
    tables = (
        ("Principals", report.by_principal),
        ("Agents", report.by_client),
        ("Tools", report.by_tool),
        ("Deciding policies", report.by_policy),
    )
    inner = "".join(
        f"<div class=panel><h2>{_e(title)}</h2>{_count_table(counts)}</div>"
        for title, counts in tables
    )
    return f"<section class=groups>{inner}</section>"


def _count_table(counts: Counts) -> str:
    if not counts:
        return "<p class=empty>None</p>"
    rows = "".join(
        f"<tr><td>{_e(name)}</td><td class=n>{count}</td></tr>"
        for name, count in counts[:10]
    )
    more = ""
    if len(counts) > 10:
        more = f"<p class=note>and {len(counts) - 10} more</p>"
    return f"<table><tbody>{rows}</tbody></table>{more}"


_LISTING_HEADER = (
    "Time (UTC)",
    "Decision id",
    "Principal",
    "Agent",
    "Tool",
    "Reason",
    "Deciding policies",
    "Arguments (redacted)",
    "",
)


def _listing(denials: Sequence[AuditEntry], colours: Mapping[str, str]) -> str:
    newest = list(reversed(denials[-LISTED:]))
    if not newest:
        return "<section class=panel><h2>Denials</h2><p class=empty>None.</p></section>"
    head = "".join(f"<th>{_e(name)}</th>" for name in _LISTING_HEADER)
    rows = "".join(_listing_row(entry, colours) for entry in newest)
    shown_of = f"newest {len(newest)} of {len(denials)}"
    return (
        f"<section class=panel><h2>Denials, {shown_of}</h2>"
        f"<table class=denials><thead><tr>{head}</tr></thead>"
        f"<tbody>{rows}</tbody></table></section>"
    )


def _listing_row(entry: AuditEntry, colours: Mapping[str, str]) -> str:
    colour = _palette_class(colours[entry.category])
    cells = (
        _e(shown(entry.time)),
        f"<span class=id>{_e(entry.decision_id)}</span>",
        _e(entry.subject or "(none)"),
        _e(entry.client_id or ""),
        _e(tool_of(entry)),
        f'<span class="pill {colour}">{_e(entry.category)}</span>',
        _e(", ".join(deciding_policies(entry))),
        f"<code>{_e(_arguments(entry.arguments))}</code>",
        "<span class=badge>shadow</span>" if entry.shadow else "",
    )
    kind = ' class="shadowed"' if entry.shadow else ""
    title = _e(f"recorded {iso(entry.time)}")
    tds = "".join(
        f"<td{_CELL_CLASSES.get(n, '')}>{cell}</td>" for n, cell in enumerate(cells)
    )
    return f'<tr{kind} title="{title}">{tds}</tr>'


# Time, decision id and reason stay on one line; arguments wrap in a column.
_CELL_CLASSES = {
    0: " class=nowrap",
    1: " class=nowrap",
    5: " class=nowrap",
    7: " class=args",
}


def _arguments(arguments: object) -> str:
    if arguments is None:
        return ""
    text = json.dumps(arguments, ensure_ascii=False, sort_keys=True)
    if len(text) > _ARGUMENT_CHARS:
        return text[: _ARGUMENT_CHARS - 1] + "…"
    return text


def _downloads(query: Mapping[str, str]) -> str:
    kept = {k: v for k, v in query.items() if k != "format" and v}
    hrefs = {form: "/report?" + urlencode({**kept, "format": form}) for form in FORMS}
    links = " · ".join(
        f'<a href="{_e(href)}">{form.upper()}</a>' for form, href in hrefs.items()
    )
    return f"<p class=note>The same report for tools: {links}.</p>"
