"""Benchmark of the HTTP chat backend's concurrency (not a test).

    python -m benchmarks.chat_http [--delay-ms 50] [--sizes 1 4 16 64] [--repeats 3] [--out benchmarks/out]

A loopback OpenAI-style server (its own process, so its CPU time is not the client's) answers every request
after a fixed delay. For each N, N requests go through `HttpChat` one at a time (max_in_flight=1) and then all
in flight at once (max_in_flight=N); the figure is the concurrent rate over the sequential one, with a target
of at least 0.8 * N (the client adds little to the server's latency). Beside it, two baselines: the same N
requests written by a bare asyncio client on N open connections, which shows what the machine itself allows,
and `HttpChat` through httpx, the path it takes where the environment names a proxy (here the server itself
stands in as the proxy). Best of `repeats` runs each, as the machine may be shared. Writes
benchmarks/out/chat_http.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ANSWER = json.dumps(
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}
).encode()


async def _serve(delay_s: float) -> None:
    """A minimal HTTP/1.1 keep-alive server: every POST gets ANSWER after `delay_s`. Prints its port."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                await asyncio.sleep(delay_s)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(ANSWER)}\r\n\r\n".encode() + ANSWER
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def _timed(chat, n: int) -> float:
    from engine.models.interfaces import ChatMessage, ChatRequest

    requests = [ChatRequest((ChatMessage.user(f"question {i}"),), max_tokens=8) for i in range(n)]
    start = time.perf_counter()
    answers = chat.chat(requests)
    elapsed = time.perf_counter() - start
    assert answers == ["ok"] * n
    return elapsed


async def _bare(port: int, n: int, repeats: int) -> float:
    """Baseline: n requests in flight from a bare asyncio client (no HTTP library), best of `repeats`."""
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}"
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        await reader.readexactly(length)

    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        await asyncio.gather(*(one(r, w) for r, w in connections))
        best = min(best, time.perf_counter() - start)
    for _, writer in connections:
        writer.close()
    return best


@contextmanager
def _through_proxy(proxy: str) -> Iterator[None]:
    """HTTP_PROXY set to `proxy` (and no NO_PROXY) for the clients built in the block."""
    names = ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")
    saved = {name: os.environ.pop(name, None) for name in names}
    os.environ["HTTP_PROXY"] = proxy
    try:
        yield
    finally:
        os.environ.pop("HTTP_PROXY")
        os.environ.update({name: value for name, value in saved.items() if value is not None})


def _best(base_url: str, in_flight: int, n: int, repeats: int) -> float:
    from engine.models.chat_http import HttpChat

    with HttpChat(model="bench", base_url=base_url, api_key_env=None, max_in_flight=in_flight) as chat:
        _timed(chat, in_flight)  # warm-up: connections opened
        return min(_timed(chat, n) for _ in range(repeats))


def run(delay_ms: float, sizes: list[int], repeats: int) -> dict:
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.chat_http", "--serve", "--delay-ms", str(delay_ms)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        base_url = f"http://127.0.0.1:{port}/v1"
        rows = []
        for n in sizes:
            best = {label: _best(base_url, in_flight, n, repeats) for label, in_flight in (("sequential", 1),
                                                                                          ("concurrent", n))}
            ratio = best["sequential"] / best["concurrent"]  # = concurrent rate / sequential rate
            bare_s = asyncio.run(_bare(port, n, repeats))
            with _through_proxy(f"http://127.0.0.1:{port}"):  # a host only the proxy can reach
                httpx_s = _best("http://chat-server.invalid/v1", n, n, repeats)
            rows.append({
                "n": n,
                "sequential_s": round(best["sequential"], 4),
                "concurrent_s": round(best["concurrent"], 4),
                "sequential_rps": round(n / best["sequential"], 1),
                "concurrent_rps": round(n / best["concurrent"], 1),
                "ratio": round(ratio, 2),
                "target": round(0.8 * n, 2),
                "meets_target": ratio >= 0.8 * n,
                "baseline_bare_asyncio_s": round(bare_s, 4),
                "baseline_ratio": round(best["sequential"] / bare_s, 2),
                "httpx_via_proxy_s": round(httpx_s, 4),
                "httpx_via_proxy_ratio": round(best["sequential"] / httpx_s, 2),
            })
            print(f"N={n:3d}  sequential {best['sequential']:.3f} s  in flight {best['concurrent']:.3f} s  "
                  f"ratio {ratio:6.2f}  (target >= {0.8 * n:.1f}; bare asyncio client {bare_s:.3f} s, "
                  f"ratio {best['sequential'] / bare_s:.2f}; through httpx (proxied) {httpx_s:.3f} s, "
                  f"ratio {best['sequential'] / httpx_s:.2f})", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=10)
    return {
        "benchmark": "chat_http",
        "delay_ms": delay_ms,
        "repeats": repeats,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.delay_ms / 1000))
        return
    report = run(args.delay_ms, args.sizes, args.repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chat_http.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'chat_http.json'}")


if __name__ == "__main__":
    main()
