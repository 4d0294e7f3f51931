"""A day of decisions as a security reviewer would find them in the record.

Fixed by a seed, relative to ``now``: a research agent probing an open-world
tool with card numbers in the afternoon, unauthenticated probes at night,
transfers over the limit, deletions waiting for approval, tools nobody
pinned, a few shadow-mode denials of a policy being tried out, and one
argument that holds markup. Every entry lies within the 24 hours before
``now``; a few allowed calls are mixed in, which a denial report leaves out.
"""

from __future__ import annotations

import random
import uuid

from broker.audit import AuditEntry

HOUR = 3600.0
SCRIPT = "<script>document.title='owned'</script><img src=x onerror=alert(1)>"

_AGENTS = {
    "alice": ("claude-desktop", ("eng",)),
    "bob": ("finance-bot", ("finance", "writers")),
    "mallory": ("research-agent", ("contractors",)),
    "carol": ("cursor", ("eng", "writers")),
    "dave": ("ops-runbook", ("ops",)),
}


def a_day(now: float, seed: int = 20261203) -> list[AuditEntry]:
    """The seeded day's entries, oldest first."""
    rng = random.Random(seed)
    entries = [
        *_card_probes(now, rng),
        *_night_probes(now, rng),
        *_transfers(now, rng),
        *_deletions(now, rng),
        *_unpinned(now, rng),
        *_shadowed(now, rng),
        *_allowed(now, rng),
        _markup(now),
    ]
    return sorted(entries, key=lambda entry: entry.time)


def denials_of(entries: list[AuditEntry]) -> list[AuditEntry]:
    return [entry for entry in entries if entry.outcome == "deny"]


def _call(
    rng: random.Random,
    when: float,
    subject: str,
    tool: str,
    category: str = "forbidden",
    **more: object,
) -> AuditEntry:
    client, groups = _AGENTS[subject]
    fields: dict[str, object] = {
        "decision_id": uuid.UUID(int=rng.getrandbits(128)).hex,
        "time": when,
        "method": "tools/call",
        "outcome": "deny",
        "category": category,
        "subject": subject,
        "issuer": "https://idp.example.test",
        "client_id": client,
        "server": tool.split(".")[0],
        "tool": tool,
        "groups": groups,
        "scopes": ("tools:call",),
        "duration_ms": round(rng.uniform(0.3, 2.5), 2),
    }
    fields.update(more)
    return AuditEntry(**fields)  # type: ignore[arg-type]


def _card_probes(now: float, rng: random.Random) -> list[AuditEntry]:
    start = now - 7 * HOUR
    return [
        _call(
            rng,
            start + rng.uniform(0, 0.9 * HOUR),
            "mallory",
            "demo.search_web",
            reasons=("no-secrets-to-open-world",),
            arguments={"query": "card [REDACTED:card_number] limit"},
            data_classes=("card_number",),
        )
        for _ in range(14)
    ]


def _night_probes(now: float, rng: random.Random) -> list[AuditEntry]:
    return [
        AuditEntry(
            decision_id=uuid.UUID(int=rng.getrandbits(128)).hex,
            time=now - rng.uniform(18, 21) * HOUR,
            method="http",
            outcome="deny",
            category="unauthenticated",
            detail="token rejected: Signature verification failed",
        )
        for _ in range(7)
    ]


def _transfers(now: float, rng: random.Random) -> list[AuditEntry]:
    amounts = [250_000, 120_000, 990_000, 4_500_000, 180_000, 2_000_000]
    return [
        _call(
            rng,
            now - rng.uniform(1, 16) * HOUR,
            "bob",
            "demo.transfer",
            reasons=(
                ("transfer-hard-limit",) if amount > 1_000_000 else ("transfer-limit",)
            ),
            arguments={"amount": amount, "to": "acct-7731"},
        )
        for amount in amounts
    ]


def _deletions(now: float, rng: random.Random) -> list[AuditEntry]:
    return [
        _call(
            rng,
            now - rng.uniform(2, 12) * HOUR,
            subject,
            "demo.delete_note",
            "pending_approval",
            reasons=("destructive-needs-approval",),
            arguments={"title": title},
        )
        for subject, title in [
            ("carol", "q3-plan"),
            ("carol", "old-notes"),
            ("dave", "incident-42"),
            ("carol", "drafts"),
        ]
    ]


def _unpinned(now: float, rng: random.Random) -> list[AuditEntry]:
    return [
        _call(rng, now - rng.uniform(3, 22) * HOUR, subject, tool, "not_found")
        for subject, tool in [
            ("alice", "demo.run_shell"),
            ("mallory", "demo.read_env"),
            ("mallory", "files.read"),
            ("alice", "demo.nope"),
        ]
    ] + [
        _call(
            rng,
            now - 9 * HOUR,
            "dave",
            "demo.echo",
            "quarantined",
            detail="changed; live pin sha256:5be1",
        )
    ]


def _shadowed(now: float, rng: random.Random) -> list[AuditEntry]:
    return [
        _call(
            rng,
            now - rng.uniform(0.2, 5) * HOUR,
            subject,
            "demo.write_note",
            reasons=("no-writes-after-hours",),
            arguments={"title": "standup", "body": "notes"},
            shadow=True,
        )
        for subject in ("carol", "bob", "carol")
    ]


def _allowed(now: float, rng: random.Random) -> list[AuditEntry]:
    return [
        _call(
            rng,
            now - rng.uniform(0, 23) * HOUR,
            "alice",
            "demo.echo",
            outcome="allow",
            category="allowed",
            reasons=("read-tools-for-everyone",),
            arguments={"text": "hello"},
        )
        for _ in range(10)
    ]


def _markup(now: float) -> AuditEntry:
    return AuditEntry(
        decision_id="5c21e7d0a4b24f7e9d3f0b8a6c1e2f3a",
        time=now - 0.5 * HOUR,
        method="tools/call",
        outcome="deny",
        category="forbidden",
        subject="mallory",
        client_id="research-agent",
        server="demo",
        tool="demo.write_note",
        arguments={"title": SCRIPT, "body": "x"},
        groups=("contractors",),
        scopes=("tools:call",),
    )
