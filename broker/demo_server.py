"""A small downstream MCP server to put behind the broker.

It offers tools of every privilege the example policies speak of, a resource
and a prompt. Two environment variables make it useful in tests:
``DEMO_RECORD_PATH`` names a file where it appends one JSON line for every
request it receives (with the ``Authorization`` header it saw, over HTTP),
and ``DEMO_ECHO_DESCRIPTION`` replaces the description of ``echo``, the way
a compromised or updated server would change a tool under the agent's feet.

Run it over stdio (the default) or ``--http PORT`` for Streamable HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations
from starlette.types import ASGIApp, Receive, Scope, Send

server = MCPServer("demo", version="1.0")
_notes: dict[str, str] = {}

READ = ToolAnnotations(read_only_hint=True, open_world_hint=False)
READ_WEB = ToolAnnotations(read_only_hint=True, open_world_hint=True)
WRITE = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, open_world_hint=False
)
DESTROY = ToolAnnotations(
    read_only_hint=False, destructive_hint=True, open_world_hint=False
)


def _record(kind: str, **fields: Any) -> None:
    path = os.environ.get("DEMO_RECORD_PATH")
    if not path:
        return
    line = json.dumps({"kind": kind, "time": time.time(), **fields})
    with open(path, "a", encoding="utf-8") as out:
        out.write(line + "\n")


@server.tool(
    description=os.environ.get("DEMO_ECHO_DESCRIPTION", "Repeat the text."),
    annotations=READ,
)
def echo(text: str) -> str:
    _record("call", tool="echo", arguments={"text": text})
    return text


@server.tool(description="Add two whole numbers.", annotations=READ)
def add(a: int, b: int) -> int:
    _record("call", tool="add", arguments={"a": a, "b": b})
    return a + b


@server.tool(
    description="Search the public web (the demo only pretends to).",
    annotations=READ_WEB,
)
def search_web(query: str) -> str:
    _record("call", tool="search_web", arguments={"query": query})
    return f"3 results for {query!r}"


@server.tool(
    description="Write a note under a title, replacing any note there.",
    annotations=WRITE,
)
def write_note(title: str, body: str) -> str:
    _record("call", tool="write_note", arguments={"title": title, "body": body})
    _notes[title] = body
    return f"saved {title!r}"


@server.tool(description="Delete the note with this title.", annotations=DESTROY)
def delete_note(title: str) -> str:
    _record("call", tool="delete_note", arguments={"title": title})
    return "deleted" if _notes.pop(title, None) is not None else "no such note"


@server.tool(description="Send money. The amount is in cents.", annotations=WRITE)
def transfer(amount: int, to: str, memo: str = "") -> str:
    _record(
        "call", tool="transfer", arguments={"amount": amount, "to": to, "memo": memo}
    )
    return f"sent {amount / 100:.2f} to {to}"


@server.tool(
    description="Sleep for a number of seconds, then answer.", annotations=READ
)
def slow(seconds: float) -> str:
    _record("call", tool="slow", arguments={"seconds": seconds})
    time.sleep(min(seconds, 60.0))
    return "done"


@server.resource("notes://index", description="Titles of all notes.")
def notes_index() -> str:
    _record("read", uri="notes://index")
    return "\n".join(sorted(_notes)) or "(no notes)"


@server.prompt(description="Ask for a short summary of a text.")
def summarize(text: str) -> str:
    _record("prompt", prompt="summarize")
    return f"Summarize in one sentence:\n\n{text}"


class _RecordHeaders:
    """Notes the Authorization header of every HTTP request, to prove what arrives."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            _record("http", path=scope["path"], authorization=auth)
        await self.app(scope, receive, send)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", type=int, metavar="PORT", help="serve HTTP on PORT")
    args = parser.parse_args()
    if args.http is None:
        server.run("stdio")
        return
    import uvicorn

    app = server.streamable_http_app(stateless_http=True, json_response=True)
    uvicorn.run(
        _RecordHeaders(app), host="127.0.0.1", port=args.http, log_level="warning"
    )


if __name__ == "__main__":
    main()
