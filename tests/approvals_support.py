"""What the approval tests share: configuration, tokens, and the approver's API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2

from tests.harness import (
    RunningBroker,
    free_port,
    install_manifest,
    running_broker,
    write_config,
)
from tests.idp import LocalIdP
from tests.oidc import CLIENT_ID, CLIENT_SECRET, OidcProvider

DELETE = "demo.delete_note"
PAGE_ENV = {
    "BROKER_OIDC_CLIENT_SECRET": CLIENT_SECRET,
    "BROKER_SESSION_SECRET": "a-session-secret-for-tests-only",
}


def prepare(
    workdir: Path, port: int, idp: LocalIdP, *, wait: float, oidc_issuer: str = ""
) -> None:
    """Config and manifest for a broker whose calls wait ``wait`` seconds."""
    table = f"[approvals]\nwait_seconds = {wait}\nexpiry_seconds = 120\n"
    if oidc_issuer:
        table += f'oidc_issuer = "{oidc_issuer}"\noidc_client_id = "{CLIENT_ID}"\n'
    write_config(workdir, port, idp.issuer, idp.jwks_url, extra_tables=table)
    install_manifest(workdir)


def agent_token(idp: LocalIdP, sub: str = "wanda", *groups: str) -> str:
    """A token for an agent acting for ``sub``, a writer unless told otherwise."""
    return idp.token(
        idp.claims(
            sub=sub, groups=list(groups or ["writers"]), scope="tools:call tools:write"
        )
    )


def approver_token(idp: LocalIdP, sub: str = "carol", *groups: str) -> str:
    """A token for a person deciding through the API or the command line."""
    return idp.token(
        idp.claims(
            sub=sub,
            azp="approvals-cli",
            groups=list(groups or ["approvers"]),
            scope="approvals:decide",
        )
    )


async def api(
    origin: str, token: str, method: str, path: str, body: Any = None
) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=10) as http:
        return await http.request(
            method,
            f"{origin}/approvals/api{path}",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        )


async def first_pending(
    origin: str, token: str, requester: str, within: float = 10.0
) -> str:
    """The id of the first action ``requester`` asked for, once the approver sees it."""
    for _ in range(int(within / 0.05)):
        listed = (await api(origin, token, "GET", "/actions")).json()["actions"]
        mine = [a for a in listed if a["requester"]["subject"] == requester]
        if mine:
            return str(mine[0]["id"])
        await anyio.sleep(0.05)
    raise AssertionError(f"no pending action of {requester} appeared")


@contextmanager
def shared_broker(
    workdir: Path,
    idp: LocalIdP,
    *,
    wait: float,
    oidc: OidcProvider | None = None,
) -> Iterator[RunningBroker]:
    """One broker for a whole test module, with ``idp`` issuing its tokens.

    Tests sharing it keep apart by using their own users and arguments.
    """
    port = free_port()
    idp.reset(time.time)  # type: ignore[arg-type]
    idp.resource = f"http://127.0.0.1:{port}/mcp"
    issuer = ""
    if oidc is not None:
        oidc.redirect_uris = {f"http://127.0.0.1:{port}/approvals/callback"}
        issuer = oidc.issuer
    prepare(workdir, port, idp, wait=wait, oidc_issuer=issuer)
    env = PAGE_ENV if oidc is not None else None
    with running_broker(workdir, port, env=env) as running:
        yield running
