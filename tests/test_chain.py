"""The hash chain of the audit record: tampering found, pruning verifiable.

Tests taking ``store`` or ``backing`` run once on SQLite and once on Redis;
each kind is tampered with through its own helper in ``tests.stores``.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import chain
from broker.audit import AuditEntry, SqliteStore, Store
from broker.errors import ConfigError
from tests.stores import Backing


def _entry(n: int, **changes: object) -> AuditEntry:
    fields: dict[str, object] = {
        "decision_id": f"d{n}",
        "time": float(n),
        "method": "tools/call",
        "outcome": "deny" if n % 2 else "allow",
        "category": "forbidden" if n % 2 else "allowed",
        "subject": "alice",
        "tool": "demo.echo",
        "arguments": {"text": f"call {n}"},
    }
    fields.update(changes)
    return AuditEntry(**fields)  # type: ignore[arg-type]


@pytest.fixture
def store(backing: Backing) -> Iterator[Store]:
    opened = backing.open()
    for n in range(1, 7):
        opened.record(_entry(n))
    yield opened
    opened.close()


def test_an_untouched_store_verifies(store: Store, backing: Backing) -> None:
    """Every entry is checked and the head is the last entry's hash."""
    result = store.verify()

    assert result.intact
    assert result.checked == 6
    assert result.head.seq == 6
    _, last = backing.hashes(6)
    assert result.head.hash == last


def test_an_empty_store_verifies(backing: Backing) -> None:
    """A store with no entries is an intact chain of none."""
    empty = backing.open()
    try:
        result = empty.verify()
    finally:
        empty.close()

    assert (result.intact, result.checked) == (True, 0)


def test_an_edited_entry_is_found(store: Store, backing: Backing) -> None:
    """Turning a denial into an allow breaks that entry's own hash."""
    backing.edit(3, outcome="allow", category="allowed")

    result = store.verify()

    assert (result.broken_at, result.decision_id) == (3, "d3")
    assert "altered" in result.problem
    assert result.checked == 2


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(
    store: Store, backing: Backing
) -> None:
    """Rehashing the edited entry is not enough: the entry after it no longer fits."""
    edited = _entry(3, arguments={"text": "nothing to see"})
    prev, _ = backing.hashes(3)
    backing.edit(
        3, arguments=edited.arguments, entry_hash=chain.entry_hash(edited, prev)
    )

    result = store.verify()

    assert result.broken_at == 4
    assert "does not follow" in result.problem


def test_a_deleted_entry_is_found(store: Store, backing: Backing) -> None:
    """Removing an entry from the middle breaks the link of the one after it."""
    backing.delete(4)

    result = store.verify()

    assert (result.broken_at, result.decision_id) == (5, "d5")
    assert "removed, inserted or moved" in result.problem


def test_a_deleted_first_entry_is_found(store: Store, backing: Backing) -> None:
    """The first entry must follow the start of the chain."""
    backing.delete(1)

    assert store.verify().broken_at == 2


def test_deleted_last_entries_are_found(store: Store, backing: Backing) -> None:
    """Cutting entries off the end leaves the chain short of the store's head."""
    backing.delete(5, 6)

    result = store.verify()

    assert result.broken_at == 5
    assert result.checked == 4
    assert "#5 to #6 are missing" in result.problem


def test_recording_goes_on_after_the_last_entry_is_deleted(
    store: Store, backing: Backing
) -> None:
    """The next entry still links to the deleted one, so the gap stays visible."""
    backing.delete(6)

    store.record(_entry(7))

    result = store.verify()
    assert result.broken_at == 7
    assert "does not follow" in result.problem


@pytest.mark.parametrize("alteration", ["removed", "moved back"])
def test_an_altered_head_is_found_and_recording_goes_on(
    store: Store, backing: Backing, alteration: str
) -> None:
    """A head removed or moved back is reported, and new entries are still kept."""
    if alteration == "removed":
        backing.drop_head()
    else:
        backing.move_head(2)

    assert not store.verify().intact
    store.record(_entry(7))

    assert store.count() == 7
    assert [e.decision_id for e in store.entries()][-1] == "d7"


def test_swapped_entries_are_found(store: Store, backing: Backing) -> None:
    """Two whole rows exchanging places break the chain where the first one sits."""
    backing.swap(2, 5)

    result = store.verify()

    assert (result.broken_at, result.decision_id) == (2, "d5")
    assert "does not follow" in result.problem


def test_swapped_contents_are_found(store: Store, backing: Backing) -> None:
    """Exchanging what two entries say, hashes left in place, is an alteration."""
    backing.edit(2, decision_id="d3")
    backing.edit(3, decision_id="d2")

    result = store.verify()

    assert result.broken_at == 2
    assert "altered" in result.problem


def test_an_unreadable_entry_is_a_break(store: Store, backing: Backing) -> None:
    """A row whose stored JSON no longer parses is reported, not raised."""
    backing.garble(2)

    result = store.verify()

    assert result.broken_at == 2
    assert "cannot be read back" in result.problem


def test_the_shadow_mark_is_kept_and_hashed(backing: Backing) -> None:
    """A shadow decision comes back marked, and unmarking it is detected."""
    store = backing.open()
    try:
        store.record(_entry(1, shadow=True))
        assert store.entries()[0].shadow is True
        assert store.verify().intact

        backing.edit(1, shadow=False)

        assert store.verify().broken_at == 1
    finally:
        store.close()


def test_an_entry_hashes_the_same_before_and_after_the_round_trip(
    store: Store, backing: Backing
) -> None:
    """The hash of a read-back entry equals the one computed when it was written."""
    entry = _entry(7, time=7, duration_ms=3, groups=("eng",), scopes=("tools:call",))
    store.record(entry)

    prev, stored = backing.hashes(7)
    (read_back,) = store.entries(since=7.0)

    assert chain.entry_hash(entry, prev) == stored
    assert chain.entry_hash(read_back, prev) == stored


def test_every_field_is_part_of_the_hash() -> None:
    """Changing any single field of an entry changes its hash."""
    base = _entry(1, groups=("eng",), scopes=("s",), data_classes=("email",))
    changed = {
        "decision_id": "other",
        "time": 2.0,
        "method": "prompts/get",
        "outcome": "allow",
        "category": "not_found",
        "subject": "bob",
        "issuer": "https://idp",
        "client_id": "agent-9",
        "server": "files",
        "tool": "demo.add",
        "reasons": ("p",),
        "errors": ("e",),
        "arguments": {"text": "other"},
        "data_classes": (),
        "detail": "x",
        "duration_ms": 1.0,
        "groups": (),
        "scopes": (),
        "shadow": True,
    }
    assert set(changed) == set(AuditEntry.__dataclass_fields__)
    original = chain.entry_hash(base, chain.GENESIS)

    for name, value in changed.items():
        other = _entry(1, **{**_fields(base), name: value})
        assert chain.entry_hash(other, chain.GENESIS) != original, name


def _fields(entry: AuditEntry) -> dict[str, object]:
    return {name: getattr(entry, name) for name in AuditEntry.__dataclass_fields__}


def test_pruning_leaves_a_chain_that_verifies(store: Store) -> None:
    """Removing the oldest entries keeps a checkpoint the rest links to."""
    checkpoint = store.prune(4.0, now=100.0)

    assert checkpoint is not None
    assert (checkpoint.through_seq, checkpoint.pruned) == (3, 3)
    assert store.count() == 3
    result = store.verify()
    assert (result.intact, result.checked, result.since_seq) == (True, 3, 3)


def test_a_deletion_after_a_checkpoint_is_found(store: Store, backing: Backing) -> None:
    """The first entry kept must follow the checkpoint of what was pruned."""
    store.prune(4.0, now=100.0)
    backing.delete(4)

    assert store.verify().broken_at == 5


def test_pruning_twice_and_recording_on_stays_intact(store: Store) -> None:
    """Checkpoints stack: the latest one is where verification starts."""
    store.prune(3.0, now=100.0)
    store.record(_entry(7))
    store.prune(6.0, now=101.0)
    store.record(_entry(8))

    result = store.verify()

    assert (result.intact, result.since_seq, result.checked) == (True, 5, 3)


def test_pruning_stops_at_the_first_entry_too_new_to_go(backing: Backing) -> None:
    """An old entry written after a newer one stays, so the chain stays a prefix."""
    store = backing.open()
    try:
        for n, time in enumerate([1.0, 9.0, 2.0], start=1):
            store.record(_entry(n, time=time))
        checkpoint = store.prune(5.0, now=10.0)
    finally:
        store.close()

    assert checkpoint is not None
    assert checkpoint.through_seq == 1


def test_pruning_nothing_old_enough_changes_nothing(store: Store) -> None:
    """A cut-off before every entry removes none and leaves no checkpoint."""
    assert store.prune(0.5, now=10.0) is None
    assert store.count() == 6


def test_two_stores_writing_one_record_keep_one_chain(backing: Backing) -> None:
    """Two writers on the same record, in parallel, never fork the chain."""
    first, second = backing.open(), backing.open()

    def write(store: Store, name: str) -> None:
        for n in range(40):
            store.record(_entry(n, decision_id=f"{name}-{n}"))

    threads = [
        threading.Thread(target=write, args=(first, "a")),
        threading.Thread(target=write, args=(second, "b")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    try:
        result = first.verify()
        count = second.count()
    finally:
        first.close()
        second.close()
    assert (result.intact, result.checked) == (True, 80)
    assert count == 80


def test_a_store_from_before_the_chain_is_refused(tmp_path: Path) -> None:
    """A file written without hashes is not silently mixed into a chain."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE audit_entries (seq INTEGER PRIMARY KEY, time REAL)")

    with pytest.raises(ConfigError, match="before entries were hash-chained"):
        SqliteStore(path)


def test_describe_names_the_break_and_its_decision() -> None:
    """The one-line summary of a break gives position, decision id and problem."""
    broken = chain.Verification(
        2, chain.START, broken_at=3, decision_id="d3", problem="it was altered"
    )

    line = chain.describe(broken)

    assert line.startswith("chain BROKEN at entry #3 (decision d3): it was altered")
