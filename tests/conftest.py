"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import (
    RunningBroker,
    free_port,
    install_manifest,
    running_broker,
    write_config,
)
from tests.idp import LocalIdP
from tests.stores import KINDS, Backing, opened_backing


@pytest.fixture(params=KINDS)
def backing(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backing]:
    """An empty audit record of each kind: a SQLite file, then keys in Redis."""
    with opened_backing(request.param, tmp_path) as opened:
        yield opened


@pytest.fixture(scope="session")
def session_idp() -> Iterator[LocalIdP]:
    with LocalIdP("http://unset/mcp", time.time) as idp:  # type: ignore[arg-type]
        yield idp


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def live_idp(session_idp: LocalIdP, port: int) -> LocalIdP:
    """The test identity provider, issuing tokens for the broker on ``port``."""
    session_idp.reset(time.time)  # type: ignore[arg-type]
    session_idp.resource = f"http://127.0.0.1:{port}/mcp"
    return session_idp


@pytest.fixture
def workdir(tmp_path: Path, live_idp: LocalIdP, port: int) -> Path:
    write_config(tmp_path, port, live_idp.issuer, live_idp.jwks_url)
    install_manifest(tmp_path)
    return tmp_path


@pytest.fixture
def broker(workdir: Path, port: int) -> Iterator[RunningBroker]:
    with running_broker(workdir, port) as running:
        yield running
