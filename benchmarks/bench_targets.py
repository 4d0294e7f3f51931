"""The broker's performance targets, measured for 10 and for 1,000 tools.

For each size N the benchmark generates a downstream server with N tools
(``many_tools_server``), pins them in a manifest, writes N policies beside
the repository's own, puts pending actions in the approvals store, has
``broker check`` read it all, and starts the server and a development
broker in front of it, all on loopback. Every size stays up for the whole
benchmark and the runs alternate between sizes, so that drift in the
machine's speed touches each alike. In each run it times, with the SDK's
own client (a call is sent as one bare request, see ``calling``):

- ``tools/call`` of the last generated tool, directly and through the
  broker by a member of ``bench-callers``, with 1 agent and with M agents;
- the same call by a caller outside that group, denied by policy before
  anything is forwarded;
- ``tools/list``, directly and through the broker, which lists all N tools
  to the member.

CPU time is that of the process answering: the downstream server for a
direct call, the broker for a brokered one. After the runs it reads the
pending-action count from ``/metrics`` (counted by the store) and then
each process's peak RSS. Figures are medians across runs. It
measures and prints; it never fails on a figure.

Usage:
    python benchmarks/bench_targets.py [--quick] [--sizes 10,1000] [--runs R]
        [--calls N] [--list-calls L] [--concurrency M] [--pending P] ...
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp.types as types
from harness import (
    HOST,
    BenchmarkError,
    Stats,
    Stopwatch,
    answers_200,
    bounded,
    connect,
    free_port,
    median_stats,
    peak_rss_mib,
    port_open,
    shares,
    start,
    stop,
    summarize,
    wait_until,
)
from many_tools_server import MAX_TOOLS, SERVER_NAME, tool_name
from mcp import Client
from targets_report import Key, Memory, Settings, SizeResult, report
from targets_setup import Checked, Tokens, broker_check, tokens, write_files

SERVER_SCRIPT = Path(__file__).resolve().parent / "many_tools_server.py"
MODES = ("legacy", "auto")
ARGUMENTS = {"a": 2, "b": 3}
EXPECTED_SUM = "5"

# Bounds on what one invocation may ask for, so a typo cannot run for hours.
MAX_CALLS = 100_000
MAX_CONCURRENCY = 256
MAX_RUNS = 20
MAX_PENDING = 1_000_000

# Enough listings that CPU time, counted in 10 ms ticks, says something.
DEFAULTS = Settings(
    sizes=(10, 1000),
    calls=400,
    list_calls=20,
    concurrency=32,
    runs=3,
    warmup=50,
    pending=10_000,
    mode="legacy",
)
QUICK = replace(DEFAULTS, calls=64, list_calls=5, runs=1, warmup=8, pending=1000)

Operation = Callable[[Client], Awaitable[None]]


@dataclass(frozen=True)
class Stack:
    """One generated server and the broker in front of it, running."""

    size: int
    workdir: Path
    server_url: str
    broker_url: str
    server_pid: int
    broker_pid: int
    tokens: Tokens
    checked: Checked
    start_seconds: float
    ready_rss_mib: float


@dataclass(frozen=True)
class Scenario:
    key: Key
    url: str
    token: str | None
    operation: Operation
    calls: int
    warmup: int  # untimed calls per agent
    # The process whose CPU time is charged to the calls.
    watched_pid: int


# ---- one size, running -------------------------------------------------------


@contextmanager
def running(workdir: Path, size: int, settings: Settings) -> Iterator[Stack]:
    """The generated server and a broker for ``size`` tools, until the block ends."""
    workdir.mkdir()
    server_port, broker_port = free_port(), free_port()
    server_url = f"http://{HOST}:{server_port}/mcp"
    origin = f"http://{HOST}:{broker_port}"
    write_files(workdir, size, server_url, broker_port, settings.pending)
    checked = broker_check(workdir)
    agents = tokens(workdir, f"{origin}/mcp")

    server_log, broker_log = workdir / "server.log", workdir / "broker.log"
    server_command = [sys.executable, str(SERVER_SCRIPT), "--tools", str(size)]
    server = start([*server_command, str(server_port)], server_log, workdir)
    try:
        wait_until(port_open(server_port), server, server_log)
        broker_command = [sys.executable, "-m", "broker.cli", "-c", "broker.toml"]
        started = time.perf_counter()
        broker = start([*broker_command, "serve"], broker_log, workdir)
        try:
            wait_until(answers_200(f"{origin}/readyz"), broker, broker_log)
            yield Stack(
                size=size,
                workdir=workdir,
                server_url=server_url,
                broker_url=f"{origin}/mcp",
                server_pid=server.pid,
                broker_pid=broker.pid,
                tokens=agents,
                checked=checked,
                start_seconds=time.perf_counter() - started,
                ready_rss_mib=peak_rss_mib(broker.pid),
            )
        finally:
            stop(broker)
    finally:
        stop(server)


# ---- what an agent does ------------------------------------------------------


def calling(tool: str, *, allowed: bool) -> Operation:
    """Call ``tool``; BenchmarkError unless it is allowed (or denied) as expected.

    The request goes out as it is. The SDK's ``call_tool`` would first list
    every tool, once per session, to validate the output: through the broker
    a list of 1,000 tools takes seconds, which would swamp the call figures.
    ``tools/list`` is measured on its own.
    """
    params = types.CallToolRequestParams(name=tool, arguments=ARGUMENTS)
    request = types.CallToolRequest(params=params)

    async def call(client: Client) -> None:
        result = await client.session.send_request(request, types.CallToolResult)
        if allowed and not result.is_error and _text(result) == EXPECTED_SUM:
            return
        if not allowed and result.is_error and _category(result) == "forbidden":
            return
        expected = "the sum" if allowed else "a policy denial"
        raise BenchmarkError(f"{tool} should have answered {expected}: {result}")

    return call


def listing(expected: int) -> Operation:
    """List tools; BenchmarkError unless all ``expected`` come back in one page."""

    async def list_tools(client: Client) -> None:
        result = await client.list_tools()
        if len(result.tools) != expected or result.next_cursor:
            raise BenchmarkError(
                f"tools/list showed {len(result.tools)} of {expected} tools "
                "in its first page (hidden, quarantined or paged?)"
            )

    return list_tools


def _text(result: types.CallToolResult) -> str | None:
    first = result.content[0] if result.content else None
    return first.text if isinstance(first, types.TextContent) else None


def _category(result: types.CallToolResult) -> object:
    said: Any = result.structured_content or {}
    return said.get("broker", {}).get("category")


# ---- measuring ---------------------------------------------------------------


def scenarios(stack: Stack, settings: Settings) -> list[Scenario]:
    """What one run measures, in order; the last generated tool is the one called."""
    tool = tool_name(stack.size - 1)
    direct_call = calling(tool, allowed=True)
    brokered_call = calling(f"{SERVER_NAME}.{tool}", allowed=True)
    denied_call = calling(f"{SERVER_NAME}.{tool}", allowed=False)
    listed = listing(stack.size)

    def scenario(key: Key, operation: Operation) -> Scenario:
        method, path, agents = key
        if method == "tools/list":
            count, warmup = settings.list_calls, 1
        else:
            count, warmup = settings.calls, max(2, settings.warmup // agents)
        if path == "direct":
            url, token, pid = stack.server_url, None, stack.server_pid
        else:
            url, pid = stack.broker_url, stack.broker_pid
            token = stack.tokens.outsider if path == "denied" else stack.tokens.member
        return Scenario(key, url, token, operation, count, warmup, pid)

    many = settings.concurrency
    return [
        scenario(("tools/call", "direct", 1), direct_call),
        scenario(("tools/call", "brokered", 1), brokered_call),
        scenario(("tools/call", "direct", many), direct_call),
        scenario(("tools/call", "brokered", many), brokered_call),
        scenario(("tools/call", "denied", 1), denied_call),
        scenario(("tools/list", "direct", 1), listed),
        scenario(("tools/list", "brokered", 1), listed),
    ]


async def measure(scenario: Scenario, mode: str) -> Stats:
    """Connect every agent, warm each up, then time the calls all together."""
    agents = scenario.key[2]
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(connect(scenario.url, scenario.token, mode))
            for _ in range(agents)
        ]
        warmup = [scenario.warmup] * agents
        await together(clients, scenario.operation, warmup, [])

        latencies: list[float] = []
        with Stopwatch(scenario.watched_pid) as watch:
            counts = shares(scenario.calls, agents)
            await together(clients, scenario.operation, counts, latencies)
    return summarize(latencies, watch)


async def together(
    clients: list[Client],
    operation: Operation,
    counts: list[int],
    latencies: list[float],
) -> None:
    async with anyio.create_task_group() as tasks:
        for client, count in zip(clients, counts, strict=True):
            tasks.start_soon(repeat, client, operation, count, latencies)


async def repeat(
    client: Client, operation: Operation, count: int, latencies: list[float]
) -> None:
    for _ in range(count):
        started = time.perf_counter()
        await operation(client)
        latencies.append(time.perf_counter() - started)


async def one_run(stack: Stack, settings: Settings) -> dict[Key, Stats]:
    results = {}
    for scenario in scenarios(stack, settings):
        try:
            results[scenario.key] = await measure(scenario, settings.mode)
        except Exception as error:
            method, path, agents = scenario.key
            where = f"N={stack.size}, {method} {path} with {agents} agent(s)"
            log = problems_in(stack.workdir / "broker.log")
            raise BenchmarkError(
                f"{where}: {first_failure(error)}\nbroker log:\n{log}"
            ) from error
    return results


def problems_in(log: Path, lines: int = 20) -> str:
    """The last warnings and errors in ``log``, without the SDK's INFO lines."""
    text = log.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = [line for line in text if " INFO " not in line]
    return "\n".join(kept[-lines:])


def first_failure(error: BaseException) -> str:
    """The first error that is not a group: what nested task groups hide."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}"


# ---- after the runs ----------------------------------------------------------


def finish(stack: Stack, runs: list[dict[Key, Stats]]) -> SizeResult:
    """Medians across runs, then the memory figures (a scrape comes first)."""
    medians = {key: median_stats([run[key] for run in runs]) for key in runs[0]}
    after_runs = peak_rss_mib(stack.broker_pid)
    pending = pending_reported(stack.broker_url.removesuffix("/mcp"))
    memory = Memory(
        broker_ready_mib=stack.ready_rss_mib,
        broker_after_runs_mib=after_runs,
        broker_peak_mib=peak_rss_mib(stack.broker_pid),
        server_peak_mib=peak_rss_mib(stack.server_pid),
        pending_reported=pending,
    )
    return SizeResult(
        size=stack.size,
        stats=medians,
        memory=memory,
        check=stack.checked,
        start_seconds=stack.start_seconds,
    )


def pending_reported(origin: str) -> float | None:
    """The broker's own count of pending actions, as Prometheus would scrape it."""
    text = httpx2.get(f"{origin}/metrics", timeout=60.0).text
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "broker_pending_approvals":
            return float(value)
    return None


def benchmark(settings: Settings, root: Path) -> list[SizeResult]:
    with ExitStack() as started:
        stacks = []
        for size in settings.sizes:
            say(f"N={size}: writing files, broker check, starting...")
            workdir = root / f"n{size}"
            stacks.append(started.enter_context(running(workdir, size, settings)))
        runs: dict[int, list[dict[Key, Stats]]] = {size: [] for size in settings.sizes}
        for number in range(1, settings.runs + 1):
            for stack in stacks:
                say(f"N={stack.size}: run {number} of {settings.runs}...")
                runs[stack.size].append(anyio.run(one_run, stack, settings))
        return [finish(stack, runs[stack.size]) for stack in stacks]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- command line ------------------------------------------------------------


def sizes(text: str) -> tuple[int, ...]:
    parse = bounded(1, MAX_TOOLS)
    try:
        values = tuple(dict.fromkeys(parse(part) for part in text.split(",")))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return values


def parse_settings(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="a short smoke run; options still win")
    add("--sizes", type=sizes, help="tool and policy counts (10,1000)")
    add("--calls", type=bounded(2, MAX_CALLS), help="per call measurement (400)")
    add("--list-calls", type=bounded(2, MAX_CALLS), help="tools/list per run (3)")
    add("--concurrency", type=bounded(1, MAX_CONCURRENCY), help="agents (32)")
    add("--runs", type=bounded(1, MAX_RUNS), help="medians shown (3)")
    add("--warmup", type=bounded(0, MAX_CALLS), help="untimed calls (50)")
    add("--pending", type=bounded(0, MAX_PENDING), help="pending actions (10000)")
    add("--mode", choices=MODES, help="the agents' protocol mode (legacy)")
    args = parser.parse_args(argv)

    base = QUICK if args.quick else DEFAULTS
    chosen = {
        name: value
        for name, value in vars(args).items()
        if name != "quick" and value is not None
    }
    settings = replace(base, **chosen)
    if settings.concurrency > settings.calls:
        parser.error("--concurrency may not exceed --calls")
    return settings


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-targets-") as root:
        try:
            results = benchmark(settings, Path(root))
        except BenchmarkError as exc:
            print(f"bench_targets: {exc}", file=sys.stderr)
            return 1
    wall = time.perf_counter() - began
    print(report(settings, results, wall))
    return 0


if __name__ == "__main__":
    sys.exit(main())
