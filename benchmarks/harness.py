"""What every benchmark here shares: processes, /proc, agents and statistics.

Processes are started on loopback and stopped in ``finally`` blocks; CPU time
and peak memory come from /proc, so the benchmarks run on Linux only.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from types import TracebackType

import httpx2
import tomli_w
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

HOST = "127.0.0.1"
START_SECONDS = 60.0
STOP_SECONDS = 10.0

# Variables that would make the demo server write a file on every request.
DEMO_ONLY_VARIABLES = ("DEMO_RECORD_PATH", "DEMO_ECHO_DESCRIPTION")


class BenchmarkError(Exception):
    """A process would not start, or a call did not answer as it should."""


@dataclass(frozen=True)
class Stats:
    p50_ms: float
    p99_ms: float
    calls_per_second: float
    cpu_ms_per_call: float | None


# ---- processes ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start(command: list[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    environment = {k: v for k, v in os.environ.items() if k not in DEMO_ONLY_VARIABLES}
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=cwd, env=environment, stdout=out, stderr=subprocess.STDOUT
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until(
    ready: Callable[[], bool], process: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(f"the {log.stem} process exited early:\n{tail(log)}")
        if ready():
            return
        time.sleep(0.05)
    raise BenchmarkError(f"the {log.stem} process was not ready in time:\n{tail(log)}")


def tail(log: Path, lines: int = 30) -> str:
    text = log.read_text(encoding="utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def port_open(port: int) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
        except OSError:
            return False
        return True

    return ready


def answers_200(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            return httpx2.get(url, timeout=1.0).status_code == 200
        except httpx2.HTTPError:
            return False

    return ready


# ---- /proc -------------------------------------------------------------------


def write_dev_config(
    workdir: Path, port: int, policy_dir: str, state_file: str = "state.db"
) -> None:
    """A development broker's ``broker.toml``, manifests in ``manifests``."""
    origin = f"http://{HOST}:{port}"
    config = {
        "broker": {
            "resource": f"{origin}/mcp",
            "host": HOST,
            "port": port,
            "allowed_hosts": [f"{HOST}:{port}"],
            "allowed_origins": [origin],
            "policy_dir": policy_dir,
            "manifest_dir": "manifests",
            "development": True,
            "dev_key_path": "dev/signing-key.pem",
        },
        "store": {"type": "sqlite", "path": state_file},
    }
    (workdir / "broker.toml").write_text(tomli_w.dumps(config), encoding="utf-8")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far, every thread included."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    # The command name may hold spaces; the fields after it do not.
    fields = stat.rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise BenchmarkError(f"no VmHWM in /proc/{pid}/status")


class Stopwatch:
    """Wall time over one phase, and the CPU time a watched process spent in it."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.seconds = 0.0
        self.cpu_seconds: float | None = None

    def __enter__(self) -> Stopwatch:
        self._cpu_before = cpu_seconds(self.pid) if self.pid is not None else 0.0
        self._started = time.perf_counter()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.seconds = time.perf_counter() - self._started
        if self.pid is not None:
            self.cpu_seconds = cpu_seconds(self.pid) - self._cpu_before


# ---- agents ------------------------------------------------------------------


@asynccontextmanager
async def connect(url: str, token: str | None, mode: str) -> AsyncIterator[Client]:
    """The SDK's client, connected as an agent would be."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=60.0) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=mode, cache=None) as client:
            yield client


def shares(calls: int, agents: int) -> list[int]:
    """``calls`` split between ``agents`` as evenly as whole numbers allow."""
    each, extra = divmod(calls, agents)
    return [each + (1 if i < extra else 0) for i in range(agents)]


# ---- statistics --------------------------------------------------------------


def summarize(latencies: list[float], watch: Stopwatch) -> Stats:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    cpu = watch.cpu_seconds
    return Stats(
        p50_ms=cuts[49] * 1000,
        p99_ms=cuts[98] * 1000,
        calls_per_second=len(latencies) / watch.seconds,
        cpu_ms_per_call=None if cpu is None else cpu * 1000 / len(latencies),
    )


def median_stats(samples: list[Stats]) -> Stats:
    cpu = [s.cpu_ms_per_call for s in samples if s.cpu_ms_per_call is not None]
    return Stats(
        p50_ms=statistics.median(s.p50_ms for s in samples),
        p99_ms=statistics.median(s.p99_ms for s in samples),
        calls_per_second=statistics.median(s.calls_per_second for s in samples),
        cpu_ms_per_call=statistics.median(cpu) if cpu else None,
    )


# ---- the machine and the command line ----------------------------------------


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def machine() -> str:
    """One line naming what the figures came from."""
    return (
        f"{len(os.sched_getaffinity(0))} CPUs (nproc), {cpu_model()}, "
        f"Python {platform.python_version()}, mcp {version('mcp')}, "
        f"cedarpy {version('cedarpy')}, Linux {platform.release()}"
    )


def broker_source() -> str:
    """Where this interpreter imports the broker from, and its commit if in git."""
    import broker

    package = Path(broker.__file__).resolve().parent
    git = ["git", "-C", str(package)]
    try:
        commit = subprocess.run(
            [*git, "log", "-1", "--format=%h"], capture_output=True, text=True
        )
        changes = subprocess.run(
            [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True
        )
    except OSError:
        return str(package)
    if commit.returncode != 0:
        return f"{package} (not a git checkout)"
    state = "with uncommitted changes" if changes.stdout.strip() else "clean"
    return f"{package} at {commit.stdout.strip()}, {state}"


def bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}")
        return value

    return parse
