"""GET /report: the denied-call report, for principals that policy lets read it.

The route sits behind the same bearer check as /mcp. Cedar then decides
``read_report`` on ``Report::"denied"`` (the shipped policy admits members
of Group::"security"), and the read is recorded like any other decision: a
refused reader is a denial, and shows up in the report itself.

The query takes the filters of ``broker report denied`` (``last``,
``since``, ``until``, ``subject``, ``client``, ``server``, ``tool``,
``category``, ``policy``) and ``format``: html (the default), json or csv.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.types import Receive, Scope, Send

from broker.audit import AuditEntry, Store, record_or_log
from broker.auth.edge import PRINCIPAL_KEY
from broker.classify import inspect
from broker.errors import Forbidden, RecordFailed
from broker.policy import PolicyEngine
from broker.principal import Principal
from broker.report import Filters, build, filters_from, read_denials
from broker.report_html import STYLE_HASH, message_page, page
from broker.report_render import render

log = logging.getLogger("broker.report")

REPORT = "denied"
METHOD = "report/read"

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; style-src '{STYLE_HASH}'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_MEDIA_TYPES = {"json": "application/json", "csv": "text/csv; charset=utf-8"}


class ReportPage:
    """The ASGI app behind /report; ``engine`` gives the policy engine in force."""

    def __init__(
        self,
        store: Store,
        engine: Callable[[], PolicyEngine],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._engine = engine
        self._clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.respond(Request(scope, receive))
        await response(scope, receive, send)

    async def respond(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return _message(405, "Method not allowed", "The report is only read.")
        principal = request.scope.get(PRINCIPAL_KEY)
        if not isinstance(principal, Principal):
            # Only reachable if the route is mounted without the bearer check.
            return _message(401, "Not signed in", "A bearer token is required.")
        now = self._clock()
        query = dict(request.query_params)
        entry = self._decided(_entry(principal, query, now), principal, now)
        if entry.outcome != "allow":
            return self._refused(entry)
        try:
            filters = filters_from(query, now=now)
        except ValueError as exc:
            return _message(400, "The filters do not parse", str(exc))
        form = query.get("format") or "html"
        if form not in ("html", "json", "csv"):
            return _message(400, "Unknown format", "Use html, json or csv.")
        return await self._report(entry, filters, form, principal, query)

    def _decided(
        self, entry: AuditEntry, principal: Principal, now: float
    ) -> AuditEntry:
        decision = self._engine().decide_report_read(principal, REPORT, now=now)
        entry = dataclasses.replace(
            entry, reasons=decision.reasons, errors=decision.errors
        )
        if decision.allowed:
            return dataclasses.replace(entry, outcome="allow", category="allowed")
        return entry

    def _refused(self, entry: AuditEntry) -> Response:
        record_or_log(self._store, entry)
        text = (
            "Policy does not let you read this report. "
            f"Decision id: {entry.decision_id}."
        )
        return _message(403, "Not allowed", text)

    async def _report(
        self,
        entry: AuditEntry,
        filters: Filters,
        form: str,
        principal: Principal,
        query: dict[str, str],
    ) -> Response:
        try:
            self._store.record(entry)
            entries, truncated = await anyio.to_thread.run_sync(
                read_denials, self._store, filters
            )
        except RecordFailed:
            text = "The audit record cannot be read or written now. Try again."
            return _message(503, "Record unavailable", text)
        report = build(entries, filters, now=self._clock(), truncated=truncated)
        if form == "html":
            shown = page(report, viewer=principal.subject, query=query)
            return HTMLResponse(shown, headers=SECURITY_HEADERS)
        return Response(
            render(report, form),
            media_type=_MEDIA_TYPES[form],
            headers={**SECURITY_HEADERS, **_attachment(form)},
        )


def _entry(principal: Principal, query: dict[str, str], now: float) -> AuditEntry:
    return AuditEntry(
        decision_id=uuid.uuid4().hex,
        time=now,
        method=METHOD,
        outcome="deny",
        category=Forbidden.category,
        subject=principal.subject,
        issuer=principal.issuer,
        client_id=principal.client_id,
        tool=f"report:{REPORT}",
        arguments=inspect(query).redacted,
        detail="read of the denied-call report",
        groups=tuple(sorted(principal.groups)),
        scopes=tuple(sorted(principal.scopes)),
    )


def _attachment(form: str) -> dict[str, str]:
    if form != "csv":
        return {}
    return {"Content-Disposition": 'attachment; filename="denied-calls.csv"'}


def _message(status: int, title: str, text: str) -> Response:
    return HTMLResponse(
        message_page(title, text), status_code=status, headers=SECURITY_HEADERS
    )
