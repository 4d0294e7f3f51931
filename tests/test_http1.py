"""The small HTTP/1.1 client, against real servers on loopback.

Well-behaved answers come from Starlette on uvicorn; misbehaviour (garbage,
hang-ups, stalls, odd framing) from raw asyncio servers that write bytes by
hand.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import socket
import ssl
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from broker.http1 import HttpError, Pool, SseEvent

JSON = [("Content-Type", "application/json"), ("Accept", "application/json")]
SECRET = "Bearer s3cret-token-value"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RawServer:
    """An asyncio server on loopback whose handler writes the answers by hand."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.arrived = asyncio.Event()
        self.hung_up = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def request(self, reader: asyncio.StreamReader) -> bytes | None:
        """The next request on a connection, recorded; None once the client left."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        self.arrived.set()
        return request

    async def until_hung_up(self, reader: asyncio.StreamReader) -> None:
        """Wait for the client to close this connection, and note that it did."""
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.hung_up.set()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        try:
            await self.handler(self, reader, writer, self.connections)
        except ConnectionError:
            pass
        finally:
            writer.close()


Handler = Callable[
    [RawServer, asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]
]
Serve = Callable[..., Awaitable[RawServer]]


@pytest.fixture
async def raw() -> AsyncIterator[Serve]:
    """A starter of raw servers, each stopped after the test."""
    servers: list[RawServer] = []

    async def start(handler: Handler, tls: ssl.SSLContext | None = None) -> RawServer:
        server = RawServer(handler)
        await server.start(tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


def answering(*answers: bytes, then_close: bool = False) -> Handler:
    """A handler that answers each request on a connection with the next answer."""

    async def handle(
        server: RawServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        number: int,
    ) -> None:
        for answer in answers:
            if await server.request(reader) is None:
                return
            writer.write(answer)
            await writer.drain()
        if not then_close:
            await server.until_hung_up(reader)

    return handle


async def echo(request: Request) -> Response:
    """Echo what arrived; ``stream`` opens an event stream, ``answer`` feeds it."""
    body = await request.body()
    state = request.app.state
    if body == b"answer":
        state.answered.set()
        return Response(status_code=202)
    if body == b"stream":
        return StreamingResponse(events(state.answered), media_type="text/event-stream")
    client = request.client
    return JSONResponse(
        {
            "port": client.port if client else None,
            "headers": [[k.decode(), v.decode()] for k, v in request.headers.raw],
            "body": body.decode(),
        },
        headers={"X-Served-By": "echo"},
    )


async def events(answered: asyncio.Event) -> AsyncIterator[bytes]:
    """A request to the client, then the final answer once the client answered."""
    yield b'event: message\ndata: {"id": 0, "method": "elicit"}\nid: 1\n\n'
    await answered.wait()
    yield b': still here\n\ndata: {"id": 7,\ndata:  "result": {}}\nid: 2\n\n'


@pytest.fixture
async def app_url() -> AsyncIterator[str]:
    """Starlette on uvicorn on a free loopback port, in the test's own loop."""
    app = Starlette(routes=[Route("/mcp", echo, methods=["POST"])])
    app.state.answered = asyncio.Event()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 (uvicorn offers a flag, no event)
        await asyncio.sleep(0.005)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
    server.should_exit = True
    await task
    sock.close()


async def test_post_sends_only_host_length_and_given_headers(app_url: str) -> None:
    """A POST carries Host and Content-Length besides the caller's headers, no more."""
    async with Pool(app_url) as pool:
        response = await pool.post(b'{"a": 1}', JSON, timeout=5)

    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-served-by"] == "echo"
    seen = json.loads(response.body)
    host = app_url.removeprefix("http://").removesuffix("/mcp")
    assert seen["headers"] == [
        ["host", host],
        ["content-length", "8"],
        ["content-type", "application/json"],
        ["accept", "application/json"],
    ]
    assert seen["body"] == '{"a": 1}'


async def test_sequential_posts_reuse_one_connection(app_url: str) -> None:
    """Requests one after another all travel on the same kept-alive connection."""
    async with Pool(app_url) as pool:
        answers = [await pool.post(b"{}", JSON, timeout=5) for _ in range(5)]

    assert len({json.loads(answer.body)["port"] for answer in answers}) == 1


async def test_concurrent_posts_open_at_most_max_connections(raw: Serve) -> None:
    """Concurrent requests share max_connections connections, the rest waiting."""

    async def slow(
        server: RawServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        number: int,
    ) -> None:
        while await server.request(reader) is not None:
            await asyncio.sleep(0.02)
            writer.write(OK)

    server = await raw(slow)
    async with Pool(server.url, max_connections=2) as pool:
        answers = await asyncio.gather(
            *(pool.post(b"{}", JSON, timeout=5) for _ in range(6))
        )

    assert [answer.body for answer in answers] == [b"ok"] * 6
    assert server.connections == 2
    assert len(server.requests) == 6


async def test_waiting_for_a_free_connection_counts_against_timeout(
    raw: Serve,
) -> None:
    """With every connection busy, a request fails when its timeout runs out."""
    server = await raw(answering(b""))
    async with Pool(server.url, max_connections=1) as pool:
        busy = asyncio.create_task(pool.post(b"{}", JSON, timeout=5))
        await server.arrived.wait()
        with pytest.raises(HttpError, match=r"timeout of 0\.05 s"):
            await pool.post(b"{}", JSON, timeout=0.05)
        busy.cancel()
        with pytest.raises(asyncio.CancelledError):
            await busy

    assert server.connections == 1


async def test_idle_connection_the_server_closed_is_replaced(raw: Serve) -> None:
    """A connection closed by the server while idle is not used for the next request."""
    server = await raw(answering(OK, then_close=True))
    async with Pool(server.url) as pool:
        await pool.post(b"{}", JSON, timeout=5)
        await asyncio.sleep(0.01)
        second = await pool.post(b"{}", JSON, timeout=5)

    assert second.body == b"ok"
    assert server.connections == 2


async def test_request_lost_on_an_idle_connection_is_retried_once(raw: Serve) -> None:
    """A reused connection closed before any byte of the answer: sent again, once."""

    async def close_on_second(
        server: RawServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        number: int,
    ) -> None:
        while await server.request(reader) is not None:
            if number == 1 and len(server.requests) == 2:
                return
            writer.write(OK)

    server = await raw(close_on_second)
    async with Pool(server.url) as pool:
        await pool.post(b"first", JSON, timeout=5)
        second = await pool.post(b"second", JSON, timeout=5)

    assert second.body == b"ok"
    assert server.connections == 2
    assert [r.endswith(b"second") for r in server.requests] == [False, True, True]


async def test_no_retry_once_part_of_the_answer_arrived(raw: Serve) -> None:
    """A reused connection that dies mid-answer fails the request; it is not resent."""
    partial = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
    server = await raw(answering(OK, partial, then_close=True))
    async with Pool(server.url) as pool:
        await pool.post(b"{}", JSON, timeout=5)
        with pytest.raises(HttpError, match="closed before the answer was complete"):
            await pool.post(b"{}", JSON, timeout=5)

    assert server.connections == 1
    assert len(server.requests) == 2


async def test_no_retry_on_a_connection_opened_for_the_request(raw: Serve) -> None:
    """A new connection closed without an answer fails the request; it is not resent."""
    server = await raw(answering(b"", then_close=True))
    async with Pool(server.url) as pool:
        with pytest.raises(HttpError, match="closed without answering"):
            await pool.post(b"{}", JSON, timeout=5)

    assert server.connections == 1
    assert len(server.requests) == 1


async def test_connection_close_from_the_server_is_honoured(raw: Serve) -> None:
    """An answer with Connection: close ends that connection's use."""
    close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    server = await raw(answering(close, close))
    async with Pool(server.url) as pool:
        for _ in range(2):
            assert (await pool.post(b"{}", JSON, timeout=5)).body == b"ok"

    assert server.connections == 2


@pytest.mark.parametrize("version", [b"HTTP/1.0", b"HTTP/1.1"])
async def test_body_without_length_ends_at_close(raw: Serve, version: bytes) -> None:
    """An answer with neither length nor chunks is the bytes up to the close."""
    answer = version + b" 200 OK\r\nContent-Type: text/plain\r\n\r\nhello, world"
    server = await raw(answering(answer, then_close=True))
    async with Pool(server.url) as pool:
        first = await pool.post(b"{}", JSON, timeout=5)
        second = await pool.post(b"{}", JSON, timeout=5)

    assert first.body == second.body == b"hello, world"
    assert server.connections == 2


async def test_chunked_body_is_joined_and_connection_kept(raw: Serve) -> None:
    """Chunks arriving apart make one body; trailers stay out of the headers."""
    pieces = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        b"lo\r\n7\r\n, world\r\n",
        b"0\r\nX-Trailer: late\r\n\r\n",
    ]

    async def chunked(
        server: RawServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        number: int,
    ) -> None:
        while await server.request(reader) is not None:
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.005)

    server = await raw(chunked)
    async with Pool(server.url) as pool:
        answers = [await pool.post(b"{}", JSON, timeout=5) for _ in range(2)]

    assert [answer.body for answer in answers] == [b"hello, world"] * 2
    assert "x-trailer" not in answers[0].headers
    assert server.connections == 1


async def test_header_names_are_lower_cased_and_repeats_joined(raw: Serve) -> None:
    """Headers map lower-case names to values, repeated ones joined by a comma."""
    answer = (
        b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nX-Seen: one\r\n"
        b"x-seen: two\r\nMcp-Session-Id: abc\r\n\r\n"
    )
    server = await raw(answering(answer))
    async with Pool(server.url) as pool:
        response = await pool.post(b"{}", JSON, timeout=5)

    assert response.status == 201
    assert dict(response.headers) == {
        "content-length": "0",
        "x-seen": "one, two",
        "mcp-session-id": "abc",
    }
    assert response.body == b""


async def test_interim_answer_is_skipped(raw: Serve) -> None:
    """A 1xx answer before the real one is passed over, headers and all."""
    answer = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK
    server = await raw(answering(answer, OK))
    async with Pool(server.url) as pool:
        first = await pool.post(b"{}", JSON, timeout=5)
        second = await pool.post(b"{}", JSON, timeout=5)

    assert (first.status, first.body, "link" in first.headers) == (200, b"ok", False)
    assert second.body == b"ok"
    assert server.connections == 1


async def test_timeout_names_itself_and_closes_the_connection(raw: Serve) -> None:
    """A late answer fails with the timeout named, and its connection is closed."""

    async def stall_on_second(
        server: RawServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        number: int,
    ) -> None:
        while await server.request(reader) is not None:
            if number == 1 and len(server.requests) == 2:
                writer.write(b"HTTP/1.1 200 OK\r\n")
                await server.until_hung_up(reader)
                return
            writer.write(OK)

    server = await raw(stall_on_second)
    async with Pool(server.url) as pool:
        await pool.post(b"{}", JSON, timeout=5)
        with pytest.raises(HttpError, match=r"within the timeout of 0\.1 s"):
            await pool.post(b"{}", JSON, timeout=0.1)
        await asyncio.wait_for(server.hung_up.wait(), 2)
        third = await pool.post(b"{}", JSON, timeout=5)

    assert third.body == b"ok"
    assert server.connections == 2


@pytest.mark.parametrize(
    "answer",
    [b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n"],
    ids=["garbage", "bad-status"],
)
async def test_malformed_answer_fails_and_closes(raw: Serve, answer: bytes) -> None:
    """Bytes that are not an HTTP answer fail the request and end the connection."""
    server = await raw(answering(answer))
    async with Pool(server.url) as pool:
        with pytest.raises(HttpError, match="malformed answer"):
            await pool.post(b"{}", JSON, timeout=5)
        await asyncio.wait_for(server.hung_up.wait(), 2)


@pytest.mark.parametrize(
    "answer",
    [
        b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial"',
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{"par',
        b"HTTP/1.1 200 OK\r\nContent-Le",
    ],
    ids=["length", "chunked", "head"],
)
async def test_server_dying_mid_answer_fails(raw: Serve, answer: bytes) -> None:
    """A server that closes part-way through its answer fails the request."""
    server = await raw(answering(answer, then_close=True))
    async with Pool(server.url) as pool:
        with pytest.raises(HttpError, match="closed before the answer was complete"):
            await pool.post(b"{}", JSON, timeout=5)


async def test_cancelled_request_closes_its_connection(raw: Serve) -> None:
    """Cancelling a request half-way closes its connection instead of reusing it."""
    sent = asyncio.Event()

    async def half_then_ok(
        server: RawServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        number: int,
    ) -> None:
        await server.request(reader)
        if number == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            sent.set()
            await server.until_hung_up(reader)
            return
        writer.write(OK)

    server = await raw(half_then_ok)
    async with Pool(server.url) as pool:
        task = asyncio.create_task(pool.post(b"{}", JSON, timeout=5))
        await sent.wait()
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.hung_up.wait(), 2)
        again = await pool.post(b"{}", JSON, timeout=5)

    assert again.body == b"ok"
    assert server.connections == 2


async def test_errors_never_show_request_headers(
    raw: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """No failure's message or traceback, nor any log line, holds a header value."""
    caplog.set_level(logging.DEBUG)
    headers = [*JSON, ("Authorization", SECRET)]
    failures: list[HttpError] = []
    for answer in (b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Le", b""):
        server = await raw(answering(answer, then_close=True))
        async with Pool(server.url) as pool:
            with pytest.raises(HttpError) as caught:
                await pool.post(b"{}", headers, timeout=5)
            failures.append(caught.value)
    stalled = await raw(answering())
    async with Pool(stalled.url) as pool:
        with pytest.raises(HttpError) as caught:
            await pool.post(b"{}", headers, timeout=0.05)
        failures.append(caught.value)

    for failure in failures:
        assert SECRET not in "".join(traceback.format_exception(failure))
    assert SECRET not in caplog.text


@pytest.mark.parametrize(
    "header",
    [
        ("Authorization", "Bearer x\r\nX-Injected: 1"),
        ("Authorization", "Bearer x\nX-Injected: 1"),
        ("Host", "elsewhere"),
        ("Content-Length", "0"),
        ("Transfer-Encoding", "chunked"),
        ("Bad Name", "x"),
        ("Authorization", "Bearer caf\u00e9"),
    ],
    ids=["crlf", "lf", "host", "length", "chunked", "name", "non-ascii"],
)
async def test_headers_that_could_split_the_request_are_refused(
    header: tuple[str, str],
) -> None:
    """A header that could forge or contradict framing is refused, value unnamed."""
    async with Pool("http://127.0.0.1:9/mcp") as pool:
        with pytest.raises(ValueError, match=r"^[^\r\n]*$") as caught:
            await pool.post(b"{}", [header], timeout=1)

    assert "Bearer" not in str(caught.value)


async def test_refused_connection_fails() -> None:
    """Nobody listening on the port is an HttpError saying it cannot connect."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with Pool(f"http://127.0.0.1:{port}/mcp") as pool:
        with pytest.raises(HttpError, match="cannot connect"):
            await pool.post(b"{}", JSON, timeout=5)


@pytest.mark.parametrize(
    "url",
    ["ftp://127.0.0.1/mcp", "http:///mcp", "http://user:pw@127.0.0.1/mcp"],
)
def test_only_plain_http_urls_without_credentials(url: str) -> None:
    """A URL that is not http(s), lacks a host or carries credentials is refused."""
    with pytest.raises(ValueError, match="URL"):
        Pool(url)


async def test_closed_pool_refuses_requests(app_url: str) -> None:
    """After aclose, a request fails instead of opening a connection."""
    pool = Pool(app_url)
    await pool.post(b"{}", JSON, timeout=5)
    await pool.aclose()
    with pytest.raises(HttpError, match="closed"):
        await pool.post(b"{}", JSON, timeout=5)


async def test_stream_yields_each_event_before_the_stream_ends(app_url: str) -> None:
    """Events arrive one by one; the caller can post mid-stream and read on."""
    seen: list[SseEvent] = []
    async with Pool(app_url, max_connections=2) as pool:
        response = await pool.stream(b"stream", JSON, timeout=5)
        async for event in response.events():
            seen.append(event)
            if len(seen) == 1:
                answered = await pool.post(b"answer", JSON, timeout=5)
        await response.aclose()
        after = await pool.post(b"{}", JSON, timeout=5)

    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert answered.status == 202
    assert seen == [
        SseEvent("message", '{"id": 0, "method": "elicit"}', "1", None),
        SseEvent("message", '{"id": 7,\n "result": {}}', "2", None),
    ]
    assert after.status == 200


async def test_event_stream_rules(raw: Serve) -> None:
    """Fields, comments, all three line ends and pieces split anywhere parse right."""
    pieces = [
        b"\xef\xbb\xbf: a comment\r\nevent: note\r\nda",
        b"ta: one\r\ndata:two\r",
        b"\n\r\nretry: soon\nid: 7\nretry: 1500\ndata: caf\xc3",
        b"\xa9\n\ndata: three\r\rdata\n\nid: a\0b\ndata: four\n\n",
        b"event: unfinished\ndata: dropped",
    ]

    async def sse(
        server: RawServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        number: int,
    ) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.005)

    server = await raw(sse)
    async with Pool(server.url) as pool:
        response = await pool.stream(b"{}", JSON, timeout=5)
        seen = [event async for event in response.events()]

    assert seen == [
        SseEvent("note", "one\ntwo", None, None),
        SseEvent("message", "caf\u00e9", "7", 1500),
        SseEvent("message", "three", "7", 1500),
        SseEvent("message", "", "7", 1500),
        SseEvent("message", "four", "7", 1500),
    ]


async def test_stream_read_to_its_end_keeps_the_connection(raw: Serve) -> None:
    """A streamed body read to the end returns its connection to the pool."""
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"
    )
    server = await raw(answering(chunked, OK))
    async with Pool(server.url) as pool:
        response = await pool.stream(b"{}", JSON, timeout=5)
        body = await response.read()
        after = await pool.post(b"{}", JSON, timeout=5)

    assert (body, after.body) == (b"abcdef", b"ok")
    assert server.connections == 1


async def test_stream_closed_early_closes_its_connection(raw: Serve) -> None:
    """A stream left before its end is closed, and the next request connects anew."""

    async def one_event_then_wait(
        server: RawServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        number: int,
    ) -> None:
        await server.request(reader)
        if number > 1:
            writer.write(OK)
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n"
        )
        await server.until_hung_up(reader)

    server = await raw(one_event_then_wait)
    async with Pool(server.url, max_connections=1) as pool:
        async with await pool.stream(b"{}", JSON, timeout=5) as response:
            async for event in response.events():
                assert event.data == "1"
                break
        await asyncio.wait_for(server.hung_up.wait(), 2)
        after = await pool.post(b"{}", JSON, timeout=5)

    assert after.body == b"ok"
    assert server.connections == 2


async def test_stream_timeout_bounds_the_whole_body(raw: Serve) -> None:
    """A stream that stalls fails once its timeout has run out, and is closed."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n"
    server = await raw(answering(head))
    async with Pool(server.url) as pool:
        response = await pool.stream(b"{}", JSON, timeout=0.2)
        events = response.events()
        first = await anext(events)
        with pytest.raises(HttpError, match=r"within the timeout of 0\.2 s"):
            await anext(events)
        await asyncio.wait_for(server.hung_up.wait(), 2)

    assert first.data == "1"


def tls_contexts(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a new certificate for 127.0.0.1; a client trusting it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    return server, ssl.create_default_context(cafile=str(cert_file))


async def test_https_uses_the_given_context(raw: Serve, tmp_path: Path) -> None:
    """An https URL speaks TLS with the given context and still keeps connections."""
    server_context, client_context = tls_contexts(tmp_path)
    server = await raw(answering(OK, OK), tls=server_context)
    url = f"https://127.0.0.1:{server.port}/mcp"
    async with Pool(url, ssl_context=client_context) as pool:
        answers = [await pool.post(b"{}", JSON, timeout=5) for _ in range(2)]
    async with Pool(url) as untrusting:
        with pytest.raises(HttpError, match="cannot connect"):
            await untrusting.post(b"{}", JSON, timeout=5)

    assert [answer.body for answer in answers] == [b"ok"] * 2
    assert server.connections == 1
    assert server.requests[0].startswith(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:")
