"""Looking after the record at start: verify the chain, prune past retention.

Tests taking ``store`` or ``backing`` run once on SQLite and once on Redis.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.audit import AuditEntry, Store
from broker.config import config_from_dict
from broker.errors import ConfigError
from broker.retention import DAY_SECONDS, check_at_start
from broker.server import build_broker
from tests.stores import Backing

REPO = Path(__file__).resolve().parents[1]
NOW = 1_800_000_000.0


def _entry(n: int, age_days: float) -> AuditEntry:
    return AuditEntry(f"d{n}", NOW - age_days * DAY_SECONDS, "ping", "allow", "allowed")


@pytest.fixture
def store(backing: Backing) -> Iterator[Store]:
    opened = backing.open()
    for n, age in enumerate([40, 35, 10, 1], start=1):
        opened.record(_entry(n, age))
    yield opened
    opened.close()


def test_an_intact_chain_is_pruned_to_the_retention_period(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Entries older than the period go; the chain still verifies afterwards."""
    with caplog.at_level(logging.INFO, logger="broker.audit"):
        result = check_at_start(store, 30, now=NOW)

    assert result is not None
    assert result.intact
    assert store.count() == 2
    assert store.verify().intact
    assert "pruned 2 entries older than 30 days" in caplog.text


def test_without_a_retention_period_nothing_is_pruned(store: Store) -> None:
    """By default every entry is kept."""
    check_at_start(store, None, now=NOW)

    assert store.count() == 4


def test_a_broken_chain_is_logged_loudly_and_not_pruned(
    store: Store, backing: Backing, caplog: pytest.LogCaptureFixture
) -> None:
    """A break is an ERROR naming the entry, and pruning waits so evidence stays."""
    backing.delete(2)

    with caplog.at_level(logging.INFO, logger="broker.audit"):
        result = check_at_start(store, 30, now=NOW)

    assert result is not None
    assert result.broken_at == 3
    assert store.count() == 3
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("AUDIT RECORD TAMPERED OR DAMAGED" in m and "#3" in m for m in errors)
    assert any("pruning skipped" in m for m in errors)


def test_an_unreadable_store_is_logged_not_raised(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """If the chain cannot be read at start, the broker says so and goes on."""
    store.close()

    assert check_at_start(store, 30, now=NOW) is None
    assert "audit chain not checked at start" in caplog.text


def _config(tmp_path: Path, store: dict[str, Any]) -> Any:
    return config_from_dict(
        {
            "broker": {
                "resource": "http://127.0.0.1:1/mcp",
                "development": True,
                "policy_dir": str(REPO / "cedar_policies"),
                "manifest_dir": str(REPO / "tool_manifests"),
            },
            "store": store,
        },
        base=tmp_path,
    )


def test_retention_is_read_from_the_store_table(tmp_path: Path) -> None:
    """``retention_days`` is kept beside a store path made relative to the file."""
    config = _config(tmp_path, {"path": "state.db", "retention_days": 90})

    assert config.store.retention_days == 90
    assert config.store.path == str(tmp_path / "state.db")
    assert _config(tmp_path, {}).store.retention_days is None


@pytest.mark.parametrize("days", [0, -3, "30", True, 1.5])
def test_a_retention_that_is_not_whole_positive_days_is_refused(
    tmp_path: Path, days: object
) -> None:
    """Zero, negatives, text, booleans and fractions are configuration errors."""
    with pytest.raises(ConfigError, match="retention_days"):
        _config(tmp_path, {"retention_days": days})


def test_the_broker_starts_with_a_broken_chain_and_says_so(
    store: Store,
    backing: Backing,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Start-up notices the break, logs it as an ERROR and still builds the broker."""
    backing.edit(1, method="edited")
    store.close()

    with caplog.at_level(logging.INFO, logger="broker.audit"):
        broker = build_broker(_config(tmp_path, backing.store_table()))

    assert broker.app is not None
    assert "AUDIT RECORD TAMPERED OR DAMAGED" in caplog.text
    assert "entry #1 (decision d1)" in caplog.text
