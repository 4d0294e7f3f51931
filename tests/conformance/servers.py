"""The processes a conformance run talks to, and the broker set up to front them.

The fixture server and the shim run as their own processes, like the broker,
so that each side of a comparison sees only HTTP.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

from tests.harness import POLICIES, install_manifest

REPO = Path(__file__).resolve().parent.parent.parent
FIXTURE = "tests.conformance.fixture_server"
SHIM = "tests.conformance.shim"
SERVER = "conformance"
START_SECONDS = 30.0
PULL = ("manifest", "pull", SERVER)


@contextmanager
def running_script(
    module: str, port: int, *args: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m module port args...`` until the block ends, once it listens.

    Its output goes to ``log``.
    """
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", module, str(port), *args],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_listening(process, module, port, log)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_listening(
    process: subprocess.Popen[bytes], name: str, port: int, log: Path
) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log.read_text(encoding="utf-8", errors="replace")
            raise RuntimeError(f"{name} exited early:\n{output}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on port {port}")


def allow_all_policies(directory: Path) -> Path:
    """The broker's schema and one policy that permits everything."""
    directory.mkdir()
    shutil.copy(POLICIES / "broker.cedarschema", directory)
    (directory / "allow_all.cedar").write_text(
        '@id("allow-all")\npermit (principal, action, resource);\n',
        encoding="utf-8",
    )
    return directory


def install_fixture_manifest(workdir: Path, fixture_url: str) -> None:
    """The fixture over HTTP, its names unprefixed, nothing pinned yet."""
    manifest: dict[str, Any] = {
        "server": SERVER,
        "description": "The MCP conformance suite's fixture server.",
        "namespace": False,
        "transport": {"type": "http", "url": fixture_url},
        "tools": {},
    }
    install_manifest(workdir, manifest)


def pin_fixture_tools(workdir: Path) -> str:
    """``broker manifest pull``, as an operator pins a server's tools."""
    completed = subprocess.run(
        [sys.executable, "-m", "broker.cli", "-c", "broker.toml", *PULL],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"manifest pull failed:\n{completed.stderr}")
    return completed.stdout


def allow_hosts(config: Path, *origins: str) -> None:
    """Let requests for ``origins`` (``http://host:port``) through the Host check.

    The suite reaches the broker through the shim, which passes the Host and
    Origin headers on unchanged: the broker must accept the shim's.
    """
    raw = tomllib.loads(config.read_text(encoding="utf-8"))
    broker = raw["broker"]
    broker["allowed_hosts"] += [o.removeprefix("http://") for o in origins]
    broker["allowed_origins"] += list(origins)
    config.write_text(tomli_w.dumps(raw), encoding="utf-8")
