"""`ChatModel` backend: a client of an OpenAI-compatible chat server (`vllm serve`, `transformers serve`, or any
other), `POST {base_url}/chat/completions`.

A batch becomes concurrent requests, at most `max_in_flight` at once, each with its own timeout and retries
(exponential backoff with full jitter) on connection errors, timeouts, 429 (honouring Retry-After) and 5xx;
any other 4xx fails at once with the server's message. `chat()` is synchronous: the requests run on a private
event loop in a daemon thread owned by the client, so it works from any thread, even one whose own event loop
is running (a Prefect task), and its connections persist across calls.

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
from typing import Any, Callable, Literal, Sequence

import numpy as np

from engine.errors import ChatBackendError, ConfigError
from engine.images import check_rgb_uint8
from engine.models.interfaces import ChatImage, ChatMessage, ChatPart, ChatRequest, ChatVideo

log = logging.getLogger(__name__)

Structured = Literal["response_format", "structured_outputs", "none"]
VideoAs = Literal["frames", "video_url"]
MAX_RETRY_AFTER_S = 300.0  # a server asking for longer than this is treated as asking for this
MAX_BACKOFF_S = 60.0


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


def _server_message(response: Any) -> str:
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # One httpx client with one keep-alive connection per request slot: httpcore's pool rescans every
        # connection for every queued request on each event, so a single pool with 64 requests in flight
        # spent more time on bookkeeping than a 50 ms answer takes (httpx issue #3215).
        self._clients: list[Any] = []
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
        bodies = [json.dumps(self.body(r)).encode() for r in requests]
        future = asyncio.run_coroutine_threadsafe(self._batch(bodies), self._running_loop())
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
        """Close the connection pool and stop the private loop; safe to call twice. A later `chat` restarts
        them."""
        with self._start_lock:
            loop, thread, clients = self._loop, self._thread, self._clients
            self._loop, self._thread, self._clients, self._slots = None, None, [], None
        if loop is None:
            return
        for client in clients:
            asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        loop.close()

    def __enter__(self) -> "HttpChat":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._loop is None or self._pid != os.getpid():
                import httpx

                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="engine-http-chat", daemon=True)
                thread.start()

                async def setup() -> None:
                    headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
                    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
                    ssl_context = httpx.create_ssl_context()  # built once: each takes tens of ms
                    self._clients = [
                        httpx.AsyncClient(headers=headers, limits=limits, timeout=self.timeout_s, verify=ssl_context)
                        for _ in range(self.max_in_flight)
                    ]
                    self._slots = asyncio.Queue()
                    for slot in range(self.max_in_flight):
                        self._slots.put_nowait(slot)

                asyncio.run_coroutine_threadsafe(setup(), loop).result()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
            return self._loop

    async def _batch(self, bodies: list[bytes]) -> list[str]:
        tasks = [asyncio.ensure_future(self._one(body)) for body in bodies]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:  # one request failed for good: the batch fails, stop the others
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _one(self, body: bytes) -> str:
        assert self._slots is not None
        reason = ""
        for attempt in range(self.max_retries + 1):
            delay_s: float | None = None
            slot = await self._slots.get()
            try:
                return await asyncio.wait_for(self._post(self._clients[slot], body), self.timeout_s)
            except _Retry as retry:
                reason, delay_s = str(retry), retry.delay_s
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

    async def _post(self, client: Any, body: bytes) -> str:
        import httpx

        try:
            response = await client.post(self.url, content=body, headers={"Content-Type": "application/json"})
        except httpx.TimeoutException as exc:
            raise _Retry(f"timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:  # refused, reset, DNS, protocol errors
            raise _Retry(f"connection failed ({type(exc).__name__}: {self._redact(str(exc))})") from None
        status = response.status_code
        if status == 429:
            raise _Retry("429 too many requests", _retry_after_s(response.headers.get("Retry-After")))
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
