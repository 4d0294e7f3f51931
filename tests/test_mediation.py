"""The one decide-record-forward path, driven directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.audit import AuditEntry, SqliteStore
from broker.catalog import Catalog
from broker.errors import Forbidden
from broker.mediation import Mediator
from broker.principal import Principal

PRINCIPAL = Principal(subject="alice", issuer="https://idp.test", client_id="agent")


async def test_an_unforeseen_failure_while_deciding_is_a_recorded_denial(
    tmp_path: Path,
) -> None:
    """A bug in deciding denies the call and leaves an entry, never a bare error."""
    store = SqliteStore(tmp_path / "state.db")
    mediator = Mediator(
        engine=None,  # type: ignore[arg-type]
        catalog=Catalog({}),
        downstreams={},
        store=store,
    )
    entry = mediator.new_entry(None, "tools/call", "demo", "demo.echo")

    async def decide() -> Any:
        raise KeyError("surprise")

    async def forward(client: Any, relay: Any) -> Any:
        raise AssertionError("nothing may be forwarded")

    no_request: Any = None
    with pytest.raises(Forbidden) as denied:
        await mediator.mediate(no_request, PRINCIPAL, entry, decide, forward)
    kept: list[AuditEntry] = store.entries()
    assert denied.value.decision_id == entry.decision_id
    assert [(e.decision_id, e.outcome) for e in kept] == [(entry.decision_id, "deny")]
    assert "KeyError" in kept[0].detail
