"""A downstream MCP server offering any number of generated tools.

Every tool adds two whole numbers; they differ in name and wording only, so
that a list of a thousand of them weighs what a real catalogue would. The
definitions are a pure function of the count: the benchmark pins exactly
what this server will offer without asking it first.

Usage:
    python benchmarks/many_tools_server.py --tools N PORT
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import mcp.types as types
from mcp.server import Server
from mcp.server.context import ServerRequestContext

MAX_TOOLS = 10_000
SERVER_NAME = "bench"


def tool_name(index: int) -> str:
    return f"tool_{index:04d}"


def tool_definitions(count: int) -> list[types.Tool]:
    """The ``count`` tools the server offers, in order."""
    return [_definition(index, count) for index in range(count)]


def _definition(index: int, count: int) -> types.Tool:
    description = (
        f"Add two whole numbers and return their sum. Generated tool {index + 1} "
        f"of {count}; it reads nothing and changes nothing, but its definition "
        "is as long as that of a typical tool."
    )
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "description": "The first addend."},
            "b": {"type": "integer", "description": "The second addend."},
            "note": {
                "type": "string",
                "description": "Free text the tool ignores, as real tools have.",
            },
        },
        "required": ["a", "b"],
    }
    hints = types.ToolAnnotations(
        read_only_hint=False, destructive_hint=False, open_world_hint=False
    )
    return types.Tool(
        name=tool_name(index),
        description=description,
        input_schema=schema,
        annotations=hints,
    )


def build_server(count: int) -> Server[Any]:
    """The SDK's low-level server with ``count`` tools, answered from memory."""
    tools = tool_definitions(count)
    schemas: Mapping[str, Mapping[str, Any]] = {t.name: t.input_schema for t in tools}
    listing = types.ListToolsResult(tools=tools)

    async def list_tools(
        ctx: ServerRequestContext[Any, Any],
        params: types.PaginatedRequestParams | None,
    ) -> types.ListToolsResult:
        return listing

    async def call_tool(
        ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        arguments = params.arguments or {}
        if params.name not in schemas:
            return _error(f"no tool {params.name!r}")
        a, b = arguments.get("a"), arguments.get("b")
        if not isinstance(a, int) or not isinstance(b, int):
            return _error("a and b must be whole numbers")
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=str(a + b))]
        )

    return Server(
        SERVER_NAME,
        version="1.0",
        # Without it, the sessionless protocol would list every tool before
        # each call to check its arguments.
        get_tool_input_schema=schemas.get,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


def _error(text: str) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)], is_error=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", type=int, default=10, help="how many (10)")
    parser.add_argument("port", type=int, help="serve Streamable HTTP on this port")
    args = parser.parse_args()
    if not 1 <= args.tools <= MAX_TOOLS:
        parser.error(f"--tools must be from 1 to {MAX_TOOLS}")

    import uvicorn

    app = build_server(args.tools).streamable_http_app(
        stateless_http=True, json_response=True
    )
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
