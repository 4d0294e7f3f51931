"""The report page, read in a real headless Chromium from a broker process.

The broker's store is seeded with a day of decisions before it starts, and
one real call is denied through it; the page is then opened with a bearer
token, as an agent's token is sent to /mcp. Set UPDATE_SCREENSHOTS=1 to save
the reviewer's view to docs/report.png.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from broker.audit import AuditEntry, SqliteStore
from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.decisions import SCRIPT, a_day, denials_of
from tests.harness import RunningBroker, agent, running_broker
from tests.idp import LocalIdP

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "report.png"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


@pytest.fixture
def seeded(workdir: Path) -> list[AuditEntry]:
    """A day of decisions, written to the store before the broker starts."""
    entries = a_day(time.time())
    store = SqliteStore(workdir / "state.db")
    for entry in entries:
        store.record(entry)
    store.close()
    return entries


@pytest.fixture
def reviewed(
    seeded: list[AuditEntry], workdir: Path, port: int, live_idp: LocalIdP
) -> Iterator[tuple[RunningBroker, str]]:
    """The broker, and the decision id of a call it denied itself."""
    with running_broker(workdir, port) as running:
        # Playwright's sync API keeps an event loop on this thread; the SDK's
        # client gets a thread of its own.
        with ThreadPoolExecutor(1) as pool:
            denied = pool.submit(
                anyio.run, _denied_write, running.url, live_idp.token()
            )
            decision_id = denied.result(timeout=60)
        yield running, decision_id


async def _denied_write(url: str, token: str) -> str:
    async with agent(url, token) as client:
        result = await client.call_tool("demo.write_note", {"title": "t", "body": "b"})
    return str(result.structured_content["broker"]["decision_id"])


def reviewer_token(idp: LocalIdP, *, groups: list[str] | None = None) -> str:
    return idp.token(idp.claims(sub="sam", groups=groups or ["security"]))


def open_report(
    browser: Browser, broker: RunningBroker, token: str, query: str = ""
) -> tuple[Page, Any, list[str]]:
    """The page, its response, and every console message of type error."""
    context = browser.new_context(
        viewport={"width": 1360, "height": 900},
        extra_http_headers={"Authorization": f"Bearer {token}"},
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("dialog", lambda d: errors.append(f"dialog: {d.message}"))
    response = page.goto(f"{broker.origin}/report{query}")
    return page, response, errors


def test_a_security_reviewer_sees_the_counts_and_the_charts(
    browser: Browser,
    reviewed: tuple[RunningBroker, str],
    seeded: list[AuditEntry],
    live_idp: LocalIdP,
) -> None:
    """A member of security gets the day's denials counted, charted and listed."""
    broker, decision_id = reviewed
    expected = len(denials_of(seeded)) + 1

    page, response, errors = open_report(browser, broker, reviewer_token(live_idp))

    assert response.status == 200
    assert page.title() == "Denied calls · MCP broker"
    assert _card(page, "Denials") == expected
    assert _card(page, "Shadow, not enforced") == 3
    assert _charted(page) == expected
    by_reason = page.locator('svg[aria-label="Denials by reason"] text')
    reasons = by_reason.all_text_contents()
    assert {"forbidden", "unauthenticated", "not_found", "quarantined"} <= set(reasons)
    assert page.locator("table.denials tbody tr").count() == expected
    assert page.locator("tr.shadowed .badge").count() == 3
    assert page.get_by_text(decision_id).count() == 1
    assert errors == []
    _screenshot(page)


def test_a_user_outside_security_is_refused_and_recorded(
    browser: Browser, reviewed: tuple[RunningBroker, str], live_idp: LocalIdP
) -> None:
    """Policy refuses a reader outside the group; the refusal is itself a denial."""
    broker, _ = reviewed
    outsider = reviewer_token(live_idp, groups=["eng", "writers"])

    page, response, _ = open_report(browser, broker, outsider)

    assert response.status == 403
    assert "Denials" not in page.locator("main").inner_text()
    refusal_id = re.search(r"Decision id: ([0-9a-f]{32})", page.content())
    assert refusal_id is not None
    listed = _json_report(broker, reviewer_token(live_idp), "category=forbidden")
    refusals = [d for d in listed["denials"] if d["method"] == "report/read"]
    assert [(d["decision_id"], d["subject"]) for d in refusals] == [
        (refusal_id[1], "sam")
    ]


def test_markup_in_an_argument_is_shown_not_run(
    browser: Browser, reviewed: tuple[RunningBroker, str], live_idp: LocalIdP
) -> None:
    """An argument holding a script and an onerror image appears as plain text."""
    broker, _ = reviewed

    page, _, errors = open_report(browser, broker, reviewer_token(live_idp))

    assert page.locator("code", has_text="<script>document.title").count() == 1
    assert SCRIPT in page.locator("table.denials").inner_text()
    assert page.evaluate("document.scripts.length") == 0
    assert page.locator("img").count() == 0
    assert page.title() == "Denied calls · MCP broker"
    assert errors == []


def test_filters_in_the_query_narrow_the_page(
    browser: Browser,
    reviewed: tuple[RunningBroker, str],
    seeded: list[AuditEntry],
    live_idp: LocalIdP,
) -> None:
    """The page takes the CLI's filters; the form shows the ones in force."""
    broker, _ = reviewed
    probes = [d for d in denials_of(seeded) if d.subject == "mallory"]

    page, _, _ = open_report(
        browser, broker, reviewer_token(live_idp), "?subject=mallory&last=24h"
    )

    assert _card(page, "Denials") == len(probes)
    assert page.locator('input[name="subject"]').input_value() == "mallory"


def test_the_page_is_sent_with_a_strict_policy(
    reviewed: tuple[RunningBroker, str], live_idp: LocalIdP
) -> None:
    """No script, no framing, no sniffing, no caching; no token gets a 401."""
    broker, _ = reviewed
    headers = {"Authorization": f"Bearer {reviewer_token(live_idp)}"}

    response = httpx2.get(f"{broker.origin}/report", headers=headers)
    anonymous = httpx2.get(f"{broker.origin}/report")

    policy = response.headers["content-security-policy"]
    assert policy.startswith("default-src 'none'; style-src 'sha256-")
    assert "frame-ancestors 'none'" in policy
    assert "script-src" not in policy
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    assert anonymous.status_code == 401
    assert "resource_metadata=" in anonymous.headers["www-authenticate"]


def test_json_and_csv_carry_the_same_count(
    reviewed: tuple[RunningBroker, str],
    seeded: list[AuditEntry],
    live_idp: LocalIdP,
) -> None:
    """The page's formats for tools agree with the seeded denials."""
    broker, _ = reviewed
    token = reviewer_token(live_idp)
    expected = len(denials_of(seeded)) + 1

    document = _json_report(broker, token, "")
    table = httpx2.get(
        f"{broker.origin}/report?format=csv",
        headers={"Authorization": f"Bearer {token}"},
    )

    assert document["total"] == expected
    assert table.headers["content-type"].startswith("text/csv")
    assert len(table.text.strip().splitlines()) == expected + 1


def _json_report(broker: RunningBroker, token: str, query: str) -> Any:
    response = httpx2.get(
        f"{broker.origin}/report?format=json&{query}",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 200, response.text
    return response.json()


def _card(page: Page, label: str) -> int:
    card = page.locator(".card", has=page.locator("span", has_text=label))
    return int(card.locator("b").inner_text())


def _charted(page: Page) -> int:
    """The sum of the counts in the timeline's bar titles."""
    chart = page.locator('svg[aria-label="Denials over time, stacked by reason"]')
    titles = chart.locator("rect > title").all_text_contents()
    assert titles, "the timeline has no bars"
    return sum(int(title.split(": ")[1].split()[0]) for title in titles)


def _screenshot(page: Page) -> None:
    page.set_viewport_size({"width": 1360, "height": 1240})
    shot = page.screenshot()
    assert shot.startswith(b"\x89PNG")
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.write_bytes(shot)
