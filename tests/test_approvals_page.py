"""The approvers' page over HTTP: sign-in, decisions, and browser safety."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest

from broker.approvals.gate import Approvals
from broker.approvals.page import page_app
from broker.approvals.signin import SignIn
from broker.approvals.store import SqliteApprovalStore
from broker.audit import SqliteStore
from broker.config import ApprovalsConfig
from broker.manifest import load_manifests
from broker.policy import PolicyEngine
from tests.approvals_support import DELETE, agent_token, shared_broker
from tests.harness import REPO, RunningBroker, agent
from tests.idp import LocalIdP
from tests.oidc import CLIENT_ID, CLIENT_SECRET, OidcProvider, User

SCRIPT = "<script>document.title='owned'</script>"


@pytest.fixture(scope="module")
def provider() -> Iterator[OidcProvider]:
    with OidcProvider() as running:
        yield running


@pytest.fixture(scope="module")
def broker(
    tmp_path_factory: pytest.TempPathFactory,
    session_idp: LocalIdP,
    provider: OidcProvider,
) -> Iterator[RunningBroker]:
    """One broker for the module, signing approvers in through ``provider``."""
    workdir = tmp_path_factory.mktemp("approvals-page")
    with shared_broker(workdir, session_idp, wait=0.2, oidc=provider) as running:
        yield running


@pytest.fixture
def idp(broker: RunningBroker, session_idp: LocalIdP) -> LocalIdP:
    """The identity provider, issuing agents' tokens for the module's broker."""
    return session_idp


@pytest.fixture(autouse=True)
def carol_signs_in(provider: OidcProvider) -> None:
    """Unless a test says otherwise, the provider signs in Carol, an approver."""
    provider.user = User()


@contextmanager
def signed_in(broker: RunningBroker) -> Iterator[httpx2.Client]:
    """A browser-like client that has signed in and sits on the page."""
    with httpx2.Client(
        base_url=broker.origin, follow_redirects=True, timeout=10
    ) as browser:
        landed = browser.get("/approvals/")
        assert landed.url.path == "/approvals/", landed.text
        yield browser


def csrf_of(page: str) -> str:
    return page.split('name=csrf value="')[1].split('"')[0]


async def held_call(broker: RunningBroker, idp: LocalIdP, title: str) -> str:
    """Make an agent call that ends pending; its action id."""
    async with agent(broker.url, agent_token(idp)) as client:
        result = await client.call_tool(DELETE, {"title": title})
    assert result.structured_content is not None
    return str(result.structured_content["broker"]["action_id"])


async def test_sign_in_uses_pkce_and_the_page_lists_the_action(
    broker: RunningBroker, idp: LocalIdP, provider: OidcProvider
) -> None:
    """After a PKCE sign-in the page shows who asked, for which tool and why."""
    action_id = await held_call(broker, idp, "plans")
    with signed_in(broker) as browser:
        page = browser.get("/approvals/").text
    asked = provider.authorize_requests[-1]
    assert asked["code_challenge_method"] == "S256"
    assert f'id="action-{action_id}"' in page
    assert "wanda" in page
    assert "destructive-needs-approval" in page
    assert "Carol Approver" in page


async def test_the_session_cookie_is_http_only_and_same_site(
    broker: RunningBroker,
) -> None:
    """The session cookie is HttpOnly, SameSite=Lax and limited to /approvals."""
    with httpx2.Client(base_url=broker.origin, timeout=10) as browser:
        started = browser.get("/approvals/login")
    cookie = started.headers["set-cookie"].lower()
    assert cookie.startswith("broker_approver=")
    assert "httponly" in cookie
    assert "samesite=lax" in cookie
    assert "path=/approvals" in cookie


@pytest.mark.parametrize("path", ["/approvals/", "/approvals/actions/nope"])
def test_every_page_forbids_framing_scripts_and_sniffing(
    broker: RunningBroker, path: str
) -> None:
    """Each answer, found or not, carries the headers that keep the page safe."""
    with signed_in(broker) as browser:
        answer = browser.get(path)
    policy = answer.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "frame-ancestors 'none'" in policy
    assert "form-action 'self'" in policy
    assert "script-src" not in policy
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["x-content-type-options"] == "nosniff"


async def test_a_script_in_the_arguments_is_shown_as_text(
    broker: RunningBroker, idp: LocalIdP
) -> None:
    """An argument holding a script tag reaches the page escaped."""
    await held_call(broker, idp, SCRIPT)
    with signed_in(broker) as browser:
        page = browser.get("/approvals/").text
    assert "<script>" not in page
    assert "&lt;script&gt;document.title=&#x27;owned&#x27;&lt;/script&gt;" in page


async def test_approving_on_the_page_lets_the_retry_through(
    broker: RunningBroker, idp: LocalIdP
) -> None:
    """A form post with the session's CSRF token approves; the retry goes ahead."""
    action_id = await held_call(broker, idp, "plans")
    with signed_in(broker) as browser:
        token = csrf_of(browser.get("/approvals/").text)
        done = browser.post(
            f"/approvals/actions/{action_id}/approve",
            data={"csrf": token, "reason": "checked with the owner"},
        )
    async with agent(broker.url, agent_token(idp)) as client:
        retried = await client.call_tool(DELETE, {"title": "plans"})
    assert done.url.path == f"/approvals/actions/{action_id}"
    assert "Approved by <strong>carol</strong>" in done.text
    assert retried.is_error is False


@pytest.mark.parametrize("token", [None, "forged"])
async def test_a_post_without_the_csrf_token_changes_nothing(
    broker: RunningBroker, idp: LocalIdP, token: str | None
) -> None:
    """Missing or wrong, a bad CSRF token is refused and the action stays pending."""
    action_id = await held_call(broker, idp, "plans")
    form = {"reason": "x"} | ({"csrf": token} if token else {})
    with signed_in(broker) as browser:
        refused = browser.post(f"/approvals/actions/{action_id}/approve", data=form)
        shown = browser.get(f"/approvals/actions/{action_id}").text
    assert refused.status_code == 403
    assert "badge pending" in shown


async def test_a_post_from_another_site_is_refused(
    broker: RunningBroker, idp: LocalIdP
) -> None:
    """A form posted from another origin is refused before the page sees it."""
    action_id = await held_call(broker, idp, "plans")
    with signed_in(broker) as browser:
        token = csrf_of(browser.get("/approvals/").text)
        refused = browser.post(
            f"/approvals/actions/{action_id}/approve",
            data={"csrf": token},
            headers={"Origin": "http://evil.example"},
        )
    assert refused.status_code == 403


async def test_someone_outside_the_approvers_group_may_not_decide(
    broker: RunningBroker, idp: LocalIdP, provider: OidcProvider
) -> None:
    """Dave signs in fine, sees no action, and his approval is refused."""
    action_id = await held_call(broker, idp, "plans")
    provider.user = User(sub="dave", name="Dave", groups=[])
    with signed_in(broker) as browser:
        page = browser.get("/approvals/").text
        refused = browser.post(
            f"/approvals/actions/{action_id}/approve", data={"csrf": csrf_of(page)}
        )
    assert "Nothing is waiting for you" in page
    assert refused.status_code == 403


async def test_the_cookie_is_secure_when_served_over_https(
    tmp_path: Path, provider: OidcProvider
) -> None:
    """With an https public URL, the session cookie is also marked Secure."""
    config = ApprovalsConfig(
        public_url="https://broker.example",
        oidc_issuer=provider.issuer,
        oidc_client_id=CLIENT_ID,
    )
    audit = SqliteStore(tmp_path / "state.db")
    store = SqliteApprovalStore(tmp_path / "state.db")
    tools = load_manifests(REPO / "tool_manifests")["demo"].tools.values()
    engine = PolicyEngine.load(REPO / "cedar_policies", list(tools))
    approvals = Approvals(config, store, audit, lambda: engine)
    app = page_app(approvals, SignIn(config, CLIENT_SECRET), "secret", https=True)
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(
        transport=transport, base_url="https://broker.example"
    ) as browser:
        started = await browser.get("/login")
    store.close()
    audit.close()
    assert started.status_code == 302
    assert "secure" in started.headers["set-cookie"].lower()
