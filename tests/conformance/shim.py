"""A reverse proxy on loopback that adds a bearer token and changes nothing else.

The MCP conformance suite sends no Authorization header, and the broker
refuses every request without one. This shim sits between them: each request
is passed on to the upstream origin with ``Authorization: Bearer <token>``
set, and everything else as the client sent it, the Host and Origin headers
included (the suite's DNS-rebinding scenario sends hostile ones and expects
the upstream's own check to refuse them). Responses come back as they are,
streamed chunk by chunk, so an SSE stream reaches the client as it is
written; a client that goes away closes the upstream stream too.

Run from the repository:
``SHIM_TOKEN=... python -m tests.conformance.shim PORT UPSTREAM_ORIGIN``.
"""

from __future__ import annotations

import argparse
import os

import anyio
import httpx2
import uvicorn
from starlette.types import Message, Receive, Scope, Send

# Hop-by-hop headers belong to one connection, not to the message; the
# length is set again for the body as it is forwarded.
NOT_FORWARDED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
# The response keeps its length: the body is passed on byte for byte.
NOT_RETURNED = NOT_FORWARDED - {b"content-length"}


class BearerShim:
    """An ASGI app that forwards every HTTP request to ``upstream`` with a token."""

    def __init__(self, upstream: str, token: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.authorization = f"Bearer {token}".encode()
        self.transport = httpx2.AsyncHTTPTransport()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = httpx2.Request(
            scope["method"],
            self._target(scope),
            headers=self._headers(scope),
            content=await _body(receive),
        )
        response = await self.transport.handle_async_request(request)
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_until_disconnect, receive, tasks.cancel_scope)
                await _relay(response, send)
                tasks.cancel_scope.cancel()
        finally:
            await response.aclose()

    def _target(self, scope: Scope) -> str:
        path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        target = self.upstream + path.decode("latin-1")
        return f"{target}?{query.decode('latin-1')}" if query else target

    def _headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        headers = [
            (name, value)
            for name, value in scope["headers"]
            if name.lower() not in NOT_FORWARDED and name.lower() != b"authorization"
        ]
        headers.append((b"authorization", self.authorization))
        return headers


async def _body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _relay(response: httpx2.Response, send: Send) -> None:
    headers = [
        (name, value)
        for name, value in response.headers.raw
        if name.lower() not in NOT_RETURNED
    ]
    start: Message = {
        "type": "http.response.start",
        "status": response.status_code,
        "headers": headers,
    }
    await send(start)
    async for chunk in response.aiter_raw():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _until_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` when the client goes away, so the upstream stream closes."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int, help="loopback port to listen on")
    parser.add_argument(
        "upstream", help="origin to forward to, e.g. http://127.0.0.1:8400"
    )
    args = parser.parse_args()
    shim = BearerShim(args.upstream, os.environ["SHIM_TOKEN"])
    # Without these uvicorn would add its own Server and Date headers to the
    # upstream's.
    uvicorn.run(
        shim,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        lifespan="off",
        server_header=False,
        date_header=False,
    )


if __name__ == "__main__":
    main()
