"""What the broker adds to one tool call: latency, throughput, CPU and memory.

The benchmark starts the demo server over Streamable HTTP and a development
broker in front of it, both on loopback, and times the same call
(``add`` with two small integers) made by the SDK's own client:

- directly to the demo server, with no token;
- through the broker, with a development token for a reader;
- through the broker as a caller outside ``writers`` asking for
  ``demo.write_note``, which policy denies before anything is forwarded.

Each is measured with one agent making every call in turn and with several
agents (each its own client and connection) sharing the same number of
calls. Both processes stay up for every run; the figures printed are the
medians across runs. The broker's CPU time comes from /proc, so this runs
on Linux only. It measures; it never judges a figure good or bad.

Usage:
    python benchmarks/bench_calls.py [--calls N] [--concurrency M] [--runs R]
                                      [--warmup W] [--mode {legacy,auto}] ...
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from harness import (
    HOST,
    BenchmarkError,
    Stats,
    Stopwatch,
    answers_200,
    bounded,
    connect,
    free_port,
    machine,
    median_stats,
    peak_rss_mib,
    port_open,
    shares,
    start,
    stop,
    summarize,
    wait_until,
    write_dev_config,
)
from mcp import Client

from broker.auth.devkey import load_or_create_dev_key, mint_dev_token

REPO = Path(__file__).resolve().parent.parent
DEMO_MANIFEST = REPO / "tool_manifests" / "demo.json"
POLICIES = REPO / "cedar_policies"
MODES = ("legacy", "auto")

# Bounds on what one invocation may ask for, so a typo cannot run for hours.
MAX_CALLS = 100_000
MAX_CONCURRENCY = 256
MAX_RUNS = 20


@dataclass(frozen=True)
class Settings:
    calls: int
    concurrency: int
    runs: int
    warmup: int
    modes: tuple[str, ...]


@dataclass(frozen=True)
class Services:
    """The running demo server and broker, and the tokens agents present."""

    demo_url: str
    broker_url: str
    broker_pid: int
    reader_token: str
    outsider_token: str


@dataclass(frozen=True)
class Target:
    """One call as an agent makes it: where, what, as whom, and what it expects."""

    url: str
    tool: str
    arguments: dict[str, Any]
    token: str | None
    expect_error: bool = False


@dataclass(frozen=True)
class Scenario:
    path: str
    target: Target
    agents: int
    # The process whose CPU time is charged to the calls, if any.
    watched_pid: int | None


# ---- the broker's configuration ----------------------------------------------


def write_broker_files(workdir: Path, port: int, demo_url: str) -> None:
    write_dev_config(workdir, port, str(POLICIES))
    (workdir / "manifests").mkdir()
    manifest = http_manifest(demo_url)
    (workdir / "manifests" / "demo.json").write_text(
        json.dumps(manifest, indent=2), encoding="utf-8"
    )


def http_manifest(demo_url: str) -> dict[str, Any]:
    """The shipped demo manifest, pins and all, reaching the server over HTTP."""
    manifest: dict[str, Any] = json.loads(DEMO_MANIFEST.read_text(encoding="utf-8"))
    manifest["transport"] = {"type": "http", "url": demo_url}
    manifest["description"] = "The demo server over Streamable HTTP (benchmark)."
    return manifest


def tokens(workdir: Path, resource: str) -> tuple[str, str]:
    """A reader's token, and one with every scope but outside ``writers``."""
    key = load_or_create_dev_key(workdir / "dev" / "signing-key.pem")
    reader = mint_dev_token(
        key, resource=resource, subject="bench-reader", scopes=["tools:call"]
    )
    outsider = mint_dev_token(
        key,
        resource=resource,
        subject="bench-outsider",
        groups=["readers"],
        scopes=["tools:call", "tools:write"],
    )
    return reader, outsider


@contextmanager
def services(workdir: Path) -> Iterator[Services]:
    demo_port, broker_port = free_port(), free_port()
    demo_url = f"http://{HOST}:{demo_port}/mcp"
    broker_origin = f"http://{HOST}:{broker_port}"
    write_broker_files(workdir, broker_port, demo_url)
    reader, outsider = tokens(workdir, f"{broker_origin}/mcp")

    demo_log, broker_log = workdir / "demo.log", workdir / "broker.log"
    demo_command = [sys.executable, "-m", "broker.demo_server", "--http"]
    demo = start([*demo_command, str(demo_port)], demo_log, workdir)
    try:
        wait_until(port_open(demo_port), demo, demo_log)
        broker_command = [sys.executable, "-m", "broker.cli", "-c", "broker.toml"]
        broker = start([*broker_command, "serve"], broker_log, workdir)
        try:
            wait_until(answers_200(f"{broker_origin}/readyz"), broker, broker_log)
            yield Services(
                demo_url, f"{broker_origin}/mcp", broker.pid, reader, outsider
            )
        finally:
            stop(broker)
    finally:
        stop(demo)


# ---- calls -------------------------------------------------------------------


@asynccontextmanager
async def agent(target: Target, mode: str) -> AsyncIterator[Client]:
    """The SDK's client, connected as an agent would be."""
    async with connect(target.url, target.token, mode) as client:
        yield client


async def call_many(
    client: Client, target: Target, count: int, latencies: list[float]
) -> None:
    for _ in range(count):
        started = time.perf_counter()
        result = await client.call_tool(target.tool, target.arguments)
        latencies.append(time.perf_counter() - started)
        if result.is_error != target.expect_error:
            raise BenchmarkError(f"{target.tool} answered unexpectedly: {result}")


async def measure(scenario: Scenario, settings: Settings, mode: str) -> Stats:
    """Connect every agent, warm each up, then time the calls all together."""
    target = scenario.target
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(agent(target, mode))
            for _ in range(scenario.agents)
        ]
        warmup = max(2, settings.warmup // scenario.agents)
        await together(clients, target, [warmup] * len(clients), [])

        latencies: list[float] = []
        with Stopwatch(scenario.watched_pid) as watch:
            counts = shares(settings.calls, scenario.agents)
            await together(clients, target, counts, latencies)
    return summarize(latencies, watch)


async def together(
    clients: list[Client], target: Target, counts: list[int], latencies: list[float]
) -> None:
    async with anyio.create_task_group() as tasks:
        for client, count in zip(clients, counts, strict=True):
            tasks.start_soon(call_many, client, target, count, latencies)


# ---- runs --------------------------------------------------------------------


def scenarios(running: Services, concurrency: int) -> list[Scenario]:
    small_ints = {"a": 2, "b": 3}
    direct = Target(running.demo_url, "add", small_ints, token=None)
    brokered = Target(running.broker_url, "demo.add", small_ints, running.reader_token)
    denied = Target(
        running.broker_url,
        "demo.write_note",
        {"title": "bench", "body": "never written"},
        running.outsider_token,
        expect_error=True,
    )
    pid = running.broker_pid
    return [
        Scenario("direct", direct, 1, None),
        Scenario("brokered", brokered, 1, pid),
        Scenario("direct", direct, concurrency, None),
        Scenario("brokered", brokered, concurrency, pid),
        Scenario("brokered, denied", denied, 1, pid),
    ]


Key = tuple[str, str, int]


async def one_run(running: Services, settings: Settings) -> dict[Key, Stats]:
    results: dict[Key, Stats] = {}
    for mode in settings.modes:
        for scenario in scenarios(running, settings.concurrency):
            key = (mode, scenario.path, scenario.agents)
            results[key] = await measure(scenario, settings, mode)
    return results


def medians(runs: list[dict[Key, Stats]]) -> dict[Key, Stats]:
    return {key: median_stats([run[key] for run in runs]) for key in runs[0]}


# ---- the report --------------------------------------------------------------


def header(settings: Settings) -> list[str]:
    return [
        "## One tool call, direct and through the broker",
        "",
        f"- Machine: {machine()}",
        f"- Calls per measurement: {settings.calls}, after {settings.warmup} "
        "warm-up calls (at least 2 per agent); "
        f"runs: {settings.runs}, medians across runs shown",
        "- Agents, broker and demo server share the machine's CPUs, all on "
        "127.0.0.1; the broker records every decision in SQLite",
        "- Broker CPU is its process's utime + stime over the measured calls",
        "",
    ]


def results_table(results: dict[Key, Stats]) -> list[str]:
    lines = [
        "| mode | path | agents | p50 ms | p99 ms | calls/s | broker CPU ms/call |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (mode, path, agents), s in results.items():
        cpu = "-" if s.cpu_ms_per_call is None else f"{s.cpu_ms_per_call:.2f}"
        lines.append(
            f"| {mode} | {path} | {agents} | {s.p50_ms:.2f} | {s.p99_ms:.2f} "
            f"| {s.calls_per_second:.0f} | {cpu} |"
        )
    return lines


def overhead_table(results: dict[Key, Stats], settings: Settings) -> list[str]:
    lines = [
        "| mode | agents | added p50 ms | p50 ratio | p99 ratio | calls/s ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode in settings.modes:
        for agents in (1, settings.concurrency):
            direct = results[(mode, "direct", agents)]
            brokered = results[(mode, "brokered", agents)]
            added = brokered.p50_ms - direct.p50_ms
            lines.append(
                f"| {mode} | {agents} | {added:.2f} "
                f"| {brokered.p50_ms / direct.p50_ms:.2f} "
                f"| {brokered.p99_ms / direct.p99_ms:.2f} "
                f"| {brokered.calls_per_second / direct.calls_per_second:.2f} |"
            )
    return lines


def report(settings: Settings, results: dict[Key, Stats], rss_mib: float) -> str:
    lines = [
        *header(settings),
        *results_table(results),
        "",
        "Brokered relative to direct (ratios are brokered / direct):",
        "",
        *overhead_table(results, settings),
        "",
        f"Broker peak RSS (VmHWM) after all runs: {rss_mib:.1f} MiB",
    ]
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------


def parse_settings(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add(
        "--calls", type=bounded(2, MAX_CALLS), default=500, help="per measurement (500)"
    )
    add(
        "--concurrency",
        type=bounded(1, MAX_CONCURRENCY),
        default=32,
        help="agents (32)",
    )
    add("--runs", type=bounded(1, MAX_RUNS), default=3, help="medians shown (3)")
    add("--warmup", type=bounded(0, MAX_CALLS), default=50, help="untimed calls (50)")
    add("--mode", action="append", choices=MODES, help="repeatable (legacy)")
    args = parser.parse_args(argv)
    if args.concurrency > args.calls:
        parser.error("--concurrency may not exceed --calls")
    modes = tuple(dict.fromkeys(args.mode or ["legacy"]))
    return Settings(args.calls, args.concurrency, args.runs, args.warmup, modes)


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    with (
        tempfile.TemporaryDirectory(prefix="bench-calls-") as workdir,
        services(Path(workdir)) as running,
    ):
        runs = []
        for number in range(1, settings.runs + 1):
            print(f"run {number} of {settings.runs}...", file=sys.stderr, flush=True)
            runs.append(anyio.run(one_run, running, settings))
        rss = peak_rss_mib(running.broker_pid)
    print(report(settings, medians(runs), rss))
    return 0


if __name__ == "__main__":
    sys.exit(main())
