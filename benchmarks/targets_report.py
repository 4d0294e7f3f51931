"""What the target benchmark prints: every figure beside its target.

The last table has one row per figure a target speaks of. For each size it
shows the direct figure, the brokered one and how they differ; then how the
figure a target judges grows from the first size to the last, and whether
each size meets its target. "Met" compares medians with the target's limit;
nothing here fails a run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from harness import Stats, broker_source, machine
from targets_setup import Checked

# method ("tools/call", "tools/list"), path ("direct", "brokered", "denied"), agents
Key = tuple[str, str, int]
Judged = Literal["added", "brokered", "none"]
Read = Callable[["SizeResult"], tuple[float | None, float]]

CALL, LIST = "tools/call", "tools/list"
MICRO, MILLI = 1e-6, 1e-3
RSS_LIMIT_MIB = 150 * 1_000_000 / 1_048_576
RSS_TARGET = "broker < 150 MB (143 MiB)"
# Growth from the first size to the last within this factor reads as flat;
# loopback timings of one machine wander by about that much between runs.
FLAT_WITHIN = 1.25


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    calls: int
    list_calls: int
    concurrency: int
    runs: int
    warmup: int
    pending: int
    mode: str


@dataclass(frozen=True)
class Memory:
    """Peak RSS (VmHWM) in MiB at three moments, and the server's own."""

    broker_ready_mib: float
    broker_after_runs_mib: float
    broker_peak_mib: float  # after one /metrics scrape, which lists every pending
    server_peak_mib: float
    pending_reported: float | None


@dataclass(frozen=True)
class SizeResult:
    size: int
    stats: Mapping[Key, Stats]
    memory: Memory
    check: Checked
    start_seconds: float


@dataclass(frozen=True)
class Metric:
    label: str
    read: Read
    judged: Judged = "none"
    limit: float | None = None
    places: int = 2
    target: str = ""

    @property
    def target_text(self) -> str:
        if self.target or self.limit is None:
            return self.target or "-"
        return f"{self.judged.replace('brokered', 'broker')} < {self.limit:g}"


# ---- reading figures ---------------------------------------------------------


def side_by_side(method: str, agents: int, field: str) -> Read:
    """One field of the direct and the brokered figures, as a pair."""

    def read(result: SizeResult) -> tuple[float | None, float]:
        direct = result.stats[(method, "direct", agents)]
        brokered = result.stats[(method, "brokered", agents)]
        return getattr(direct, field), getattr(brokered, field)

    return read


def cpu(method: str, path: str, agents: int, per: float) -> Read:
    """CPU per call in ``per`` seconds: the server's direct, the broker's ``path``."""

    def read(result: SizeResult) -> tuple[float | None, float]:
        direct = result.stats.get((method, "direct", agents))
        brokered = result.stats[(method, path, agents)]
        shown = None if path == "denied" or direct is None else _cpu(direct, per)
        return shown, _cpu(brokered, per)

    return read


def _cpu(stats: Stats, per: float) -> float:
    if stats.cpu_ms_per_call is None:
        return math.nan
    return stats.cpu_ms_per_call / 1000 / per


def rss(result: SizeResult) -> tuple[float | None, float]:
    return result.memory.server_peak_mib, result.memory.broker_peak_mib


def metrics(many: int) -> list[Metric]:
    both = tuple(dict.fromkeys((1, many)))
    latencies = (("p50", 0.5), ("p99", 2.0))
    return [
        *(
            Metric(
                f"call {q} ms, {_agents(n)}",
                side_by_side(CALL, n, f"{q}_ms"),
                "added",
                limit,
            )
            for n in both
            for q, limit in latencies
        ),
        *(
            Metric(
                f"calls/s, {_agents(n)}",
                side_by_side(CALL, n, "calls_per_second"),
                places=0,
            )
            for n in both
        ),
        *(
            Metric(
                f"CPU µs per allowed call, {_agents(n)}",
                cpu(CALL, "brokered", n, MICRO),
                "brokered",
                300,
                places=0,
            )
            for n in both
        ),
        Metric(
            "CPU µs per denied call",
            cpu(CALL, "denied", 1, MICRO),
            "brokered",
            150,
            places=0,
        ),
        Metric(
            "tools/list p50 ms",
            side_by_side(LIST, 1, "p50_ms"),
            "brokered",
            5.0,
            places=1,
        ),
        Metric("tools/list p99 ms", side_by_side(LIST, 1, "p99_ms"), places=1),
        Metric(
            "CPU ms per tools/list",
            cpu(LIST, "brokered", 1, MILLI),
            "brokered",
            5.0,
            places=1,
        ),
        Metric(
            "peak RSS MiB", rss, "brokered", RSS_LIMIT_MIB, places=1, target=RSS_TARGET
        ),
    ]


def _agents(count: int) -> str:
    return "1 agent" if count == 1 else f"{count} agents"


# ---- the final table ---------------------------------------------------------


def judged_value(metric: Metric, result: SizeResult) -> float | None:
    direct, brokered = metric.read(result)
    if metric.judged == "brokered":
        return brokered
    if metric.judged == "added" and direct is not None:
        return brokered - direct
    return None


def difference(metric: Metric, direct: float | None, brokered: float) -> str:
    if direct is None or direct <= 0:
        return "-"
    ratio = f"{brokered / direct:.2f}x"
    if metric.judged == "added":
        return f"{brokered - direct:+.{metric.places}f} ({ratio})"
    return ratio


def growth(metric: Metric, first: SizeResult, last: SizeResult) -> str:
    before: float | None
    after: float | None
    if metric.judged == "none":
        before, after = metric.read(first)[1], metric.read(last)[1]
    else:
        before, after = judged_value(metric, first), judged_value(metric, last)
    if before is None or after is None or before <= 0:
        return "-"
    factor = after / before
    if metric.judged == "none":
        return f"{factor:.2f}x"
    return f"{factor:.2f}x {'flat' if factor <= FLAT_WITHIN else 'grows'}"


def met(metric: Metric, results: Sequence[SizeResult]) -> str:
    if metric.limit is None:
        return "-"
    verdicts = []
    for result in results:
        value = judged_value(metric, result)
        verdicts.append("?" if value is None else _yes(value < metric.limit))
    return " / ".join(verdicts)


def _yes(condition: bool) -> str:
    return "yes" if condition else "no"


def targets_table(results: Sequence[SizeResult], many: int) -> list[str]:
    columns = ["metric", "target"]
    for result in results:
        n = result.size
        columns += [f"N={n} direct", f"N={n} brokered", f"N={n} added (ratio)"]
    first, last = results[0], results[-1]
    compared = len(results) > 1
    if compared:
        columns.append(f"growth {first.size}→{last.size}")
    columns.append("met?")
    lines = ["| " + " | ".join(columns) + " |"]
    lines.append("|---|---|" + "---:|" * (len(columns) - 3) + "---|")
    for metric in metrics(many):
        cells = [metric.label, metric.target_text]
        for result in results:
            direct, brokered = metric.read(result)
            cells += [
                _number(direct, metric.places),
                _number(brokered, metric.places),
                difference(metric, direct, brokered),
            ]
        if compared:
            cells.append(growth(metric, first, last))
        cells.append(met(metric, results))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _number(value: float | None, places: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{places}f}"


# ---- what comes before it ----------------------------------------------------


def header(settings: Settings, results: Sequence[SizeResult]) -> list[str]:
    sizes = " and ".join(str(n) for n in settings.sizes)
    lines = [
        f"## The broker's targets, direct and brokered, for N = {sizes} "
        "tools and policies",
        "",
        f"- Machine: {machine()}",
        f"- Broker code: {broker_source()}",
        f"- Per run and size: {settings.calls} tools/call per measurement after "
        f"{settings.warmup} warm-up calls (at least 2 per agent), "
        f"{settings.list_calls} tools/list; 1 and {settings.concurrency} agents; "
        f"runs: {settings.runs}, medians across runs shown; protocol mode "
        f"{settings.mode}",
        f"- {settings.pending} pending actions put in each broker's approvals "
        "store before it starts",
        "- Agents (this process), broker and server share the machine's CPUs, "
        "all on 127.0.0.1; the broker records every decision in SQLite",
        "- CPU is utime + stime from /proc of the process that answers: the "
        "downstream server for direct calls, the broker for brokered ones; "
        f"counted in ticks of 10 ms, so ±{10_000 / settings.calls:.0f} µs per "
        "call per measurement",
        f"- Each of the {settings.concurrency} agents calls again as soon as it "
        "has its answer, so there latency is about agents / throughput: what "
        "is added there is mostly the broker's CPU per call, queued",
        "- A p99 of fewer than 100 samples (tools/list) is their largest or "
        "close to it",
    ]
    for result in results:
        pending = result.memory.pending_reported
        seen = "not reported" if pending is None else f"{pending:.0f}"
        lines.append(
            f'- N={result.size}: `broker check` said "{result.check.output}" in '
            f"{result.check.seconds:.1f} s; the broker was ready "
            f"{result.start_seconds:.1f} s after start; pending actions it "
            f"reports: {seen}"
        )
    return [*lines, ""]


def details_table(results: Sequence[SizeResult]) -> list[str]:
    lines = [
        "| N | method | path | agents | p50 ms | p99 ms | calls/s | CPU µs/call |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for (method, path, agents), s in result.stats.items():
            used = _number(_cpu(s, MICRO), 0)
            lines.append(
                f"| {result.size} | {method} | {path} | {agents} | {s.p50_ms:.2f} "
                f"| {s.p99_ms:.2f} | {s.calls_per_second:.0f} | {used} |"
            )
    return lines


def memory_table(results: Sequence[SizeResult]) -> list[str]:
    lines = [
        "| N | broker at ready | broker after runs | broker after /metrics | server |",
        "|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        m = result.memory
        lines.append(
            f"| {result.size} | {m.broker_ready_mib:.1f} "
            f"| {m.broker_after_runs_mib:.1f} | {m.broker_peak_mib:.1f} "
            f"| {m.server_peak_mib:.1f} |"
        )
    return lines


def report(settings: Settings, results: Sequence[SizeResult], wall: float) -> str:
    lines = [
        *header(settings, results),
        "Every measurement (medians across runs; CPU of the process that answered):",
        "",
        *details_table(results),
        "",
        "Peak RSS (VmHWM), MiB:",
        "",
        *memory_table(results),
        "",
        "Targets (added = brokered - direct; growth compares the judged "
        f"figure; flat means within {FLAT_WITHIN:g}x; met? per size, "
        "in order):",
        "",
        *targets_table(results, settings.concurrency),
        "",
        f"Wall time: {wall:.0f} s, set-up and every run included.",
    ]
    return "\n".join(lines)
