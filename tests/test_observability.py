"""Logs that cannot leak a secret, and metrics an operator can scrape."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx2
import pytest

from broker.audit import AuditEntry, SqliteStore
from broker.errors import RecordFailed
from broker.observability import (
    JsonFormatter,
    MeteredStore,
    Metrics,
    RedactingFormatter,
    current_decision,
)
from tests.harness import RunningBroker, agent
from tests.idp import LocalIdP

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"


def log_record(message: str) -> logging.LogRecord:
    return logging.makeLogRecord(
        {"name": "broker.test", "levelname": "WARNING", "msg": message}
    )


def test_json_log_lines_redact_tokens_and_carry_the_decision_id() -> None:
    """A token in a log message leaves redacted, tagged with the current decision."""
    token = current_decision.set("d-123")
    try:
        line = json.loads(JsonFormatter().format(log_record(f"saw Bearer {JWT}")))
    finally:
        current_decision.reset(token)
    assert JWT not in json.dumps(line)
    assert "[REDACTED:" in line["message"]
    assert line["decision_id"] == "d-123"
    assert line["level"] == "warning"


def test_text_log_lines_are_redacted_too() -> None:
    """The terminal format goes through the same redaction."""
    text = RedactingFormatter("%(message)s").format(log_record(f"key {JWT}"))
    assert JWT not in text


def entry(**changes: object) -> AuditEntry:
    fields: dict[str, object] = {
        "decision_id": "d1",
        "time": 1.0,
        "method": "tools/call",
        "outcome": "deny",
        "category": "forbidden",
        "server": "demo",
        "tool": "demo.echo",
        "duration_ms": 2.0,
    }
    fields.update(changes)
    return AuditEntry(**fields)  # type: ignore[arg-type]


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_metered_store_counts_decisions_and_store_errors(tmp_path: Path) -> None:
    """Each recorded decision is counted; a failed write counts as a store error."""
    metrics = Metrics()
    store = MeteredStore(SqliteStore(tmp_path / "s.db"), metrics)
    store.record(entry())
    store.record(entry(decision_id="d2", outcome="allow", category="allowed"))
    store.close()
    with pytest.raises(RecordFailed):
        store.record(entry(decision_id="d3"))
    denied = {
        "method": "tools/call",
        "outcome": "deny",
        "category": "forbidden",
        "server": "demo",
        "tool": "demo.echo",
    }
    assert sample(metrics, "broker_decisions_total", **denied) == 1.0
    assert sample(metrics, "broker_store_errors_total") == 1.0
    assert sample(metrics, "broker_denial_seconds_count") == 1.0


async def test_metrics_endpoint_reports_live_decisions(
    broker: RunningBroker, live_idp: LocalIdP
) -> None:
    """After an allowed and a denied call, /metrics shows outcomes and latencies."""
    async with agent(broker.url, live_idp.token()) as client:
        await client.call_tool("demo.echo", {"text": "x"})
        await client.call_tool("demo.write_note", {"title": "t", "body": "b"})
    text = httpx2.get(broker.origin + "/metrics").text
    assert 'outcome="allow"' in text
    assert 'tool="demo.write_note"' in text
    assert "broker_decisions_total" in text
    # Each call is decided once: no rule lets approval turn the denial round,
    # so it is not decided again as if approved.
    assert "broker_decide_seconds_count 2.0" in text
    assert 'broker_forward_seconds_count{server="demo"} 1.0' in text
    assert "broker_pending_approvals 0.0" in text
