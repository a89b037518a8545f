"""`ChatModel` backend: a client of an OpenAI-compatible chat server (`vllm serve`, `transformers serve`, or any
other), `POST {base_url}/chat/completions`.

A batch becomes concurrent requests, at most `max_in_flight` at once, each with its own timeout and retries
(exponential backoff with full jitter) on connection errors, timeouts, 429 (honouring Retry-After) and 5xx;
any other 4xx fails at once with the server's message. `chat()` is synchronous: the requests run on a private
event loop in a daemon thread owned by the client, so it works from any thread, even one whose own event loop
is running (a Prefect task), and its connections persist across calls. `chat_settled()` is the same batch with
each request's own failure returned in its place (the chat queue fails only that request's caller).

Each request slot keeps one keep-alive HTTP/1.1 connection of its own, written and read with asyncio streams:
a request is one write, its answer is read by Content-Length, chunks or the connection's end. httpx's stack
(anyio, httpcore, h11: two sends a request) cost about 1.4 ms of CPU a request, so 64 requests in flight
against a 50 ms server took 140 ms where 55 ms is the machine's floor. Where the environment names a proxy for
the server (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, minus NO_PROXY), requests go through httpx, which speaks to
proxies.

The API key comes from an environment variable; it is sent in the Authorization header only, never logged and
never put in an error message.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence
from urllib.parse import urlsplit
from urllib.request import getproxies_environment, proxy_bypass_environment

import numpy as np

from engine.errors import ChatBackendError, ConfigError
from engine.images import check_rgb_uint8
from engine.models.interfaces import ChatImage, ChatMessage, ChatPart, ChatRequest, ChatVideo

log = logging.getLogger(__name__)

Structured = Literal["response_format", "structured_outputs", "none"]
VideoAs = Literal["frames", "video_url"]
MAX_RETRY_AFTER_S = 300.0  # a server asking for longer than this is treated as asking for this
MAX_BACKOFF_S = 60.0
MAX_HEAD_BYTES = 64 * 1024  # status line and headers of an answer
MAX_BODY_BYTES = 64 * 1024 * 1024  # an answer larger than this is a broken server, not a chat answer


def jpeg_base64(image: np.ndarray, quality: int = 90) -> str:
    """An RGB uint8 image as base64 JPEG text."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(check_rgb_uint8(image)).save(buffer, format="JPEG", quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image_data_url(image: np.ndarray) -> str:
    return f"data:image/jpeg;base64,{jpeg_base64(image)}"


def video_data_url(video: ChatVideo) -> str:
    """vLLM's frames-as-video data URL: every frame's base64 JPEG, joined by commas."""
    if not video.frames:
        raise ValueError("a ChatVideo needs at least one frame")
    return "data:video/jpeg;base64," + ",".join(jpeg_base64(f) for f in video.frames)


def content_parts(messages: Sequence[ChatMessage], part: Callable[[ChatPart], list[dict]]) -> list[dict]:
    """Messages as chat-API dicts: plain-text content as a string, anything else as a list of parts, each
    part turned into dicts by `part` (the wire formats differ only there)."""
    out = []
    for message in messages:
        if all(isinstance(p, str) for p in message.content):
            out.append({"role": message.role, "content": "".join(message.content)})  # type: ignore[arg-type]
            continue
        parts: list[dict] = []
        for item in message.content:
            if isinstance(item, str):
                parts.append({"type": "text", "text": item})
            elif isinstance(item, (ChatImage, ChatVideo)):
                parts.extend(part(item))
            else:
                raise ValueError(f"unknown message part {type(item).__name__}")
        out.append({"role": message.role, "content": parts})
    return out


def openai_messages(messages: Sequence[ChatMessage], *, video_as: VideoAs = "frames") -> list[dict]:
    """Messages in the OpenAI chat format, images (and, with video_as="frames", each video frame) as base64
    JPEG data URLs."""

    def part(item: ChatPart) -> list[dict]:
        if isinstance(item, ChatImage):
            return [{"type": "image_url", "image_url": {"url": image_data_url(item.pixels)}}]
        if video_as == "video_url":
            return [{"type": "video_url", "video_url": {"url": video_data_url(item)}}]
        if not item.frames:
            raise ValueError("a ChatVideo needs at least one frame")
        return [{"type": "image_url", "image_url": {"url": image_data_url(f)}} for f in item.frames]

    return content_parts(messages, part)


def strict_schema(schema: dict) -> dict:
    """A copy of `schema` as OpenAI's strict structured outputs require it: every object closed
    (additionalProperties false) with all its properties required. Answers still validate against the
    original (a field with a default is merely always written); vLLM's grammar closes objects anyway."""

    from engine.chat import map_schema

    def close(out: dict) -> dict:
        if isinstance(out.get("properties"), dict) and out.get("type", "object") == "object":
            out.setdefault("additionalProperties", False)
            out["required"] = list(out["properties"])
        return out

    return map_schema(schema, close)


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds: a number of seconds, or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _server_message(response: "_Response") -> str:
    """The error message a server put in its body ({"error": {"message": ...}}, {"detail": ...} or text)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500]
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return str(error)[:500]
    return json.dumps(body)[:500]


class _Retry(Exception):
    """A transient failure: try again after `delay_s` (None: the backoff's own delay)."""

    def __init__(self, reason: str, delay_s: float | None = None) -> None:
        super().__init__(reason)
        self.delay_s = delay_s


class _BadAnswer(Exception):
    """An answer that does not parse as HTTP/1.1 (a transport fault: retried like a reset connection)."""


@dataclass(frozen=True)
class _Response:
    status: int
    headers: dict[str, str]  # names lowercased
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


@dataclass(frozen=True)
class _Target:
    """Where requests go: host, port, TLS or not, and the request head every request starts with."""

    host: str
    port: int
    tls: bool
    head: bytes  # request line and fixed headers, up to the Content-Length value

    @classmethod
    def of(cls, url: str, api_key: str | None) -> "_Target":
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        host = parts.hostname or ""
        host_header = parts.netloc.rsplit("@", 1)[-1]
        lines = [
            f"POST {parts.path or '/'} HTTP/1.1",
            f"Host: {host_header}",
            "Content-Type: application/json",
            "Accept: application/json",
            "User-Agent: video-data-engine",
        ]
        if api_key:
            lines.append(f"Authorization: Bearer {api_key}")
        return cls(host, port, tls, ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1"))


def proxy_for(url: str) -> str | None:
    """The proxy the environment names for `url` (as httpx and curl read HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and
    NO_PROXY), or None."""
    parts = urlsplit(url)
    proxies = getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or proxy_bypass_environment(parts.netloc.rsplit("@", 1)[-1], proxies):
        return None
    return proxy


class _Connection:
    """One keep-alive HTTP/1.1 connection, opened when first needed and again after the server closed it."""

    def __init__(self, target: _Target, ssl_context: Any) -> None:
        self.target = target
        self.ssl_context = ssl_context
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> _Response:
        try:
            return await self._exchange(body)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, _BadAnswer) as exc:
            self.close()
            raise _Retry(f"connection failed ({type(exc).__name__}: {exc})") from None
        except BaseException:  # a timeout or cancel mid-answer: the rest of it would be read as the next one
            self.close()
            raise

    async def _exchange(self, body: bytes) -> _Response:
        reader, writer = await self._open()
        writer.write(self.target.head + b"%d\r\n\r\n" % len(body) + body)  # one write: one segment to the server
        while True:
            status, version, headers = await _read_head(reader)
            if not 100 <= status < 200:  # an informational answer comes before the real one
                break
        keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if status in (204, 304):
            content = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            content = await _read_chunked(reader)
        elif "content-length" in headers:
            length = _number(headers["content-length"], 10)
            if length > MAX_BODY_BYTES:
                raise _BadAnswer(f"an answer of {length} bytes")
            content = await reader.readexactly(length)
        else:  # delimited by the end of the connection
            content = await _read_to_end(reader)
            keep_alive = False
        if not keep_alive:
            self.close()
        return _Response(status, headers, content)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # A kept-alive connection the server closed while idle (uvicorn's keep-alive timeout) is opened anew.
        if self._writer is None or self._writer.is_closing() or self._reader is None or self._reader.at_eof():
            self.close()
            target = self.target
            self._reader, self._writer = await asyncio.open_connection(
                target.host, target.port, ssl=self.ssl_context if target.tls else None, limit=MAX_HEAD_BYTES
            )
        return self._reader, self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, str, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/1."):
        raise _BadAnswer(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return _number(status_line[1], 10), status_line[0], headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts, size = [], 0
    while True:
        chunk = _number((await reader.readuntil(b"\r\n")).split(b";", 1)[0].decode("latin-1"), 16)
        size += chunk
        if size > MAX_BODY_BYTES:
            raise _BadAnswer(f"an answer of more than {MAX_BODY_BYTES} bytes")
        if chunk == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, up to the empty line
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(chunk))
        if await reader.readexactly(2) != b"\r\n":
            raise _BadAnswer("a chunk not followed by CRLF")


async def _read_to_end(reader: asyncio.StreamReader) -> bytes:
    parts, size = [], 0
    while part := await reader.read(MAX_HEAD_BYTES):
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise _BadAnswer(f"an answer of more than {MAX_BODY_BYTES} bytes")
        parts.append(part)
    return b"".join(parts)


def _number(text: str, base: int) -> int:
    try:
        value = int(text.strip(), base)
    except ValueError:
        raise _BadAnswer(f"not a number: {text[:40]!r}") from None
    if value < 0:
        raise _BadAnswer(f"a negative length: {value}")
    return value


class _ProxiedConnection:
    """A request slot through an httpx client, for a server reached through a proxy."""

    def __init__(self, client: Any, url: str) -> None:
        self.client = client
        self.url = url

    async def post(self, body: bytes) -> _Response:
        import httpx

        try:
            response = await self.client.post(self.url, content=body, headers={"Content-Type": "application/json"})
        except httpx.TimeoutException as exc:
            raise _Retry(f"timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:  # refused, reset, DNS, protocol errors
            raise _Retry(f"connection failed ({type(exc).__name__}: {exc})") from None
        return _Response(response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content)

    def close(self) -> None:
        pass  # the client's own aclose, on the loop


class HttpChat:
    """`ChatModel` over an OpenAI-compatible server; see the module docstring."""

    def __init__(
        self,
        *,
        model: str,
        base_url: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        max_in_flight: int = 16,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        structured: Structured = "response_format",
        video_as: VideoAs = "frames",
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
        if max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if timeout_s <= 0 or backoff_s < 0 or max_retries < 0:
            raise ConfigError(
                f"timeout_s must be > 0, backoff_s and max_retries >= 0; got {timeout_s}, {backoff_s}, {max_retries}"
            )
        if structured not in ("response_format", "structured_outputs", "none"):
            raise ConfigError(f"structured must be response_format, structured_outputs or none, got {structured!r}")
        if video_as not in ("frames", "video_url"):
            raise ConfigError(f"video_as must be frames or video_url, got {video_as!r}")
        self.model_id = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.structured = structured
        self.video_as = video_as
        self.api_key_env = api_key_env
        # Read once; kept out of repr, logs and messages (see _redact).
        self._api_key = os.environ.get(api_key_env) if api_key_env else None
        if self._api_key and ("\r" in self._api_key or "\n" in self._api_key):  # it goes into a header line
            raise ConfigError(f"the API key in ${api_key_env} holds a line break: set it without one")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._connections: list[_Connection | _ProxiedConnection] = []  # one per request slot
        self._clients: list[Any] = []  # the httpx clients behind proxied slots
        self._slots: asyncio.Queue[int] | None = None  # free slots; at most max_in_flight requests hold one
        self._pid = 0  # the process that started the loop: a forked child must start its own
        self._start_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, model: str, *, device: str | None = None, **options: Any) -> "HttpChat":
        """`model` is the name the server serves (its `--served-model-name`, or the path it loaded); options
        are the constructor's. `device` is accepted for the factory: the server owns the device."""
        del device
        return cls(model=model, **options)

    @classmethod
    def tiny(cls, **options: Any) -> "HttpChat":
        raise ConfigError(
            "the openai backend is a client of a model served elsewhere: a tiny-random model means nothing to it; "
            "use backend transformers for tiny models, or serve one and name it here"
        )

    def __repr__(self) -> str:
        return f"HttpChat(model={self.model_id!r}, url={self.url!r}, max_in_flight={self.max_in_flight})"

    # -- ChatModel

    def chat(self, requests: Sequence[ChatRequest]) -> list[str]:
        if not requests:
            return []
        # Encoded here, before any request: bad input fails at once, and the loop thread only does I/O.
        bodies = [self._encode(r) for r in requests]
        future = asyncio.run_coroutine_threadsafe(self._batch(bodies), self._running_loop())
        return future.result()

    def chat_settled(self, requests: Sequence[ChatRequest]) -> list[str | Exception]:
        """Like `chat`, but a request that fails (input it cannot encode, a 4xx, retries used up) has its
        exception in its place and the others still run to their answers."""
        if not requests:
            return []
        bodies: list[bytes | Exception] = []
        for request in requests:
            try:
                bodies.append(self._encode(request))
            except ValueError as exc:
                bodies.append(exc)
        future = asyncio.run_coroutine_threadsafe(self._settled(bodies), self._running_loop())
        return future.result()

    def body(self, request: ChatRequest) -> dict:
        """The JSON body sent for one request."""
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": openai_messages(request.messages, video_as=self.video_as),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if request.json_schema is not None and self.structured == "response_format":
            name = str(request.json_schema.get("title") or "answer")
            name = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:64]
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": name, "schema": strict_schema(request.json_schema), "strict": True},
            }
        elif request.json_schema is not None and self.structured == "structured_outputs":
            body["structured_outputs"] = {"json": request.json_schema}
        return body

    def close(self) -> None:
        """Close the connections and stop the private loop; safe to call twice. A later `chat` restarts
        them."""
        with self._start_lock:
            loop, thread, connections, clients = self._loop, self._thread, self._connections, self._clients
            self._loop, self._thread, self._connections, self._clients, self._slots = None, None, [], [], None
        if loop is None:
            return

        async def shut() -> None:
            for connection in connections:
                connection.close()
            for client in clients:
                await client.aclose()
            await asyncio.sleep(0)  # let the transports finish closing

        asyncio.run_coroutine_threadsafe(shut(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        loop.close()

    def __enter__(self) -> "HttpChat":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals

    def _encode(self, request: ChatRequest) -> bytes:
        # Compact separators: a frame's base64 is most of a body, the rest is small either way.
        return json.dumps(self.body(request), separators=(",", ":")).encode()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="engine-http-chat", daemon=True)
                thread.start()
                asyncio.run_coroutine_threadsafe(self._setup(), loop).result()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
            return self._loop

    async def _setup(self) -> None:
        """The slots and their connections (opened on first use), on the loop."""
        proxy = proxy_for(self.url)
        tls = self.url.startswith("https://")
        ssl_context = None
        if tls or proxy:
            import httpx

            ssl_context = httpx.create_ssl_context()  # httpx's CA choice (SSL_CERT_FILE, then certifi); once
        if proxy:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            self._clients = [
                httpx.AsyncClient(headers=headers, limits=limits, timeout=self.timeout_s, verify=ssl_context)
                for _ in range(self.max_in_flight)
            ]
            self._connections = [_ProxiedConnection(client, self.url) for client in self._clients]
        else:
            target = _Target.of(self.url, self._api_key)
            self._connections = [_Connection(target, ssl_context) for _ in range(self.max_in_flight)]
        self._slots = asyncio.Queue()
        for slot in range(self.max_in_flight):
            self._slots.put_nowait(slot)

    async def _batch(self, bodies: list[bytes]) -> list[str]:
        tasks = [asyncio.ensure_future(self._one(body)) for body in bodies]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:  # one request failed for good: the batch fails, stop the others
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _settled(self, bodies: list[bytes | Exception]) -> list[str | Exception]:
        async def one(body: bytes | Exception) -> str | Exception:
            if isinstance(body, Exception):
                return body
            try:
                return await self._one(body)
            except ChatBackendError as exc:
                return exc

        return list(await asyncio.gather(*(one(body) for body in bodies)))

    async def _one(self, body: bytes) -> str:
        assert self._slots is not None
        reason = ""
        for attempt in range(self.max_retries + 1):
            delay_s: float | None = None
            slot = await self._slots.get()
            try:
                return await asyncio.wait_for(self._post(self._connections[slot], body), self.timeout_s)
            except _Retry as retry:
                reason, delay_s = self._redact(str(retry)), retry.delay_s
            except asyncio.TimeoutError:
                reason = f"no answer within {self.timeout_s} s"
            finally:
                self._slots.put_nowait(slot)
            if attempt == self.max_retries:
                break
            if delay_s is None:  # full jitter: uniform in [0, backoff * 2^attempt]
                delay_s = random.uniform(0, min(MAX_BACKOFF_S, self.backoff_s * 2**attempt))
            log.warning("chat server %s: %s; retry %d/%d in %.2f s", self.url, reason, attempt + 1,
                        self.max_retries, delay_s)
            await asyncio.sleep(delay_s)
        raise ChatBackendError(
            self._redact(f"chat server {self.url} kept failing after {self.max_retries + 1} attempts: {reason}")
        )

    async def _post(self, connection: _Connection | _ProxiedConnection, body: bytes) -> str:
        response = await connection.post(body)
        status = response.status
        if status == 429:
            raise _Retry("429 too many requests", _retry_after_s(response.headers.get("retry-after")))
        if status >= 500:
            raise _Retry(f"{status} {self._redact(_server_message(response))}")
        if status >= 400:
            raise ChatBackendError(
                self._redact(f"chat server {self.url} refused the request: {status} {_server_message(response)}")
            )
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ChatBackendError(
                self._redact(f"chat server {self.url} answered {status} without choices[0].message.content: "
                             f"{response.text[:300]!r}")
            ) from None
        return content or ""

    def _redact(self, text: str) -> str:
        # A server may echo the request's headers in an error: never let the key through.
        return text.replace(self._api_key, "***") if self._api_key else text
