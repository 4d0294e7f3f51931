"""The approvers' web page, mounted at ``/approvals``.

Browser safety, in one place: a signed session cookie (HttpOnly, SameSite
Lax so the provider's redirect back still carries it, Secure when served
over https), a per-session CSRF token checked on every POST, and headers
that forbid framing, scripts and sniffing on every answer. The broker's
Origin check (HostGuard) refuses a POST from any other site as well.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.approvals import render
from broker.approvals.gate import Approvals, Verdict
from broker.approvals.signin import SESSION_SECONDS, SignIn
from broker.errors import BadRequest, Denied, Forbidden, NotFound, Unauthenticated
from broker.principal import Principal

log = logging.getLogger("broker.approvals.page")

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # Not "no-referrer": with it a browser posts forms with `Origin: null`,
    # which the broker's Origin check rightly refuses.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
COOKIE = "broker_approver"

Endpoint = Callable[[Request], Awaitable[Response]]


class Page:
    def __init__(self, approvals: Approvals, signin: SignIn) -> None:
        self.approvals = approvals
        self.signin = signin
        self.base = f"{approvals.config.public_url}/approvals"

    async def index(self, request: Request) -> Response:
        approver = self._signed_in(request)
        actions = self.approvals.pending_for(approver)
        viewer = self._viewer(request, approver)
        body = render.list_body(actions, viewer, self.approvals.clock(), self.base)
        return self._page(request, "Pending actions", body, viewer)

    async def show(self, request: Request) -> Response:
        approver = self._signed_in(request)
        action = self.approvals.show(approver, request.path_params["id"])
        viewer = self._viewer(request, approver)
        link = self.approvals.url_for(action.id)
        body = render.card(action, viewer, self.approvals.clock(), link)
        return self._page(request, f"Action {action.binding.tool}", body, viewer)

    def deciding(self, verdict: Verdict) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            approver = self._signed_in(request)
            form = await request.form(max_files=0, max_fields=4)
            if not _csrf_ok(request, form.get("csrf")):
                return _stale_form()
            reason = form.get("reason")
            action_id = request.path_params["id"]
            self.approvals.decide(
                approver, action_id, verdict, reason if isinstance(reason, str) else ""
            )
            request.session["flash"] = f"{verdict.capitalize()}d. The agent is told."
            return RedirectResponse(f"/approvals/actions/{action_id}", status_code=303)

        return endpoint

    async def login(self, request: Request) -> Response:
        try:
            return await self.signin.start(request)
        except Unauthenticated as denied:
            log.warning("approver sign-in unavailable: %s", denied.detail)
            return _refusal("Sign-in unavailable", "Try again later.", 503)

    async def callback(self, request: Request) -> Response:
        try:
            await self.signin.finish(request)
        except Unauthenticated as denied:
            log.warning("approver sign-in failed: %s", denied.detail)
            return _refusal("Sign-in failed", "Please sign in again.", 401)
        request.session["csrf"] = secrets.token_urlsafe(32)
        target = request.session.pop("next", "/approvals/")
        return RedirectResponse(target, status_code=303)

    async def logout(self, request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=2)
        if not _csrf_ok(request, form.get("csrf")):
            return _stale_form()
        request.session.clear()
        body = render.message_body("Signed out", "You have signed out.")
        return HTMLResponse(render.layout("Signed out", body, None))

    async def stylesheet(self, request: Request) -> Response:
        return Response(render.STYLESHEET, media_type="text/css")

    def _signed_in(self, request: Request) -> Principal:
        approver = self.signin.approver(request)
        if approver is None:
            if request.method == "GET":
                request.session["next"] = request.url.path
            raise Unauthenticated("not signed in")
        return approver

    def _viewer(self, request: Request, approver: Principal) -> render.Viewer:
        return render.Viewer(
            name=self.signin.display_name(request),
            groups=tuple(sorted(approver.groups)),
            csrf=str(request.session.get("csrf", "")),
        )

    def _page(
        self, request: Request, title: str, body: str, viewer: render.Viewer
    ) -> Response:
        flash = str(request.session.pop("flash", ""))
        return HTMLResponse(render.layout(title, body, viewer, flash))


def page_app(
    approvals: Approvals, signin: SignIn, session_secret: str, https: bool
) -> ASGIApp:
    """The page's routes, with the session and the security headers around them."""
    page = Page(approvals, signin)
    routes = [
        Route("/", _answering(page.index), methods=["GET"]),
        Route("/actions/{id}", _answering(page.show), methods=["GET"]),
        Route(
            "/actions/{id}/approve",
            _answering(page.deciding("approve")),
            methods=["POST"],
        ),
        Route(
            "/actions/{id}/reject",
            _answering(page.deciding("reject")),
            methods=["POST"],
        ),
        Route("/login", _answering(page.login), methods=["GET"]),
        Route("/callback", _answering(page.callback), methods=["GET"]),
        Route("/logout", _answering(page.logout), methods=["POST"]),
        Route("/page.css", page.stylesheet, methods=["GET"]),
    ]
    session = Middleware(
        SessionMiddleware,
        secret_key=session_secret,
        session_cookie=COOKIE,
        max_age=SESSION_SECONDS,
        path="/approvals",
        same_site="lax",
        https_only=https,
    )
    return SecurityHeaders(Starlette(routes=routes, middleware=[session]))


def _answering(endpoint: Endpoint) -> Endpoint:
    """``endpoint`` with each refusal shown as a page, or a sign-in redirect."""

    async def answered(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Unauthenticated:
            if request.method == "GET":
                return RedirectResponse("/approvals/login", status_code=303)
            return _refusal("Signed out", "Sign in again, then retry.", 401)
        except Denied as denied:
            return _refused(denied)

    return answered


def _refused(denied: Denied) -> Response:
    if isinstance(denied, NotFound):
        return _refusal("Not found", "No such action for you to see.", 404)
    if isinstance(denied, Forbidden):
        return _refusal("Not allowed", "Policy does not let you decide this.", 403)
    if isinstance(denied, BadRequest):
        return _refusal("Not done", denied.detail, 400)
    text = "It was already decided, used or has expired; nothing was changed."
    status = 409 if denied.category == "not_pending" else 503
    return _refusal("Not done", text if status == 409 else "Try again later.", status)


def _refusal(heading: str, text: str, status: int) -> Response:
    body = render.message_body(heading, text)
    return HTMLResponse(render.layout(heading, body, None), status_code=status)


def _csrf_ok(request: Request, given: object) -> bool:
    expected = request.session.get("csrf")
    return (
        isinstance(given, str)
        and isinstance(expected, str)
        and bool(expected)
        and hmac.compare_digest(given, expected)
    )


def _stale_form() -> Response:
    text = "The form did not come from this session. Reload the page and retry."
    return _refusal("Nothing done", text, 403)


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every answer of the wrapped app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.headers = [
            (name.lower().encode(), value.encode())
            for name, value in SECURITY_HEADERS.items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + self.headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
