"""The files one broker of the target benchmark reads, for N tools and N policies.

In a fresh directory, for a size N:

- ``manifests/bench.json``: the generated server (``many_tools_server``) over
  Streamable HTTP, its N tools pinned by the broker's own pin function and
  written by its own manifest writer. Every tool is a write tool, which the
  repository's policies allow only to ``writers``: a call is allowed only
  because a generated policy names its tool.
- ``policies/``: the repository's schema and policy files, and
  ``bench/generated.cedar`` with one permit per tool for ``bench-callers``.
- ``state.db``: pending actions, added through the approvals store's own API
  before the broker opens the file.
- ``broker.toml`` and the development signing key.

``broker check`` then reads them as the broker will, and its refusal, if any,
is reported word for word.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from harness import BenchmarkError, write_dev_config
from many_tools_server import SERVER_NAME, tool_definitions, tool_name

from broker.approvals.model import Binding, PendingAction, digest_of, new_action_id
from broker.approvals.store import SqliteApprovalStore
from broker.auth.devkey import load_or_create_dev_key, mint_dev_token
from broker.config import DEV_ISSUER
from broker.manifest import (
    Credential,
    Manifest,
    ToolSpec,
    Transport,
    manifest_to_dict,
    pin_of,
)

REPO = Path(__file__).resolve().parent.parent
POLICIES = REPO / "cedar_policies"
CALLER_GROUP = "bench-callers"
STATE_FILE = "state.db"
CHECK_SECONDS = 300.0
# Long enough that no preloaded action expires during a run.
PENDING_LIFETIME_SECONDS = 24 * 3600.0
PENDING_REQUESTERS = 100


@dataclass(frozen=True)
class Tokens:
    """A caller in ``bench-callers``, and one with the same scopes outside it."""

    member: str
    outsider: str


@dataclass(frozen=True)
class Checked:
    """What ``broker check`` said of the files, and how long it took."""

    output: str
    seconds: float


def write_files(
    workdir: Path, size: int, server_url: str, broker_port: int, pending: int
) -> None:
    """Everything the broker reads at start, for ``size`` tools and policies."""
    write_dev_config(workdir, broker_port, "policies", STATE_FILE)
    write_manifest(workdir / "manifests", size, server_url)
    write_policies(workdir / "policies", size)
    preload_pending(workdir / STATE_FILE, size, pending, now=time.time())


def write_manifest(directory: Path, size: int, server_url: str) -> None:
    specs = {
        tool.name: ToolSpec(
            server=SERVER_NAME,
            name=tool.name,
            pin=pin_of(tool.description, tool.input_schema),
            description=tool.description or "",
            input_schema=tool.input_schema,
            privilege="write",
            risk="low",
        )
        for tool in tool_definitions(size)
    }
    transport = {"type": "http", "url": server_url}
    manifest = Manifest(
        server=SERVER_NAME,
        transport=Transport(kind="http", url=server_url),
        credential=Credential(kind="none"),
        tools=specs,
    )
    head = {
        "server": SERVER_NAME,
        "description": f"{size} generated tools over Streamable HTTP (benchmark).",
        "transport": transport,
        "credential": {"type": "none"},
    }
    directory.mkdir()
    text = json.dumps(manifest_to_dict(manifest, head), indent=2)
    (directory / f"{SERVER_NAME}.json").write_text(text, encoding="utf-8")


def write_policies(directory: Path, size: int) -> None:
    """The repository's policy directory, and one permit per generated tool."""
    shutil.copytree(POLICIES, directory)
    generated = directory / SERVER_NAME
    generated.mkdir()
    text = "\n".join(tool_permit(tool_name(index)) for index in range(size))
    (generated / "generated.cedar").write_text(text, encoding="utf-8")


def tool_permit(name: str) -> str:
    qualified = f"{SERVER_NAME}.{name}"
    return (
        f'@id("{CALLER_GROUP}-call-{qualified}")\n'
        "permit (\n"
        f'  principal in Group::"{CALLER_GROUP}",\n'
        f'  action == Action::"call:{qualified}",\n'
        f'  resource == Tool::"{qualified}"\n'
        ");\n"
    )


def preload_pending(path: Path, size: int, count: int, *, now: float) -> None:
    """``count`` pending actions in the approvals store at ``path``."""
    store = SqliteApprovalStore(path)
    try:
        for index in range(count):
            store.add(pending_action(index, size, now), _unrecorded)
    finally:
        store.close()


def pending_action(index: int, size: int, now: float) -> PendingAction:
    arguments = {"a": index, "b": size}
    binding = Binding(
        subject=f"bench-requester-{index % PENDING_REQUESTERS:03d}",
        issuer=DEV_ISSUER,
        client_id="dev-agent",
        tool=f"{SERVER_NAME}.{tool_name(index % size)}",
        digest=digest_of(arguments),
    )
    return PendingAction(
        id=new_action_id(),
        decision_id=uuid.uuid4().hex,
        binding=binding,
        server=SERVER_NAME,
        arguments=arguments,
        policies=("destructive-needs-approval",),
        created=now,
        expires=now + PENDING_LIFETIME_SECONDS,
    )


def _unrecorded(action: PendingAction) -> None:
    # The broker would write an audit entry beside each; it reads none of
    # them at start, so leaving them out changes nothing measured here.
    return None


def broker_check(workdir: Path) -> Checked:
    """``broker check`` on the files; BenchmarkError with its words if it refuses."""
    command = [sys.executable, "-m", "broker.cli", "-c", "broker.toml", "check"]
    started = time.perf_counter()
    done = subprocess.run(
        command, cwd=workdir, capture_output=True, text=True, timeout=CHECK_SECONDS
    )
    seconds = time.perf_counter() - started
    said = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise BenchmarkError(f"broker check refused {workdir}:\n{said}")
    return Checked(said, seconds)


def tokens(workdir: Path, resource: str) -> Tokens:
    key = load_or_create_dev_key(workdir / "dev" / "signing-key.pem")
    scopes = ["tools:call", "tools:write"]
    member = mint_dev_token(
        key,
        resource=resource,
        subject="bench-member",
        groups=[CALLER_GROUP],
        scopes=scopes,
    )
    outsider = mint_dev_token(
        key, resource=resource, subject="bench-outsider", groups=[], scopes=scopes
    )
    return Tokens(member, outsider)
