"""An OpenAI-compatible loopback server whose answers a test scripts: behind the `openai` chat backend it
lets a test run the engine end to end (CLI, flows, export) with model answers it knows."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

Reply = tuple[int, Any, dict[str, str], float]  # status, JSON body (or text), headers, delay before answering


def completion(text: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


class ScriptedServer:
    """An OpenAI-style loopback server in a thread: `reply(n, body)` decides the answer to the n-th request
    (0-based). It records every request's headers and body and the most requests it held at once."""

    def __init__(self, reply: Callable[[int, dict], Reply]) -> None:
        self.reply = reply
        self.requests: list[tuple[dict[str, str], dict]] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    n = len(server.requests)
                    server.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    status, payload, headers, delay_s = server.reply(n, body)
                    time.sleep(delay_s)
                    data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout): nothing to answer
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ScriptedServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()




def scripted_config(path: Path, base_url: str, *, chat_roles: tuple[str, ...], settings: dict | None = None) -> Path:
    """A config file with a `scripted` profile: the bundled tiny profile's vision models (at 128 px) and
    its pipeline settings (merged with `settings`), and every role of `chat_roles` on the server at
    `base_url`."""
    from engine.config import raw_config

    bundled = raw_config()
    tiny = bundled["profiles"]["tiny"]
    profile = {role: spec for role, spec in tiny.items() if isinstance(spec, dict) and spec["backend"] != "transformers"}
    # SAM 2 at 128 px, the box segmenter in float32 (its bfloat16 default is several times slower on a CPU):
    # tracking is most of a tiny run's time
    profile["tracker"] = {**tiny["tracker"], "options": {"image_size": 128}}
    segmenter_size = {"image_size": 128} if tiny["box_segmenter"]["backend"] == "sam2-image" else {}  # HQ-SAM tiny: 128
    profile["box_segmenter"] = {**tiny["box_segmenter"], "options": {"dtype": "float32", **segmenter_size}}
    chat = {"backend": "openai", "model": "scripted", "options": {"base_url": base_url, "max_retries": 0}}
    profile.update({role: chat for role in chat_roles})
    merged = dict(bundled["profile_pipeline"]["tiny"])
    for section, values in (settings or {}).items():
        merged[section] = {**merged.get(section, {}), **values}
    path.write_text(json.dumps({"profiles": {"scripted": profile}, "profile_pipeline": {"scripted": merged}}))
    return path
