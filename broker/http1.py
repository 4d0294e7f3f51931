"""A small HTTP/1.1 client for posting JSON-RPC to one downstream MCP endpoint.

The general-purpose client spends several hundred microseconds of CPU on each
request, most of the broker's budget for a call. This one does only what
Streamable HTTP needs: ``POST`` to one URL over persistent connections, with
the answer parsed by httptools (the parser uvicorn uses), read whole
(:meth:`Pool.post`) or as it arrives, event by event (:meth:`Pool.stream`).

Every failure to get a complete answer is an :class:`HttpError`: refused,
reset, closed early, malformed, or later than the request's ``timeout``,
which bounds everything from waiting for a free connection to the last byte.
A connection that failed, timed out, was cancelled or was left half-read is
closed, never reused. Request headers carry credentials: no message names
their values, and nothing here logs.

When a request is sent again: once at most, on a newly opened connection,
and only if its first copy went out on a connection that had been idle in the
pool and that connection then failed the write, was reset, or closed before a
single byte of the answer arrived. That is the race with a server closing a
keep-alive connection it considers idle. A server that had begun on the first
copy and then closed without a byte of answer does see the request twice;
that is the accepted cost. An idle connection already known closed is dropped
before use and does not count as an attempt. A request on a connection opened
for it is never sent again, nor is one that got any byte of an answer.

Left out, because downstream MCP servers do not need them: other methods,
redirects, proxies, compression, cookies, HTTP/2 and ``Expect: 100-continue``.
"""

from __future__ import annotations

import asyncio
import codecs
import re
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import SplitResult, urlsplit

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

_READ_SIZE = 65536
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VISIBLE = re.compile(r"[\x21-\x7e]+")
# The pool frames each request itself; a caller's copy would contradict it.
_IMPLICIT = frozenset({"host", "content-length", "transfer-encoding"})
_EOL = re.compile(r"\r\n|\r|\n")


class HttpError(Exception):
    """No complete HTTP answer: refused, reset, closed early, malformed, timed out."""


@dataclass(frozen=True, slots=True)
class Response:
    """A whole answer. Header names are lower-case; repeats are joined by ", "."""

    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One server-sent event, as the WHATWG event-stream rules dispatch it.

    ``id`` and ``retry`` are the stream's last event id and reconnection time
    when the event was dispatched: they carry over from earlier events.
    """

    event: str
    data: str
    id: str | None
    retry: int | None


class _Stale(Exception):
    """An idle connection turned out dead before any byte of the answer."""


class _Closed(ConnectionError):
    """The server closed the connection before sending a single byte."""


class _Exchange:
    """The parser's callbacks for one answer, and what they gathered."""

    __slots__ = (
        "body",
        "done",
        "extra",
        "head_done",
        "headers",
        "keep_alive",
        "origin",
        "parser",
        "received",
        "status",
    )

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.parser = HttpResponseParser(self)
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.received = 0
        self.head_done = False
        self.done = False
        self.keep_alive = False
        self.extra = False

    @property
    def reusable(self) -> bool:
        """Whether the connection is at a clean boundary the server agreed to reuse."""
        return self.done and self.keep_alive and not self.extra

    def on_message_begin(self) -> None:
        # Bytes after the answer belong to nothing we asked for.
        self.extra = self.done

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # a chunked trailer: not part of the head the caller sees
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        known = self.headers.get(key)
        self.headers[key] = text if known is None else f"{known}, {text}"

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.done:
            return
        if 100 <= self.status < 200:
            # An interim answer (103 Early Hints and the like); the real one follows.
            self.headers = {}
            self.head_done = False
            return
        self.done = True
        self.keep_alive = self.parser.should_keep_alive()

    def feed(self, data: bytes) -> None:
        """Parse bytes from the server; malformed ones fail the answer."""
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            raise HttpError(f"{self.origin}: switched protocols unasked") from None
        except HttpParserError as exc:
            if not self.done:
                raise HttpError(f"{self.origin}: malformed answer ({exc})") from exc
            self.extra = True

    def end(self) -> None:
        """The server closed: the end of an unframed body, or a cut-short answer."""
        self.keep_alive = False
        if self.done:
            return
        framed = (
            "content-length" in self.headers
            or "chunked" in self.headers.get("transfer-encoding", "").lower()
        )
        if self.head_done and not framed:
            self.done = True
            return
        raise HttpError(f"{self.origin}: closed before the answer was complete")


class _Connection:
    """One keep-alive connection; ``reused`` once it has served an answer."""

    __slots__ = ("reader", "reused", "writer")

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False

    def usable(self) -> bool:
        return not (self.reader.at_eof() or self.writer.is_closing())

    def abort(self) -> None:
        self.writer.transport.abort()

    async def send(self, request: bytes) -> None:
        self.writer.write(request)
        await self.writer.drain()

    async def pump(self, exchange: _Exchange) -> None:
        """Move what the server sent next into ``exchange``."""
        data = await self.reader.read(_READ_SIZE)
        if data:
            exchange.feed(data)
        elif exchange.received:
            exchange.end()
        else:
            raise _Closed("closed without answering")


class Pool:
    """Keep-alive connections to one endpoint, at most ``max_connections`` open.

    A request waits for a free connection when all are busy; its ``timeout``
    counts the wait. Each streamed response holds its connection until it is
    read to the end or closed, so a caller that posts while reading a stream
    needs room for a second connection.
    """

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 8,
        connect_timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        parts, target = _split(url)
        https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if https else 80)
        self._ssl = (ssl_context or ssl.create_default_context()) if https else None
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._head = f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n".encode()
        self._get = f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n".encode()
        self._connect_timeout = connect_timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._closed = False

    # The pool keeps the deadline itself (ASYNC109) so that running out of it
    # is an HttpError, like every other way of getting no answer.
    async def post(
        self,
        body: bytes,
        headers: Sequence[tuple[str, str]],
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> Response:
        """POST ``body`` with ``headers`` (plus Host and Content-Length), read all.

        A header that could forge or contradict the request's framing is a
        ValueError, raised before anything is sent.
        """
        request = self._request(body, headers)
        try:
            async with asyncio.timeout(timeout), self._slots:
                conn, exchange = await self._begin(request, whole=True)
                self._release(conn, exchange)
        except TimeoutError:
            raise self._timed_out(timeout) from None
        return Response(exchange.status, exchange.headers, b"".join(exchange.body))

    # ASYNC109: the deadline must outlive this call, bounding the reads of the
    # body that come after it.
    async def stream(
        self,
        body: bytes,
        headers: Sequence[tuple[str, str]],
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> StreamedResponse:
        """POST as :meth:`post` does, but return once the head has arrived.

        ``timeout`` still bounds the whole exchange, reading the body included.
        """
        request = self._request(body, headers)
        deadline = asyncio.get_running_loop().time() + timeout
        holding = False
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
                holding = True
                conn, exchange = await self._begin(request, whole=False)
        except BaseException as exc:
            if holding:
                self._slots.release()
            if isinstance(exc, TimeoutError):
                raise self._timed_out(timeout) from None
            raise
        return StreamedResponse(self, conn, exchange, deadline, timeout)

    async def listen(self, headers: Sequence[tuple[str, str]]) -> StreamedResponse:
        """GET the endpoint on a connection of its own, for a stream with no end set.

        The connection is outside ``max_connections`` and is never reused:
        such a stream lasts as long as the server keeps it open. Waiting for
        its head is bounded by the connect timeout.
        """
        request = b"".join((self._get, _header_block(headers), b"\r\n"))
        try:
            async with asyncio.timeout(self._connect_timeout):
                conn = await self._connect()
                exchange = await self._start(conn, request, whole=False)
        except TimeoutError:
            raise self._timed_out(self._connect_timeout) from None
        return StreamedResponse(self, conn, exchange, None, 0.0, slot=False)

    async def aclose(self) -> None:
        """Close the idle connections; busy ones close when their answer ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()
        for conn in idle:
            with suppress(OSError):
                await conn.writer.wait_closed()

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _request(self, body: bytes, headers: Sequence[tuple[str, str]]) -> bytes:
        length = f"Content-Length: {len(body)}\r\n".encode()
        return b"".join((self._head, length, _header_block(headers), b"\r\n", body))

    async def _begin(
        self, request: bytes, *, whole: bool
    ) -> tuple[_Connection, _Exchange]:
        """Send ``request``; read its head, or all of it. Retries a stale idle one."""
        conn = self._idle_connection()
        if conn is not None:
            try:
                return conn, await self._start(conn, request, whole)
            except _Stale:
                pass
        conn = await self._connect()
        return conn, await self._start(conn, request, whole)

    async def _start(self, conn: _Connection, request: bytes, whole: bool) -> _Exchange:
        exchange = _Exchange(self._origin)
        try:
            await conn.send(request)
            while not (exchange.done or (exchange.head_done and not whole)):
                await conn.pump(exchange)
        except OSError as exc:
            conn.abort()
            if conn.reused and not exchange.received:
                raise _Stale from None
            raise HttpError(f"{self._origin}: connection lost ({exc})") from exc
        except BaseException:
            conn.abort()
            raise
        return exchange

    def _idle_connection(self) -> _Connection | None:
        """The most recently used idle connection not known to be dead."""
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn
            conn.abort()
        return None

    async def _connect(self) -> _Connection:
        if self._closed:
            raise HttpError(f"{self._origin}: the pool is closed")
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self._host, self._port, ssl=self._ssl
                )
        except TimeoutError:
            raise HttpError(
                f"{self._origin}: no connection within the connect timeout"
                f" of {self._connect_timeout:g} s"
            ) from None
        except OSError as exc:
            raise HttpError(f"{self._origin}: cannot connect ({exc})") from exc
        return _Connection(reader, writer)

    def _release(self, conn: _Connection, exchange: _Exchange) -> None:
        """Keep the connection for the next request, if it is clean; else close it."""
        if exchange.reusable and not self._closed:
            conn.reused = True
            self._idle.append(conn)
        else:
            conn.abort()

    def _timed_out(self, timeout: float) -> HttpError:
        return HttpError(
            f"{self._origin}: no complete answer within the timeout of {timeout:g} s"
        )


class StreamedResponse:
    """An answer whose head has arrived and whose body is read on demand.

    It holds a connection of the pool until the body has been read to the end
    or :meth:`aclose` is called; only a body read to its end cleanly lets the
    connection serve another request.
    """

    def __init__(
        self,
        pool: Pool,
        conn: _Connection,
        exchange: _Exchange,
        deadline: float | None,
        timeout: float,
        *,
        slot: bool = True,
    ) -> None:
        """``deadline`` None: no end set; ``slot``: it holds one of the pool's."""
        self.status = exchange.status
        self.headers: Mapping[str, str] = exchange.headers
        self._pool = pool
        self._conn: _Connection | None = conn
        self._exchange = exchange
        self._deadline = deadline
        self._timeout = timeout
        self._slot = slot
        if exchange.done:
            self._settle()

    async def read(self) -> bytes:
        """The rest of the body."""
        pieces = []
        while piece := await self._next():
            pieces.append(piece)
        return b"".join(pieces)

    async def events(self) -> AsyncIterator[SseEvent]:
        """The body as server-sent events, each as soon as it is complete."""
        decoder = _SseDecoder()
        while piece := await self._next():
            for event in decoder.feed(piece):
                yield event

    async def aclose(self) -> None:
        """Give the connection back if the body was read to its end; else close it."""
        self._settle()

    async def __aenter__(self) -> StreamedResponse:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._settle()

    async def _next(self) -> bytes:
        """What arrived of the body since the last call, awaited; b"" at its end."""
        exchange = self._exchange
        while not exchange.body and not exchange.done:
            await self._pump()
        piece = b"".join(exchange.body)
        exchange.body.clear()
        if exchange.done:
            self._settle()
        return piece

    async def _pump(self) -> None:
        conn = self._conn
        if conn is None:
            raise HttpError(f"{self._exchange.origin}: the answer was closed unread")
        try:
            async with asyncio.timeout_at(self._deadline):
                await conn.pump(self._exchange)
        except BaseException as exc:
            self._settle()
            if isinstance(exc, TimeoutError):
                raise self._pool._timed_out(self._timeout) from None
            if isinstance(exc, OSError):
                origin = self._exchange.origin
                raise HttpError(f"{origin}: connection lost ({exc})") from exc
            raise

    def _settle(self) -> None:
        """Hand the connection and its slot back to the pool, once."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._slot:
            self._pool._release(conn, self._exchange)
            self._pool._slots.release()
        else:
            conn.abort()


class _SseDecoder:
    """Turns a text/event-stream body, fed in arbitrary pieces, into events."""

    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")("replace")
        self._rest = ""
        self._first = True
        self._after_cr = False
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._retry: int | None = None

    def feed(self, data: bytes) -> list[SseEvent]:
        """The events completed by ``data``; an unfinished one waits for more."""
        text = self._text.decode(data)
        if not text:
            return []  # half a UTF-8 character: nothing to split yet
        if self._first:
            self._first = False
            text = text.removeprefix("\ufeff")
        if self._after_cr:
            text = text.removeprefix("\n")  # the second half of a split CRLF
        self._after_cr = text.endswith("\r")
        lines = _EOL.split(self._rest + text)
        self._rest = lines.pop()
        events: list[SseEvent] = []
        for line in lines:
            self._line(line, events)
        return events

    def _line(self, line: str, events: list[SseEvent]) -> None:
        if not line:
            self._dispatch(events)
            return
        name, colon, value = line.partition(":")
        if not name:
            return  # a comment
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)

    def _dispatch(self, events: list[SseEvent]) -> None:
        if self._data:
            data = "\n".join(self._data)
            event = SseEvent(self._event or "message", data, self._id, self._retry)
            events.append(event)
        self._event = ""
        self._data = []


def _split(url: str) -> tuple[SplitResult, str]:
    """The parts of an endpoint URL and its request target, if it can be sent."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("the URL must be http:// or https:// with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are refused; pass a header")
    target = parts.path or "/"
    if parts.query:
        target = f"{target}?{parts.query}"
    if not (_VISIBLE.fullmatch(target) and _VISIBLE.fullmatch(parts.netloc)):
        raise ValueError("the URL holds spaces, controls or non-ASCII characters")
    return parts, target


def _header_block(headers: Sequence[tuple[str, str]]) -> bytes:
    """The caller's headers as request lines; refuses any that could split them.

    Messages name the header, never its value: values carry credentials.
    """
    lines = []
    for name, value in headers:
        if name.lower() in _IMPLICIT:
            raise ValueError(f"the pool sets {name} itself")
        if not _TOKEN.fullmatch(name):
            raise ValueError("a header name is not an HTTP token")
        if "\r" in value or "\n" in value or "\0" in value:
            raise ValueError(f"the value of {name} holds a line break or NUL")
        lines.append(f"{name}: {value}\r\n")
    try:
        return "".join(lines).encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("a header value is not ASCII") from None
