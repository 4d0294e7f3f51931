"""The audit record: what it keeps, how it is read, how it fails.

Tests taking ``store`` or ``backing`` run once on SQLite and once on Redis.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.audit import AuditEntry, SqliteStore, Store
from broker.errors import ConfigError, RecordFailed
from tests.stores import Backing


def _entry(decision_id: str, time: float, outcome: str = "allow") -> AuditEntry:
    return AuditEntry(
        decision_id=decision_id,
        time=time,
        method="tools/call",
        outcome=outcome,
        category="allowed" if outcome == "allow" else "forbidden",
    )


def _ids(entries: list[AuditEntry]) -> list[str]:
    return [entry.decision_id for entry in entries]


@pytest.fixture
def store(backing: Backing) -> Iterator[Store]:
    opened = backing.open()
    yield opened
    opened.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "audit.db")
    yield opened
    opened.close()


@contextlib.contextmanager
def no_room_to_write() -> Iterator[None]:
    """Make every write past the first 512 bytes of a file fail, as on a full disk.

    RLIMIT_FSIZE binds root as well, unlike file permissions. The signal it
    raises is ignored so that the write fails with an error instead.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (512, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_an_entry_comes_back_as_it_was_recorded(store: Store) -> None:
    """Every field, tuples and JSON arguments included, survives the round trip."""
    entry = AuditEntry(
        decision_id="d-1",
        time=1_700_000_000.25,
        method="tools/call",
        outcome="deny",
        category="forbidden",
        subject="alice",
        issuer="https://idp.example",
        client_id="agent-7",
        server="files",
        tool="delete",
        reasons=("policy0", "policy3"),
        errors=("policy9: attribute missing",),
        arguments={"path": "/tmp/x", "opts": [1, None, True], "note": "é"},
        data_classes=("email", "secret"),
        detail="forbid on destructive tools",
        duration_ms=3.5,
    )

    store.record(entry)

    assert store.entries() == [entry]


def test_optional_fields_come_back_empty(store: Store) -> None:
    """An edge denial with no subject, tool or arguments is kept as such."""
    entry = AuditEntry("d-2", 5.0, "http", "deny", "unauthenticated")

    store.record(entry)

    assert store.entries() == [entry]


def test_an_entry_is_committed_when_record_returns(backing: Backing) -> None:
    """Another connection sees the entry at once: nothing waits to be flushed."""
    store = backing.open()
    store.record(_entry("d-1", 1.0))

    reader = backing.open()
    try:
        assert _ids(reader.entries()) == ["d-1"]
    finally:
        reader.close()
        store.close()


def test_entries_are_oldest_first(store: Store) -> None:
    """Entries are ordered by time, whatever the order they were written in."""
    for decision_id, time in [("b", 2.0), ("c", 3.0), ("a", 1.0)]:
        store.record(_entry(decision_id, time))

    assert _ids(store.entries()) == ["a", "b", "c"]


def test_entries_at_the_same_time_keep_the_order_they_were_written_in(
    store: Store,
) -> None:
    """Entries with equal times come back in chain order, past ten of them too."""
    names = [f"d{n}" for n in range(12)]
    for name in reversed(names):
        store.record(_entry(name, 5.0))

    assert _ids(store.entries()) == list(reversed(names))


def test_entries_filter_by_time_and_outcome(store: Store) -> None:
    """``since`` is inclusive, ``until`` exclusive, ``outcome`` exact."""
    for n in range(6):
        store.record(_entry(f"d{n}", float(n), "deny" if n % 2 else "allow"))

    assert _ids(store.entries(since=2.0)) == ["d2", "d3", "d4", "d5"]
    assert _ids(store.entries(until=2.0)) == ["d0", "d1"]
    assert _ids(store.entries(since=1.0, until=4.0)) == ["d1", "d2", "d3"]
    assert _ids(store.entries(outcome="deny")) == ["d1", "d3", "d5"]
    assert _ids(store.entries(outcome="allow", since=1.0)) == ["d2", "d4"]


def test_entries_stop_at_the_limit(store: Store) -> None:
    """``limit`` keeps the oldest entries; a limit of zero returns none."""
    for n in range(5):
        store.record(_entry(f"d{n}", float(n)))

    assert _ids(store.entries(limit=2)) == ["d0", "d1"]
    assert store.entries(limit=0) == []


def test_count_counts_every_entry(store: Store) -> None:
    """``count`` is the number of entries recorded, of either outcome."""
    assert store.count() == 0

    store.record(_entry("d1", 1.0, "allow"))
    store.record(_entry("d2", 2.0, "deny"))

    assert store.count() == 2


def test_entries_survive_reopening(backing: Backing) -> None:
    """A store opened again on the same record has what was recorded before."""
    first = backing.open()
    first.record(_entry("d1", 1.0))
    first.close()

    second = backing.open()
    try:
        assert second.count() == 1
    finally:
        second.close()


def test_the_database_is_in_wal_mode(sqlite_store: SqliteStore) -> None:
    """The file is switched to write-ahead logging when opened."""
    with sqlite3.connect(sqlite_store.path) as db:
        (mode,) = db.execute("PRAGMA journal_mode").fetchone()

    assert mode == "wal"


def test_writes_from_many_threads_are_all_kept(store: Store) -> None:
    """The store is shared by threads; no entry is lost to a race."""

    def write(worker: int) -> None:
        for n in range(25):
            store.record(_entry(f"w{worker}-{n}", float(n)))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert store.count() == 100


def test_a_full_disk_makes_record_fail(sqlite_store: SqliteStore) -> None:
    """When SQLite cannot write, record raises RecordFailed with the reason."""
    with no_room_to_write(), pytest.raises(RecordFailed) as failure:
        sqlite_store.record(_entry("d-full", 1.0))

    assert failure.value.decision_id == "d-full"
    assert "d-full" in failure.value.detail
    assert "not written" in failure.value.detail


def test_the_store_works_again_once_there_is_room(sqlite_store: SqliteStore) -> None:
    """A failed write loses nothing kept before and leaves the store usable."""
    sqlite_store.record(_entry("before", 1.0))
    with no_room_to_write(), pytest.raises(RecordFailed):
        sqlite_store.record(_entry("during", 2.0))

    sqlite_store.record(_entry("after", 3.0))

    assert _ids(sqlite_store.entries()) == ["before", "after"]


def test_record_on_a_closed_store_fails(store: Store) -> None:
    """A closed store refuses to record rather than dropping the entry."""
    store.close()

    with pytest.raises(RecordFailed):
        store.record(_entry("d1", 1.0))


def test_reading_a_closed_store_fails_with_a_broker_error(store: Store) -> None:
    """Reads map the store's own errors into the broker's tree as well."""
    store.close()

    with pytest.raises(RecordFailed):
        store.count()
    with pytest.raises(RecordFailed):
        store.entries()


def test_an_unknown_outcome_is_refused(store: Store) -> None:
    """Only "allow" and "deny" are outcomes; anything else is not recorded."""
    with pytest.raises(RecordFailed):
        store.record(_entry("d1", 1.0, outcome="maybe"))

    assert store.count() == 0


def test_arguments_that_are_not_json_are_refused(store: Store) -> None:
    """An entry whose arguments cannot be stored as JSON is not recorded."""
    entry = AuditEntry("d1", 1.0, "tools/call", "allow", "allowed", arguments={1j})

    with pytest.raises(RecordFailed):
        store.record(entry)

    assert store.count() == 0


def test_a_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    """The parent directory must exist; the error names the path."""
    path = tmp_path / "absent" / "audit.db"

    with pytest.raises(ConfigError, match="absent"):
        SqliteStore(path)


def test_a_file_that_is_not_a_database_is_a_config_error(tmp_path: Path) -> None:
    """Opening some other file fails at once, naming it and saying why."""
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are not the pages you are looking for\n" * 100)

    with pytest.raises(ConfigError, match=r"notes\.txt.*not a database"):
        SqliteStore(path)


def test_a_directory_is_a_config_error(tmp_path: Path) -> None:
    """A path naming a directory cannot be opened as a store."""
    with pytest.raises(ConfigError, match=r"cannot be (opened|used)"):
        SqliteStore(tmp_path)
