"""A downstream server that talks back while it works, for the relay tests.

Each tool uses one thing a server may send towards the client in the middle
of a request: a sampling request, an elicitation request, log messages at
several levels, progress notifications, or an update of a resource that
clients may subscribe to. Run over stdio, or with ``--http PORT`` over
Streamable HTTP on loopback.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import (
    EmptyResult,
    SamplingMessage,
    SubscribeRequestParams,
    TextContent,
    UnsubscribeRequestParams,
)
from pydantic import BaseModel

server = MCPServer("relay", version="1.0")
_count = [0]


class Answer(BaseModel):
    name: str


@server.tool(description="Ask the client's model to complete a prompt.")
async def ask_model(prompt: str, ctx: Context) -> str:
    result = await ctx.session.create_message(
        messages=[
            SamplingMessage(role="user", content=TextContent(type="text", text=prompt))
        ],
        max_tokens=50,
        related_request_id=ctx.request_id,
    )
    content = result.content
    text = content.text if isinstance(content, TextContent) else "?"
    return f"model said: {text}"


@server.tool(description="Ask the user for a name.")
async def ask_user(question: str, ctx: Context) -> str:
    try:
        answer = await ctx.elicit(question, Answer)
    except Exception as exc:
        return f"not answered: {exc}"
    if answer.action == "accept" and answer.data is not None:
        return f"user said: {answer.data.name}"
    return f"user chose: {answer.action}"


@server.tool(description="Log one message at each of three levels.")
async def chatty(ctx: Context) -> str:
    await ctx.debug("a debug line")
    await ctx.info("an info line")
    await ctx.warning("a warning line")
    return "logged"


@server.tool(description="Say a name back as structured content.")
def named(name: str) -> Answer:
    return Answer(name=name)


@server.tool(description="Take a while: for calls that are cancelled.")
async def dawdle(seconds: float) -> str:
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        _note("dawdle cancelled")
        raise
    return "done dawdling"


def _note(line: str) -> None:
    """A line in the file RELAY_NOTES names, for tests that ask what happened here."""
    path = os.environ.get("RELAY_NOTES")
    if path:
        with open(path, "a", encoding="utf-8") as notes:
            notes.write(line + "\n")


@server.resource("relay://counter", description="A number that bump changes.")
def counter() -> str:
    return str(_count[0])


@server.tool(description="Change the counter and say so to subscribers.")
async def bump(ctx: Context) -> str:
    _count[0] += 1
    await ctx.session.send_resource_updated("relay://counter")
    return str(_count[0])


@server.tool(description="Report progress in a few steps.")
async def steps(count: int, ctx: Context) -> str:
    for step in range(1, count + 1):
        await ctx.report_progress(step, count, f"step {step}")
        await anyio.sleep(0.01)
    return f"{count} steps"


async def _follow(ctx: Any, params: Any) -> EmptyResult:
    return EmptyResult()


# MCPServer has no decorator for subscriptions; its low-level server takes
# the handlers directly. Updates are sent by ``bump`` whoever follows.
for _method, _params in (
    ("resources/subscribe", SubscribeRequestParams),
    ("resources/unsubscribe", UnsubscribeRequestParams),
):
    server._lowlevel_server.add_request_handler(_method, _params, _follow)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--http"]:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("stdio")
