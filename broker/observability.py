"""Operating the broker: structured logs that cannot leak, and Prometheus metrics.

Every log line passes through one redaction step (the same detectors that
classify tool arguments), so a token or a key that reaches a message by
accident leaves as ``[REDACTED:<class>]``. Lines written while a decision is
being made carry its decision id.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker.audit import AuditEntry, Store
from broker.classify import redact_text
from broker.errors import BrokerError, RecordFailed

current_decision: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "current_decision", default=None
)

_STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, redacted, with the decision id when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact_text(record.getMessage()),
        }
        decision_id = current_decision.get()
        if decision_id is not None:
            line["decision_id"] = decision_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and key not in line:
                line[key] = redact_text(str(value))
        if record.exc_info:
            line["error"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False)


class RedactingFormatter(logging.Formatter):
    """The plain-text format for a terminal, through the same redaction."""

    def format(self, record: logging.LogRecord) -> str:
        text = redact_text(super().format(record))
        decision_id = current_decision.get()
        return f"{text} decision_id={decision_id}" if decision_id else text


CHATTY_LIBRARIES = ("httpx2", "httpcore2", "mcp", "uvicorn.access")


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            RedactingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # These libraries log every HTTP request and every MCP session at INFO:
    # one line per call is noise to an operator and a cost on the hot path.
    # The broker's own record already holds every decision.
    for chatty in CHATTY_LIBRARIES:
        logging.getLogger(chatty).setLevel(max(level, logging.WARNING))


class Metrics:
    """The broker's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter(
            "broker_decisions",
            "Decisions made, by method, outcome, category, server and tool.",
            ["method", "outcome", "category", "server", "tool"],
            registry=self.registry,
        )
        self.denied_seconds = Histogram(
            "broker_denial_seconds",
            "Time from receiving a request to recording its denial.",
            registry=self.registry,
        )
        self.store_errors = Counter(
            "broker_store_errors",
            "Audit entries that could not be written.",
            registry=self.registry,
        )
        self.decide_seconds = Histogram(
            "broker_decide_seconds",
            "Time Cedar took to decide one call.",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
            registry=self.registry,
        )
        self.forward_seconds = Histogram(
            "broker_forward_seconds",
            "Time a downstream server took to answer a forwarded request.",
            ["server"],
            registry=self.registry,
        )
        self.pending_approvals = Gauge(
            "broker_pending_approvals",
            "Actions waiting for an approver (read at scrape time).",
            registry=self.registry,
        )
        self.lean_calls = Counter(
            "broker_lean_calls",
            "Requests the broker answered on its lean path, by method.",
            ["method"],
            registry=self.registry,
        )
        self.pin_drifts = Counter(
            "broker_pin_drifts",
            "Tools quarantined because they no longer match their pin.",
            ["server", "tool"],
            registry=self.registry,
        )

    def observe(self, entry: AuditEntry) -> None:
        # Resource URIs are unbounded, so only tool and prompt names label.
        tool = entry.tool or "" if entry.method in ("tools/call", "pin/check") else ""
        self.decisions.labels(
            entry.method, entry.outcome, entry.category, entry.server or "", tool
        ).inc()
        if entry.method == "pin/check":
            self.pin_drifts.labels(entry.server or "", tool).inc()
        if entry.outcome == "deny" and entry.duration_ms is not None:
            self.denied_seconds.observe(entry.duration_ms / 1000)

    def count_pending_with(self, count: Callable[[], int]) -> None:
        """Read the number of pending actions from ``count`` at every scrape.

        A store that cannot answer shows as -1 rather than failing the scrape.
        """

        def read() -> float:
            try:
                return float(count())
            except BrokerError:
                return -1.0

        self.pending_approvals.set_function(read)

    def route(self) -> Route:
        async def metrics(request: Request) -> Response:
            return Response(
                generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST
            )

        return Route("/metrics", metrics)


class MeteredStore:
    """A store that counts what it records and what it fails to record."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics

    def record(self, entry: AuditEntry) -> None:
        try:
            self._store.record(entry)
        except RecordFailed:
            self._metrics.store_errors.inc()
            raise
        self._metrics.observe(entry)

    def entries(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        outcome: str | None = None,
        limit: int = 1000,
    ) -> list[AuditEntry]:
        return self._store.entries(
            since=since, until=until, outcome=outcome, limit=limit
        )

    def count(self) -> int:
        return self._store.count()

    def close(self) -> None:
        self._store.close()

    def __getattr__(self, name: str) -> Any:
        # Anything else a particular store offers (verify, prune) passes through.
        return getattr(self._store, name)
