"""``broker approvals``: list, show, approve and reject pending actions.

The commands talk to a running broker's approvals API with an approver's
bearer token (``--token`` or ``$BROKER_TOKEN``), which needs the scope
``approvals:decide``. Exit status: 0 done, 1 refused or unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import httpx2

from broker.config import load_config

# The name of the variable holding the token (S105: not a secret itself).
TOKEN_VARIABLE = "BROKER_TOKEN"  # noqa: S105
TIMEOUT_SECONDS = 10.0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``approvals`` and its actions to the ``broker`` command."""
    approvals = commands.add_parser(
        "approvals", help="list, show, approve or reject pending actions"
    )
    approvals.add_argument(
        "--url", help="the broker's public URL (default: [approvals] public_url)"
    )
    approvals.add_argument(
        "--token", help=f"an approver's bearer token (default: ${TOKEN_VARIABLE})"
    )
    actions = approvals.add_subparsers(required=True, metavar="ACTION")
    listed = actions.add_parser("list", help="pending actions you may decide on")
    listed.set_defaults(run=_list)
    show = actions.add_parser("show", help="one action, in any state, as JSON")
    show.add_argument("id")
    show.set_defaults(run=_show)
    approve = actions.add_parser("approve", help="approve a pending action")
    approve.add_argument("id")
    approve.add_argument("--reason", default="", help="why (optional)")
    approve.set_defaults(run=_decide, verdict="approve")
    reject = actions.add_parser("reject", help="reject a pending action")
    reject.add_argument("id")
    reject.add_argument("--reason", required=True, help="why; the agent sees it")
    reject.set_defaults(run=_decide, verdict="reject")


def _list(args: argparse.Namespace) -> int:
    answer = _call(args, "GET", "/actions")
    if answer is None:
        return 1
    actions = answer.get("actions", [])
    if not actions:
        print("no pending actions")
    for action in actions:
        requester = action["requester"]
        print(
            f"{action['id']}  {action['tool']}  "
            f"by {requester['subject']} via {requester['client']}  "
            f"expires {action['expires']}  "
            f"policies {', '.join(action['policies'])}"
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    answer = _call(args, "GET", f"/actions/{args.id}")
    if answer is None:
        return 1
    print(json.dumps(answer, indent=2, ensure_ascii=False))
    return 0


def _decide(args: argparse.Namespace) -> int:
    path = f"/actions/{args.id}/{args.verdict}"
    answer = _call(args, "POST", path, {"reason": args.reason})
    if answer is None:
        return 1
    print(f"{answer['status']} {answer['id']} ({answer['tool']})")
    return 0


def _call(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The API's JSON answer, or None after saying on stderr what went wrong."""
    token = args.token or os.environ.get(TOKEN_VARIABLE, "")
    if not token:
        _say(f"no token: pass --token or set {TOKEN_VARIABLE}")
        return None
    base = args.url or load_config(args.config).approvals.public_url
    url = f"{base.rstrip('/')}/approvals/api{path}"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        response = httpx2.request(
            method, url, json=body, headers=headers, timeout=TIMEOUT_SECONDS
        )
    except httpx2.HTTPError as exc:
        _say(f"cannot reach {url}: {type(exc).__name__}")
        return None
    try:
        answer: dict[str, Any] = response.json()
    except ValueError:
        answer = {}
    if response.status_code >= 400:
        _say(f"refused ({response.status_code}): {answer.get('error', 'unknown')}")
        return None
    return answer


def _say(text: str) -> None:
    print(f"broker approvals: {text}", file=sys.stderr)
