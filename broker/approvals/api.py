"""The approvers' JSON API under ``/approvals/api``, and its OpenAPI document.

Every route sits behind the bearer check with the scope ``approvals:decide``,
so an agent's token for tools cannot even list pending actions. Who may see
and decide on which action is then Cedar's to say, per action.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker.approvals.gate import Approvals, Verdict
from broker.approvals.openapi import document
from broker.auth.edge import PRINCIPAL_KEY
from broker.errors import (
    BadRequest,
    Denied,
    Forbidden,
    NotFound,
    NotPending,
    Unauthenticated,
)
from broker.principal import Principal

APPROVER_SCOPE = "approvals:decide"
MAX_BODY_BYTES = 16 * 1024

_STATUS: Mapping[type[Denied], int] = {
    BadRequest: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    NotPending: 409,
}

Endpoint = Callable[[Request], Awaitable[Response]]


def api_app(approvals: Approvals) -> Starlette:
    """The API's routes; the caller puts the bearer check in front."""

    async def list_actions(request: Request) -> Response:
        viewer = _principal(request)
        shown = [approvals.describe(a) for a in approvals.pending_for(viewer)]
        return JSONResponse({"actions": shown})

    async def show_action(request: Request) -> Response:
        action = approvals.show(_principal(request), request.path_params["id"])
        return JSONResponse(approvals.describe(action))

    def deciding(verdict: Verdict) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            reason = await _reason(request)
            action_id = request.path_params["id"]
            action = approvals.decide(_principal(request), action_id, verdict, reason)
            return JSONResponse(approvals.describe(action))

        return endpoint

    routes = [
        Route("/actions", _answering(list_actions), methods=["GET"]),
        Route("/actions/{id}", _answering(show_action), methods=["GET"]),
        Route(
            "/actions/{id}/approve",
            _answering(deciding("approve")),
            methods=["POST"],
        ),
        Route(
            "/actions/{id}/reject",
            _answering(deciding("reject")),
            methods=["POST"],
        ),
    ]
    return Starlette(routes=routes)


def openapi_route(public_url: str) -> Route:
    """The OpenAPI 3.1 document of the API, served without a token."""
    body = document(public_url)

    async def endpoint(request: Request) -> Response:
        return JSONResponse(body)

    return Route("/approvals/openapi.json", endpoint, methods=["GET"])


def _answering(endpoint: Endpoint) -> Endpoint:
    """``endpoint`` with each refusal answered as its category and status."""

    async def answered(request: Request) -> Response:
        try:
            response = await endpoint(request)
        except Denied as denied:
            status = next(
                (code for kind, code in _STATUS.items() if isinstance(denied, kind)),
                503,
            )
            response = JSONResponse({"error": denied.category}, status_code=status)
        response.headers["Cache-Control"] = "no-store"
        return response

    return answered


def _principal(request: Request) -> Principal:
    principal = request.scope.get(PRINCIPAL_KEY)
    if not isinstance(principal, Principal):
        # Only reachable if the API is mounted without the bearer check.
        raise Unauthenticated("approvals API reached without a verified token")
    return principal


async def _reason(request: Request) -> str:
    """The optional ``reason`` of a JSON body; BadRequest if the body is not one."""
    body = await request.body()
    if not body:
        return ""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest("request body too large")
    try:
        parsed: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("request body is not JSON") from exc
    reason = parsed.get("reason", "") if isinstance(parsed, dict) else None
    if not isinstance(reason, str):
        raise BadRequest("reason must be a string")
    return reason
