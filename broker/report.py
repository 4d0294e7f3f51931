"""The denied-call report: who tried what, on whose behalf, and why it was refused.

Selecting and grouping are pure functions over audit entries; ``build``
gathers them into a Report, and the renderers in ``broker.report_render``
print it as a table, JSON or CSV. The web page draws the same Report.

A denial's deciding policies are the ``@id``s Cedar gave as reasons. A
forbidden call without any was refused by default, because no policy
permits it, or because a policy failed while it was evaluated; the report
names those two cases instead of leaving the column empty.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

from broker.audit import AuditEntry, Store
from broker.when import parse_instant, parse_span

NO_PERMIT = "(no policy permits)"
POLICY_ERROR = "(policy error)"
NO_SUBJECT = "(no subject)"
NO_CLIENT = "(no client)"

HOUR = 3600.0
DAY = 86_400.0
WEEK = 7 * DAY

# The most denials one report reads from the store; a report that reaches
# it says so rather than presenting a partial count as the whole.
REPORT_LIMIT = 100_000

# The filters that match a field exactly, by the names the CLI and page use.
EXACT_FILTERS = ("subject", "client", "server", "tool", "category", "policy")
DEFAULT_SPAN = "24h"


@dataclass(frozen=True, slots=True)
class Filters:
    """What a reviewer narrows the report to; None matches anything."""

    since: float | None = None
    until: float | None = None
    subject: str | None = None
    client: str | None = None
    server: str | None = None
    tool: str | None = None
    category: str | None = None
    policy: str | None = None

    def matches(self, entry: AuditEntry) -> bool:
        """Whether ``entry`` is a denial inside every bound that is set."""
        return (
            entry.outcome == "deny"
            and (self.since is None or entry.time >= self.since)
            and (self.until is None or entry.time < self.until)
            and _equal(self.subject, entry.subject)
            and _equal(self.client, entry.client_id)
            and _equal(self.server, entry.server)
            and _equal(self.tool, tool_of(entry))
            and _equal(self.category, entry.category)
            and (self.policy is None or self.policy in deciding_policies(entry))
        )

    def given(self) -> dict[str, str]:
        """The filters that are set, other than the time range, by name."""
        return {
            f.name: str(getattr(self, f.name))
            for f in fields(self)
            if f.name not in ("since", "until") and getattr(self, f.name) is not None
        }


@dataclass(frozen=True, slots=True)
class Bucket:
    """Denials from ``start`` for one bucket's length, by category."""

    start: float
    by_category: tuple[tuple[str, int], ...]

    @property
    def count(self) -> int:
        return sum(n for _, n in self.by_category)


Counts = tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Report:
    """The denials that matched, counted every way a reviewer asks about them."""

    filters: Filters
    since: float | None
    until: float | None
    denials: tuple[AuditEntry, ...]
    by_principal: Counts
    by_client: Counts
    by_tool: Counts
    by_policy: Counts
    by_category: Counts
    over_time: tuple[Bucket, ...]
    bucket_seconds: float
    truncated: bool = False

    @property
    def total(self) -> int:
        return len(self.denials)

    @property
    def shadow(self) -> int:
        """How many of the denials were decided in shadow mode, not enforced."""
        return sum(1 for entry in self.denials if entry.shadow)


def filters_from(values: Mapping[str, str | None], *, now: float) -> Filters:
    """Filters from text as a reviewer typed it; ValueError says what is wrong.

    ``last`` (a span) or ``since`` (a time) opens the range, by default the
    last 24 hours; ``last`` counts back from ``until`` when that is given.
    Empty values count as not given.
    """
    since_text, last = values.get("since") or None, values.get("last") or None
    if since_text and last:
        raise ValueError("give either since or last, not both")
    until_text = values.get("until") or None
    until = parse_instant(until_text) if until_text else None
    if since_text:
        since = parse_instant(since_text)
    else:
        since = (now if until is None else until) - parse_span(last or DEFAULT_SPAN)
    exact = {name: values.get(name) or None for name in EXACT_FILTERS}
    return Filters(since=since, until=until, **exact)


def read_denials(store: Store, filters: Filters) -> tuple[list[AuditEntry], bool]:
    """The store's denials in the filters' time range, and whether there were more."""
    entries = store.entries(
        since=filters.since,
        until=filters.until,
        outcome="deny",
        limit=REPORT_LIMIT + 1,
    )
    return entries[:REPORT_LIMIT], len(entries) > REPORT_LIMIT


def tool_of(entry: AuditEntry) -> str:
    """What the denied request touched, or its method when it touched nothing."""
    return entry.tool or entry.method


def principal_of(entry: AuditEntry) -> str:
    return entry.subject or NO_SUBJECT


def deciding_policies(entry: AuditEntry) -> tuple[str, ...]:
    """The policies that decided a denial, or why none is named."""
    if entry.reasons:
        return entry.reasons
    if entry.category != "forbidden":
        return ()
    return (POLICY_ERROR,) if entry.errors else (NO_PERMIT,)


def select(entries: Iterable[AuditEntry], filters: Filters) -> list[AuditEntry]:
    """The denials among ``entries`` that ``filters`` let through, in order."""
    return [entry for entry in entries if filters.matches(entry)]


def counted(
    entries: Iterable[AuditEntry], keys: Callable[[AuditEntry], Iterable[str]]
) -> Counts:
    """How often each key occurs, most frequent first, ties by name."""
    counter: Counter[str] = Counter()
    for entry in entries:
        counter.update(keys(entry))
    return tuple(sorted(counter.items(), key=lambda item: (-item[1], item[0])))


def bucket_seconds_for(span: float) -> float:
    """Hours up to two days, days up to ninety, weeks beyond."""
    if span <= 2 * DAY:
        return HOUR
    if span <= 90 * DAY:
        return DAY
    return WEEK


def over_time(
    denials: Sequence[AuditEntry], start: float, end: float, size: float
) -> tuple[Bucket, ...]:
    """Every bucket of ``size`` seconds from ``start`` to ``end``, empty ones too."""
    first = math.floor(start / size) * size
    count = max(1, math.ceil((end - first) / size))
    per_bucket: list[Counter[str]] = [Counter() for _ in range(count)]
    for entry in denials:
        index = int((entry.time - first) // size)
        if 0 <= index < count:
            per_bucket[index][entry.category] += 1
    return tuple(
        Bucket(first + n * size, tuple(sorted(counts.items())))
        for n, counts in enumerate(per_bucket)
    )


def build(
    entries: Iterable[AuditEntry],
    filters: Filters,
    *,
    now: float,
    truncated: bool = False,
) -> Report:
    """The report on the denials in ``entries`` that ``filters`` select."""
    denials = select(entries, filters)
    start = filters.since if filters.since is not None else _first_time(denials, now)
    end = filters.until if filters.until is not None else now
    size = bucket_seconds_for(end - start)
    return Report(
        filters=filters,
        since=filters.since,
        until=filters.until,
        denials=tuple(denials),
        by_principal=counted(denials, lambda e: [principal_of(e)]),
        by_client=counted(denials, lambda e: [e.client_id or NO_CLIENT]),
        by_tool=counted(denials, lambda e: [tool_of(e)]),
        by_policy=counted(denials, deciding_policies),
        by_category=counted(denials, lambda e: [e.category]),
        over_time=over_time(denials, start, end, size) if denials else (),
        bucket_seconds=size,
        truncated=truncated,
    )


def _first_time(denials: Sequence[AuditEntry], now: float) -> float:
    return min((entry.time for entry in denials), default=now)


def _equal(wanted: str | None, actual: str | None) -> bool:
    return wanted is None or wanted == actual
