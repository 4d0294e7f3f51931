"""The approvers' page in Debian's headless Chromium, driven by Playwright.

An approver signs in through the test OpenID provider, sees the call that
waits, and approves it; the agent's call then completes. Setting
``UPDATE_SCREENSHOTS=1`` also saves the page as docs/approvals.png.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.approvals_support import DELETE, agent_token, shared_broker
from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.harness import REPO, RunningBroker, agent
from tests.idp import LocalIdP
from tests.oidc import OidcProvider

SCREENSHOT = REPO / "docs" / "approvals.png"


@pytest.fixture(scope="module")
def broker(
    tmp_path_factory: pytest.TempPathFactory, session_idp: LocalIdP
) -> Iterator[RunningBroker]:
    """A broker serving the page; its calls wait up to 30 s for an approver."""
    workdir = tmp_path_factory.mktemp("approvals-browser")
    with (
        OidcProvider() as provider,
        shared_broker(workdir, session_idp, wait=30, oidc=provider) as running,
    ):
        yield running


@pytest.fixture
def idp(broker: RunningBroker, session_idp: LocalIdP) -> LocalIdP:
    """The identity provider, issuing agents' tokens for the module's broker."""
    return session_idp


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


async def open_pending(browser: Browser, broker: RunningBroker) -> Page:
    """Sign in and wait until the page lists an action."""
    page = await browser.new_page(viewport={"width": 1000, "height": 820})
    await page.goto(f"{broker.origin}/approvals/")
    for _ in range(100):
        if await page.locator("article.action").count():
            return page
        await anyio.sleep(0.1)
        await page.reload()
    raise AssertionError("no pending action appeared on the page")


async def call_into(
    results: list[Any], broker: RunningBroker, token: str, tool: str, arguments: Any
) -> None:
    async with agent(broker.url, token) as client:
        results.append(await client.call_tool(tool, arguments))


async def test_an_approver_approves_a_waiting_call_in_the_browser(
    broker: RunningBroker, idp: LocalIdP, browser: Browser, tmp_path: Path
) -> None:
    """Signed in, the approver sees the waiting transfer, approves, and it runs."""
    transfer = {"amount": 250000, "to": "ACME Supplies Ltd", "memo": "Invoice 114"}
    results: list[Any] = []
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(
            call_into, results, broker, agent_token(idp), "demo.transfer", transfer
        )
        page = await open_pending(browser, broker)
        await page.screenshot(path=tmp_path / "approvals.png", full_page=True)
        card = await page.locator("article.action").inner_text()
        await page.fill("textarea[name=reason]", "Matches invoice 114")
        await page.click("button.approve")
        outcome = await page.locator("p.outcome").inner_text()
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        shutil.copy(tmp_path / "approvals.png", SCREENSHOT)
    assert "demo.transfer" in card
    assert "ACME Supplies Ltd" in card
    assert "transfer-limit" in card
    assert outcome.startswith("Approved")
    assert outcome.endswith("by carol: “Matches invoice 114”")
    assert results[0].is_error is False
    sent = [r for r in broker.downstream_saw() if r.get("tool") == "transfer"]
    assert [r["arguments"]["amount"] for r in sent] == [250000]


async def test_a_script_in_the_arguments_is_shown_and_not_run(
    broker: RunningBroker, idp: LocalIdP, browser: Browser
) -> None:
    """A script tag in a tool argument appears as text; the browser runs nothing."""
    script = "<script>document.title='owned';alert('owned')</script>"
    dialogs: list[str] = []
    results: list[Any] = []
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(
            call_into, results, broker, agent_token(idp), DELETE, {"title": script}
        )
        page = await open_pending(browser, broker)
        page.on("dialog", lambda dialog: dialogs.append(dialog.message))
        shown = await page.locator("pre.arguments").inner_text()
        title = await page.title()
        await page.fill("textarea[name=reason]", "no scripts, thank you")
        await page.click("button.reject")
    assert script in shown
    assert title == "Pending actions · MCP broker"
    assert dialogs == []
    assert results[0].structured_content["broker"]["category"] == "rejected"
