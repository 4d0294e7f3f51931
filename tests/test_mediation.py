"""The one decide-record-forward path, driven directly."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mcp.types as types
import pytest
from mcp.shared.exceptions import MCPError

from broker.audit import AuditEntry, SqliteStore
from broker.catalog import Catalog
from broker.errors import Forbidden
from broker.mediation import PRINCIPAL_KEY, Mediator
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


async def test_a_failure_finding_a_resources_server_is_a_recorded_denial(
    tmp_path: Path,
) -> None:
    """Looking up who owns a URI is part of the decision, so it fails closed."""
    store = SqliteStore(tmp_path / "state.db")
    mediator = Mediator(
        engine=None,  # type: ignore[arg-type]
        catalog=Catalog({}),
        downstreams={},
        store=store,
    )

    async def broken_lookup(uri: str) -> str | None:
        raise KeyError("surprise")

    mediator.resource_server = broken_lookup  # type: ignore[method-assign]
    request = SimpleNamespace(scope={PRINCIPAL_KEY: PRINCIPAL})
    ctx: Any = SimpleNamespace(request=request, params={}, request_id=1)
    params = types.ReadResourceRequestParams(uri="notes://index")
    with pytest.raises(MCPError) as denied:
        await mediator.read_resource(ctx, params)
    kept = store.entries()
    assert [(e.method, e.outcome, e.tool) for e in kept] == [
        ("resources/read", "deny", "notes://index")
    ]
    assert denied.value.error.data["decision_id"] == kept[0].decision_id
