"""The server the MCP conformance suite expects, for the broker to front.

The suite's server scenarios call fixed names: tools such as
``test_simple_text`` and ``test_sampling``, resources under ``test://``,
prompts such as ``test_prompt_with_arguments``. No published package offers
them, so this module does, with the official SDK's low-level server over
Streamable HTTP: stateful sessions, an in-memory event store so that an SSE
stream can be resumed, and the SDK's own Host and Origin checks for loopback.

Run from the repository: ``python -m tests.conformance.fixture_server PORT``;
it serves ``http://127.0.0.1:PORT/mcp`` until it is stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import mcp.types as types
import uvicorn
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore

from tests.conformance.fixture_content import (
    DEFAULTS,
    ENUMS,
    NO_ARGUMENTS,
    PNG,
    SCHEMA_2020_12,
    USER_INFO,
    WAV,
    embedded_block,
    image_block,
    takes,
    text_block,
)

Context = ServerRequestContext[Any, Any]
Content = types.TextContent | types.ImageContent | types.AudioContent
Block = Content | types.EmbeddedResource
# Suggested to clients in the SSE retry field, in milliseconds.
RETRY_MILLISECONDS = 500
PRIMING_SECONDS = 0.2
# The spacing the suite asks for between log and progress notifications.
STEP_SECONDS = 0.05


# ---- tools ---------------------------------------------------------------

Run = Callable[[Context, dict[str, Any]], Awaitable[list[Block]]]


@dataclass(frozen=True)
class FixtureTool:
    description: str
    input_schema: dict[str, Any]
    run: Run
    is_error: bool = False


async def _simple_text(ctx: Context, arguments: dict[str, Any]) -> list[Block]:
    return [text_block("This is a simple text response for testing.")]


async def _image_content(ctx: Context, arguments: dict[str, Any]) -> list[Block]:
    return [image_block()]


async def _audio_content(ctx: Context, arguments: dict[str, Any]) -> list[Block]:
    return [types.AudioContent(type="audio", data=WAV, mime_type="audio/wav")]


async def _embedded_resource(ctx: Context, arguments: dict[str, Any]) -> list[Block]:
    text = "This is an embedded resource content."
    return [embedded_block("test://embedded-resource", "text/plain", text)]


async def _mixed_content(ctx: Context, arguments: dict[str, Any]) -> list[Block]:
    data = json.dumps({"test": "data", "value": 123})
    return [
        text_block("Multiple content types test:"),
        image_block(),
        embedded_block("test://mixed-content-resource", "application/json", data),
    ]


async def _with_logging(ctx: Context, arguments: dict[str, Any]) -> list[Block]:
    steps = ["Tool execution started", "Tool processing data"]
    for message in [*steps, "Tool execution completed"]:
        await ctx.session.send_log_message(
            level="info",
            data=message,
            logger="conformance",
            related_request_id=ctx.request_id,
        )
        if message in steps:
            await anyio.sleep(STEP_SECONDS)
    return [text_block("Logged three messages.")]


async def _with_progress(ctx: Context, arguments: dict[str, Any]) -> list[Block]:
    for progress in (0, 50, 100):
        await ctx.session.report_progress(progress, 100)
        if progress < 100:
            await anyio.sleep(STEP_SECONDS)
    return [text_block("Reported progress 0, 50 and 100 of 100.")]


async def _error(ctx: Context, arguments: dict[str, Any]) -> list[Block]:
    return [text_block("This tool intentionally returns an error for testing")]


async def _sampling(ctx: Context, arguments: dict[str, Any]) -> list[Block]:
    prompt = types.TextContent(type="text", text=str(arguments.get("prompt", "")))
    result = await ctx.session.create_message(
        messages=[types.SamplingMessage(role="user", content=prompt)],
        max_tokens=100,
        related_request_id=ctx.request_id,
    )
    answer = result.content
    said = answer.text if isinstance(answer, types.TextContent) else str(answer)
    return [text_block(f"LLM response: {said}")]


def _elicitor(message: str | None, schema: dict[str, Any]) -> Run:
    """A tool that asks the user through the client, with ``schema``."""

    async def run(ctx: Context, arguments: dict[str, Any]) -> list[Block]:
        asked = message or str(arguments.get("message", ""))
        result = await ctx.session.elicit_form(
            asked, schema, related_request_id=ctx.request_id
        )
        summary = f"action={result.action}, content={json.dumps(result.content)}"
        return [text_block(f"Elicitation completed: {summary}")]

    return run


async def _reconnection(ctx: Context, arguments: dict[str, Any]) -> list[Block]:
    # The SDK offers to close the stream only to clients of 2025-11-25 or
    # later; the suite's request for this tool says 2025-03-26, so the
    # answer then comes on the stream it asked on.
    if ctx.close_sse_stream is not None:
        # Let the stream's priming event (the id a client resumes from) reach
        # the client before the stream closes; closing at once can race it.
        await anyio.sleep(PRIMING_SECONDS)
        await ctx.close_sse_stream()
        await anyio.sleep(RETRY_MILLISECONDS / 1000 * 2)
    return [text_block("Reconnection test done.")]


TOOLS: dict[str, FixtureTool] = {
    "test_simple_text": FixtureTool(
        "Answers with one line of text.", NO_ARGUMENTS, _simple_text
    ),
    "test_image_content": FixtureTool(
        "Answers with a one-pixel PNG.", NO_ARGUMENTS, _image_content
    ),
    "test_audio_content": FixtureTool(
        "Answers with a short silent WAV.", NO_ARGUMENTS, _audio_content
    ),
    "test_embedded_resource": FixtureTool(
        "Answers with an embedded text resource.", NO_ARGUMENTS, _embedded_resource
    ),
    "test_multiple_content_types": FixtureTool(
        "Answers with text, an image and a resource.", NO_ARGUMENTS, _mixed_content
    ),
    "test_tool_with_logging": FixtureTool(
        "Sends three log messages while it runs.", NO_ARGUMENTS, _with_logging
    ),
    "test_tool_with_progress": FixtureTool(
        "Reports progress three times while it runs.", NO_ARGUMENTS, _with_progress
    ),
    "test_error_handling": FixtureTool(
        "Always fails, as a tool error.", NO_ARGUMENTS, _error, is_error=True
    ),
    "test_sampling": FixtureTool(
        "Asks the client's model to answer a prompt.",
        takes("prompt", "The prompt to send to the LLM"),
        _sampling,
    ),
    "test_elicitation": FixtureTool(
        "Asks the user for a name and an email address.",
        takes("message", "The message to show the user"),
        _elicitor(None, USER_INFO),
    ),
    "test_elicitation_sep1034_defaults": FixtureTool(
        "Asks the user with a default for every primitive type.",
        NO_ARGUMENTS,
        _elicitor("Please review these values.", DEFAULTS),
    ),
    "test_elicitation_sep1330_enums": FixtureTool(
        "Asks the user with every kind of enum.",
        NO_ARGUMENTS,
        _elicitor("Please choose.", ENUMS),
    ),
    "json_schema_2020_12_tool": FixtureTool(
        "Tool with JSON Schema 2020-12 features", SCHEMA_2020_12, _simple_text
    ),
    "test_reconnection": FixtureTool(
        "Closes its SSE stream before it answers.", NO_ARGUMENTS, _reconnection
    ),
}


async def list_tools(
    ctx: Context, params: types.PaginatedRequestParams | None
) -> types.ListToolsResult:
    tools = [
        types.Tool(name=name, description=t.description, input_schema=t.input_schema)
        for name, t in TOOLS.items()
    ]
    return types.ListToolsResult(tools=tools)


async def call_tool(
    ctx: Context, params: types.CallToolRequestParams
) -> types.CallToolResult:
    tool = TOOLS.get(params.name)
    if tool is None:
        return types.CallToolResult(
            content=[text_block(f"no tool {params.name}")], is_error=True
        )
    content = await tool.run(ctx, dict(params.arguments or {}))
    return types.CallToolResult(content=list(content), is_error=tool.is_error)


# ---- resources -----------------------------------------------------------

STATIC_TEXT = "This is the content of the static text resource."
TEMPLATE = "test://template/{id}/data"
RESOURCES = [
    types.Resource(
        uri="test://static-text",
        name="static-text",
        description="A fixed text resource.",
        mime_type="text/plain",
    ),
    types.Resource(
        uri="test://static-binary",
        name="static-binary",
        description="A fixed PNG image.",
        mime_type="image/png",
    ),
    types.Resource(
        uri="test://watched-resource",
        name="watched-resource",
        description="A resource clients may subscribe to.",
        mime_type="text/plain",
    ),
]


async def list_resources(
    ctx: Context, params: types.PaginatedRequestParams | None
) -> types.ListResourcesResult:
    return types.ListResourcesResult(resources=RESOURCES)


async def list_templates(
    ctx: Context, params: types.PaginatedRequestParams | None
) -> types.ListResourceTemplatesResult:
    template = types.ResourceTemplate(
        uri_template=TEMPLATE,
        name="template-data",
        description="Data for one id.",
        mime_type="application/json",
    )
    return types.ListResourceTemplatesResult(resource_templates=[template])


async def read_resource(
    ctx: Context, params: types.ReadResourceRequestParams
) -> types.ReadResourceResult:
    uri = str(params.uri)
    contents: types.TextResourceContents | types.BlobResourceContents
    if uri == "test://static-binary":
        contents = types.BlobResourceContents(uri=uri, mime_type="image/png", blob=PNG)
    elif uri in ("test://static-text", "test://watched-resource"):
        contents = types.TextResourceContents(
            uri=uri, mime_type="text/plain", text=STATIC_TEXT
        )
    elif uri.startswith("test://template/") and uri.endswith("/data"):
        item = uri.removeprefix("test://template/").removesuffix("/data")
        data = {"id": item, "templateTest": True, "data": f"Data for ID: {item}"}
        contents = types.TextResourceContents(
            uri=uri, mime_type="application/json", text=json.dumps(data)
        )
    else:
        raise ValueError(f"no resource {uri}")
    return types.ReadResourceResult(contents=[contents])


# Subscriptions are acknowledged and kept, but nothing ever changes the
# watched resource, so no update notification is ever sent.
_subscribed: set[str] = set()


async def subscribe(
    ctx: Context, params: types.SubscribeRequestParams
) -> types.EmptyResult:
    _subscribed.add(str(params.uri))
    return types.EmptyResult()


async def unsubscribe(
    ctx: Context, params: types.UnsubscribeRequestParams
) -> types.EmptyResult:
    _subscribed.discard(str(params.uri))
    return types.EmptyResult()


# ---- prompts, completion, logging ----------------------------------------


def _argument(name: str, description: str) -> types.PromptArgument:
    return types.PromptArgument(name=name, description=description, required=True)


PROMPTS = [
    types.Prompt(name="test_simple_prompt", description="A prompt without arguments."),
    types.Prompt(
        name="test_prompt_with_arguments",
        description="A prompt that repeats its two arguments.",
        arguments=[
            _argument("arg1", "First test argument"),
            _argument("arg2", "Second test argument"),
        ],
    ),
    types.Prompt(
        name="test_prompt_with_embedded_resource",
        description="A prompt that embeds a resource.",
        arguments=[_argument("resourceUri", "URI of the resource to embed")],
    ),
    types.Prompt(name="test_prompt_with_image", description="A prompt with an image."),
]


def _user(content: Block) -> types.PromptMessage:
    return types.PromptMessage(role="user", content=content)


async def list_prompts(
    ctx: Context, params: types.PaginatedRequestParams | None
) -> types.ListPromptsResult:
    return types.ListPromptsResult(prompts=PROMPTS)


async def get_prompt(
    ctx: Context, params: types.GetPromptRequestParams
) -> types.GetPromptResult:
    arguments = params.arguments or {}
    if params.name == "test_simple_prompt":
        messages = [_user(text_block("This is a simple prompt for testing."))]
    elif params.name == "test_prompt_with_arguments":
        said = f"arg1='{arguments.get('arg1')}', arg2='{arguments.get('arg2')}'"
        messages = [_user(text_block(f"Prompt with arguments: {said}"))]
    elif params.name == "test_prompt_with_embedded_resource":
        uri = arguments.get("resourceUri", "test://example-resource")
        text = "Embedded resource content for testing."
        messages = [
            _user(embedded_block(uri, "text/plain", text)),
            _user(text_block("Please process the embedded resource above.")),
        ]
    elif params.name == "test_prompt_with_image":
        messages = [
            _user(image_block()),
            _user(text_block("Please analyze the image above.")),
        ]
    else:
        raise ValueError(f"no prompt {params.name}")
    return types.GetPromptResult(messages=messages)


SUGGESTIONS = ["paris", "park", "party"]


async def complete(
    ctx: Context, params: types.CompleteRequestParams
) -> types.CompleteResult:
    typed = params.argument.value
    values = [s for s in SUGGESTIONS if s.startswith(typed)]
    completion = types.Completion(values=values, total=len(values), has_more=False)
    return types.CompleteResult(completion=completion)


# The level is accepted but not applied: the suite checks only the answer,
# and every log message this server sends is at info level anyway.
async def set_level(
    ctx: Context, params: types.SetLevelRequestParams
) -> types.EmptyResult:
    return types.EmptyResult()


# ---- transport -----------------------------------------------------------


class MemoryEventStore(EventStore):
    """Every event of every stream, so that a client can resume any of them.

    Nothing is ever dropped: the fixture lives for one test run.
    """

    def __init__(self) -> None:
        self._events: list[tuple[str, str, types.JSONRPCMessage | None]] = []
        self._ids = itertools.count(1)

    async def store_event(
        self, stream_id: str, message: types.JSONRPCMessage | None
    ) -> str:
        event_id = str(next(self._ids))
        self._events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(
        self, last_event_id: str, send_callback: EventCallback
    ) -> str | None:
        ids = [event_id for event_id, _, _ in self._events]
        if last_event_id not in ids:
            return None
        position = ids.index(last_event_id)
        stream_id = self._events[position][1]
        for event_id, stream, message in self._events[position + 1 :]:
            if stream == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


def build_server() -> Server[Any]:
    return Server(
        "conformance-fixture",
        version="1.0.0",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_list_resource_templates=list_templates,
        on_read_resource=read_resource,
        on_subscribe_resource=subscribe,
        on_unsubscribe_resource=unsubscribe,
        on_list_prompts=list_prompts,
        on_get_prompt=get_prompt,
        on_completion=complete,
        on_set_logging_level=set_level,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int, help="loopback port to serve on")
    args = parser.parse_args()
    app = build_server().streamable_http_app(
        event_store=MemoryEventStore(), retry_interval=RETRY_MILLISECONDS
    )
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
