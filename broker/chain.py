"""The hash chain that makes the audit record tamper-evident.

Each entry is stored with the hash of the entry before it (``prev_hash``) and
its own hash (``entry_hash``): SHA-256 over that previous hash and a canonical
JSON form of every field of the entry. Changing a field breaks the entry's
own hash; removing, inserting or moving an entry breaks the link of the entry
after it. The store also keeps its head (the last sequence number and hash),
so entries cut from the end are noticed too.

Every store implementation hashes with ``entry_hash`` and checks with
``verify``, so the chain means the same whatever keeps it.

What this does not stop: anyone able to rewrite the store can recompute every
hash after an edit. The head hash that ``verify`` reports, kept somewhere the
broker cannot write, is what catches that.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.audit import AuditEntry

# The link before the first entry of a store that was never pruned.
GENESIS = "0" * 64


@dataclass(frozen=True, slots=True)
class Head:
    """A point on the chain: a sequence number and the hash of that entry."""

    seq: int
    hash: str


START = Head(0, GENESIS)


@dataclass(frozen=True, slots=True)
class Link:
    """An entry as stored, with its place on the chain.

    ``entry`` is None when the stored row could not be read back at all.
    """

    seq: int
    entry: AuditEntry | None
    prev_hash: str
    entry_hash: str


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What stands in for a pruned prefix: where it ended and the hash there."""

    through_seq: int
    hash: str
    pruned: int
    before: float
    time: float

    @property
    def head(self) -> Head:
        return Head(self.through_seq, self.hash)


@dataclass(frozen=True, slots=True)
class Verification:
    """The result of walking a chain.

    ``checked`` entries fitted. When the chain is broken, ``broken_at`` is
    the sequence number of the first entry that does not fit (or, for
    entries missing at the end, the first one missing).
    """

    checked: int
    head: Head
    since_seq: int = 0
    broken_at: int | None = None
    decision_id: str | None = None
    problem: str = ""

    @property
    def intact(self) -> bool:
        return self.broken_at is None


def canonical(entry: AuditEntry) -> bytes:
    """Every field of ``entry`` as compact, key-sorted JSON.

    Numbers that the store keeps as floats are floats here too, so an entry
    hashes the same before it is written and after it is read back.
    TypeError or ValueError if the arguments are not JSON.
    """
    fields = {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry)}
    fields["time"] = float(entry.time)
    if entry.duration_ms is not None:
        fields["duration_ms"] = float(entry.duration_ms)
    fields["shadow"] = bool(entry.shadow)
    text = json.dumps(
        fields,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return text.encode()


def link_hash(body: bytes, prev_hash: str) -> str:
    """The hash of an entry whose canonical form is ``body``."""
    # prev_hash has a fixed length, so the two parts cannot run together.
    return hashlib.sha256(prev_hash.encode() + b"\n" + body).hexdigest()


def entry_hash(entry: AuditEntry, prev_hash: str) -> str:
    """The hash ``entry`` carries when it follows the entry hashed ``prev_hash``."""
    return link_hash(canonical(entry), prev_hash)


def verify(links: Iterable[Link], *, start: Head, head: Head) -> Verification:
    """Walk ``links`` in sequence order from ``start``; they must end at ``head``."""
    last = start
    checked = 0
    for link in links:
        problem = _problem(link, last.hash)
        if problem:
            decision_id = link.entry.decision_id if link.entry else None
            return Verification(
                checked, last, start.seq, link.seq, decision_id, problem
            )
        last = Head(link.seq, link.entry_hash)
        checked += 1
    if last != head:
        return Verification(
            checked, last, start.seq, last.seq + 1, None, _cut(last, head)
        )
    return Verification(checked, last, start.seq)


def _problem(link: Link, expected: str) -> str:
    if link.entry is None:
        return "the entry cannot be read back: it was altered"
    try:
        recomputed = entry_hash(link.entry, link.prev_hash)
    except (TypeError, ValueError):
        return "the entry cannot be hashed: it was altered"
    if recomputed != link.entry_hash:
        return "the entry was altered: its content does not match its hash"
    if link.prev_hash != expected:
        return (
            "the entry does not follow the one before it: "
            "an entry was removed, inserted or moved"
        )
    return ""


def _cut(last: Head, head: Head) -> str:
    """Why a chain that fits link by link does not end where the store says."""
    ends = f"the chain ends at entry #{last.seq}, the store's head is #{head.seq}"
    if head.seq > last.seq:
        return f"{ends}: entries #{last.seq + 1} to #{head.seq} are missing"
    return f"{ends}: entries were added past the head, or the head was altered"


def describe(verification: Verification) -> str:
    """One line saying what ``verify`` found, for a log or a terminal."""
    after = ""
    if verification.since_seq:
        after = f" after the checkpoint at #{verification.since_seq}"
    if verification.intact:
        return (
            f"chain intact: {verification.checked} entries checked{after}, "
            f"head #{verification.head.seq} {verification.head.hash}"
        )
    which = f"entry #{verification.broken_at}"
    if verification.decision_id:
        which += f" (decision {verification.decision_id})"
    return (
        f"chain BROKEN at {which}: {verification.problem}; "
        f"{verification.checked} entries before it fitted{after}"
    )
