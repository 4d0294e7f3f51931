"""The report page's HTML: everything escaped, nothing the page policy would refuse."""

from __future__ import annotations

import base64
import hashlib
import re

from broker.audit import AuditEntry
from broker.report import Filters, build
from broker.report_html import STYLE_HASH, _colours, message_page, page

NOW = 1_800_000_000.0
MARKUP = '"><script>alert(1)</script><img src=x onerror=alert(2)>'


def hostile(n: int) -> AuditEntry:
    """A denial whose every agent-chosen field holds markup."""
    return AuditEntry(
        decision_id=f"d{n}",
        time=NOW - 60 * n,
        method="tools/call",
        outcome="deny",
        category=f"cat{MARKUP}",
        subject=f"sub{MARKUP}",
        client_id=f"client{MARKUP}",
        server="demo",
        tool=f"demo.t{MARKUP}",
        reasons=(f"policy{MARKUP}",),
        arguments={f"key{MARKUP}": f"value{MARKUP}"},
        detail=MARKUP,
    )


def rendered(query: dict[str, str] | None = None) -> str:
    report = build([hostile(1), hostile(2)], Filters(since=NOW - 3600), now=NOW)
    return page(report, viewer=f"viewer{MARKUP}", query=query or {})


def test_markup_from_the_record_is_escaped_everywhere() -> None:
    """No field of an entry can open a tag: markup arrives as text."""
    html = rendered()

    assert "<script" not in html
    assert "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'onerror=alert(2)"' not in html


def test_the_query_reflected_in_the_form_is_escaped() -> None:
    """Filter values shown back in the form and links cannot break out."""
    html = rendered({"subject": MARKUP, "tool": "a&b"})

    assert "<script" not in html
    assert 'value="&quot;&gt;&lt;script&gt;' in html
    assert "subject=%22%3E%3Cscript%3E" in html


def test_nothing_on_the_page_needs_more_than_its_stylesheet() -> None:
    """No inline style attribute, no script, and the one style block has the hash."""
    html = rendered()

    (style,) = re.findall(r"<style>(.*?)</style>", html, flags=re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert f"sha256-{digest}" == STYLE_HASH
    assert " style=" not in html
    assert "<script" not in message_page("x", "y")


def test_an_empty_report_says_there_is_nothing() -> None:
    """With no denials the charts give way to a plain sentence."""
    html = page(build([], Filters(since=NOW - 3600), now=NOW), viewer="v", query={})

    assert "No denials in this range." in html
    assert "Nothing was denied." in html


def test_reason_colours_are_fixed_for_known_reasons_and_distinct_for_others() -> None:
    """A known reason keeps its colour; unknown ones each get their own."""
    first = _colours(["forbidden", "later_kind", "other_kind"])
    second = _colours(["forbidden"])

    assert first["forbidden"] == second["forbidden"]
    assert len(set(first.values())) == 3
