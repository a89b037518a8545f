"""The batching queue in front of a chat model: concurrent callers' requests coalesce into one backend call,
answers go back to their own caller, one caller's failure stays its own, a backend-wide error fails the whole
call, `max_wait_ms` bounds the wait for partners, and, through the shared runner, two videos in flight share
backend calls.

Threads start together at a barrier; where a test needs several callers queued at once it sets `max_batch`
to their number and a long `max_wait_ms`, so the call goes when the last one joins (a queue that does not
coalesce fails the test after that wait instead of hanging). No assertion depends on how fast the machine is.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import pytest

from agents.analyzer import Analyzer, AnalyzerConfig
from engine.chat import ask_json, ask_text
from engine.config import load_config
from engine.errors import ChatBackendError, ConfigError
from engine.models import factory
from engine.models.chat_queue import ChatQueue, ChatQueueConfig, SettledChat
from engine.models.interfaces import ChatMessage, ChatModel, ChatRequest
from engine.runner import FunctionPass, Outputs, Pipeline, Runner
from engine.stats import Stats
from engine.storage import Dataset
from schemas import WorkItem
from tests import synthetic
from tests.fakes import FakeChat

WAIT_S = 20.0  # how long a test waits for what a working queue does at once
LONG_MS = 10_000.0  # a max_wait_ms no coalescing test should ever reach


def ask(text: str) -> ChatRequest:
    return ChatRequest((ChatMessage.user(text),))


def prompt(request: ChatRequest) -> str:
    """The text of the request's first message (a retry appends the model's answer and a repair prompt)."""
    return " ".join(p for p in request.messages[0].content if isinstance(p, str))


def echo(request: ChatRequest) -> str:
    return f"answer to {prompt(request)}"


def run_callers(n: int, call: Callable[[int], object]) -> list[object]:
    """`call(i)` in n threads started together; each thread's result (or the exception it raised)."""
    barrier = threading.Barrier(n, timeout=WAIT_S)
    results: list[object] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = call(i)
        except Exception as exc:  # the test inspects it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S + LONG_MS / 1000)
    assert not any(t.is_alive() for t in threads), "a caller never got its answer"
    return results


class FakeFailingChat(FakeChat):
    """A scripted chat model that raises `error(requests)` when it returns one: a fault of one request's
    input (ValueError) or of the whole backend (ChatBackendError)."""

    def __init__(self, error: Callable[[list[ChatRequest]], Exception | None]) -> None:
        super().__init__(fn=echo)
        self.error = error

    def chat(self, requests: Sequence[ChatRequest]) -> list[str]:
        self.batches.append(list(requests))
        error = self.error(list(requests))
        if error is not None:
            raise error
        return [echo(r) for r in requests]


class FakeSettledChat(FakeChat):
    """A scripted chat model that reports each request's own failure (as the HTTP client does)."""

    def chat_settled(self, requests: Sequence[ChatRequest]) -> list[str | Exception]:
        self.batches.append(list(requests))
        return [ChatBackendError("400 prompt too long") if "long" in prompt(r) else echo(r) for r in requests]


def test_concurrent_callers_coalesce_and_each_gets_its_own_answers() -> None:
    backend = FakeChat(fn=echo)
    sizes = [1, 2, 3, 2]  # requests per caller: 8 in all
    queue = ChatQueue(backend, ChatQueueConfig(max_batch=sum(sizes), max_wait_ms=LONG_MS))
    assert isinstance(queue, ChatModel) and queue.model_id == "fake/chat"
    results = run_callers(4, lambda i: queue.chat([ask(f"item {i} q{k}") for k in range(sizes[i])]))
    assert results == [[f"answer to item {i} q{k}" for k in range(sizes[i])] for i in range(4)]
    assert backend.batch_sizes == [8]  # one backend call for the four callers
    assert {prompt(r).split(" q")[0] for r in backend.batches[0]} == {f"item {i}" for i in range(4)}
    counts = queue.counts()
    assert (counts.chat_calls, counts.requests, counts.backend_calls) == (4, 8, 1)
    assert counts.calls_per_request == 1 / 8


def test_a_batch_holds_at_most_max_batch_requests_and_never_splits_a_caller() -> None:
    backend = FakeChat(fn=echo)
    queue = ChatQueue(backend, ChatQueueConfig(max_batch=3, max_wait_ms=50))
    results = run_callers(6, lambda i: queue.chat([ask(f"item {i} q{k}") for k in range(2)]))
    assert results == [[f"answer to item {i} q0", f"answer to item {i} q1"] for i in range(6)]
    assert all(size in (2,) for size in backend.batch_sizes)  # two callers of 2 would exceed 3
    for batch in backend.batches:
        assert len({prompt(r).split(" q")[0] for r in batch}) == 1
    assert queue.counts().backend_calls == len(backend.batches) == 6
    big = queue.chat([ask(f"big {k}") for k in range(5)])  # alone larger than max_batch: sent whole
    assert len(big) == 5 and backend.batch_sizes[-1] == 5


def test_one_bad_answer_fails_only_its_request_and_its_retry_goes_alone() -> None:
    """Item 1's model answer is invalid JSON: ask_json asks item 1 again, through the queue, alone; with no
    retries left it fails, and the other items' answers stand."""

    def answer(request: ChatRequest) -> str:
        item = re.search(r"item (\d)", prompt(request)).group(1)
        if item == "1" and len(request.messages) == 1:
            return "not json"
        return json.dumps({"noun": f"thing {item}"})

    from pydantic import BaseModel

    class Noun(BaseModel):
        noun: str

    def first_round_then_no_waiting(request: ChatRequest) -> str:
        queue.configure(ChatQueueConfig(max_batch=3, max_wait_ms=1))  # a retry has no partner to wait for
        return answer(request)

    for retries in (1, 0):
        backend = FakeChat(fn=first_round_then_no_waiting)
        queue = ChatQueue(backend, ChatQueueConfig(max_batch=3, max_wait_ms=LONG_MS))
        results = run_callers(3, lambda i: ask_json(queue, [ask(f"item {i}")], Noun, retries=retries))
        assert backend.batch_sizes[0] == 3  # the first round of all three in one call
        for i in (0, 2):
            assert results[i][0].value == Noun(noun=f"thing {i}")
        if retries:
            assert results[1][0].value == Noun(noun="thing 1") and results[1][0].raw[0] == "not json"
            assert backend.batch_sizes == [3, 1]  # the retry went on its own: nobody waited with it
        else:
            assert not results[1][0].ok and "Invalid JSON" in results[1][0].error
            assert backend.batch_sizes == [3]


def test_a_request_specific_fault_fails_only_its_caller() -> None:
    """The backend refuses the whole call when one request is unusable (a ValueError, as the transformers
    backend raises for an image sent to a text-only model): the queue sends each caller's requests again on
    their own, so only that caller fails."""
    backend = FakeFailingChat(lambda rs: ValueError("cannot take an image") if any("image" in prompt(r) for r in rs)
                              else None)
    queue = ChatQueue(backend, ChatQueueConfig(max_batch=3, max_wait_ms=LONG_MS))
    questions = ["item 0", "item 1 with an image", "item 2"]
    results = run_callers(3, lambda i: ask_text(queue, [ask(questions[i])]))
    assert results[0] == ["answer to item 0"] and results[2] == ["answer to item 2"]
    assert isinstance(results[1], ValueError) and "cannot take an image" in str(results[1])
    assert backend.batch_sizes == [3, 1, 1, 1]  # the call, then each caller alone
    counts = queue.counts()
    assert (counts.backend_calls, counts.isolated) == (4, 1)


def test_a_backend_wide_error_fails_every_request_of_the_call() -> None:
    backend = FakeFailingChat(lambda rs: ChatBackendError("chat server kept failing after 6 attempts"))
    queue = ChatQueue(backend, ChatQueueConfig(max_batch=3, max_wait_ms=LONG_MS))
    results = run_callers(3, lambda i: queue.chat([ask(f"item {i}")]))
    assert all(isinstance(r, ChatBackendError) and "kept failing" in str(r) for r in results)
    assert backend.batch_sizes == [3]  # not sent again caller by caller: the server is down for all


def test_a_backend_that_settles_each_request_fails_only_the_refused_one() -> None:
    backend = FakeSettledChat(fn=echo)
    assert isinstance(backend, SettledChat)
    queue = ChatQueue(backend, ChatQueueConfig(max_batch=4, max_wait_ms=LONG_MS))
    questions = [["item 0"], ["item 1", "item 1 too long"], ["item 2"]]
    results = run_callers(3, lambda i: queue.chat([ask(q) for q in questions[i]]))
    assert results[0] == ["answer to item 0"] and results[2] == ["answer to item 2"]
    assert isinstance(results[1], ChatBackendError) and "400 prompt too long" in str(results[1])
    assert backend.batch_sizes == [4]  # one call; nothing sent again


def test_max_wait_bounds_the_wait_of_a_request_without_partners() -> None:
    backend = FakeChat(fn=echo)
    queue = ChatQueue(backend, ChatQueueConfig(max_batch=64, max_wait_ms=50))
    assert run_callers(1, lambda i: queue.chat([ask("alone")])) == [["answer to alone"]]
    waited = queue.counts().longest_queued_s  # the backend was idle: all of it was waiting for partners
    assert 0.05 <= waited < 0.05 + 5.0  # waited for partners, then went: never far past max_wait_ms
    assert backend.batch_sizes == [1]


def test_requests_that_arrive_while_the_backend_is_busy_go_together_when_it_frees() -> None:
    """An in-process engine runs one call at a time: callers arriving during a call wait in the queue (past
    their max_wait, for the backend, not for partners) and then share one call."""
    busy, release = threading.Event(), threading.Event()

    def slow(request: ChatRequest) -> str:
        if prompt(request) == "first":
            busy.set()
            assert release.wait(WAIT_S)
        return echo(request)

    backend = FakeChat(fn=slow)
    queue = ChatQueue(backend, ChatQueueConfig(max_batch=8, max_wait_ms=1), calls_at_once=1)
    first = threading.Thread(target=lambda: queue.chat([ask("first")]))
    first.start()
    assert busy.wait(WAIT_S)
    later: list[object] = []
    threads = [threading.Thread(target=lambda i=i: later.append(queue.chat([ask(f"later {i}")]))) for i in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + WAIT_S
    while queue.counts().requests < 4 and time.monotonic() < deadline:  # the three have joined the queue
        time.sleep(0.01)
    release.set()
    for thread in [first, *threads]:
        thread.join(WAIT_S)
    assert sorted(later) == [[f"answer to later {i}"] for i in range(3)]
    assert backend.batch_sizes == [1, 3]


@pytest.mark.parametrize("settings", [{"max_batch": 1, "max_wait_ms": LONG_MS}, {"max_batch": 8, "max_wait_ms": 0}])
def test_coalescing_off_sends_each_call_straight_to_the_backend(settings: dict) -> None:
    """Off, a call goes to the backend at once, even while another caller's call is in it."""
    both_inside = threading.Barrier(2, timeout=WAIT_S)

    def meet(request: ChatRequest) -> str:
        both_inside.wait()  # only returns once the two calls are in the backend together
        return echo(request)

    backend = FakeChat(fn=meet)
    queue = ChatQueue(backend, ChatQueueConfig(**settings))
    assert not queue.config.coalesces
    results = run_callers(2, lambda i: queue.chat([ask(f"item {i}")]))
    assert results == [["answer to item 0"], ["answer to item 1"]]
    assert backend.batch_sizes == [1, 1] and queue.counts().backend_calls == 2


def test_settings_validate_with_one_line_errors(tmp_path: Path) -> None:
    from flows import pipelines

    assert ChatQueueConfig.parse({"max_batch": "32"}) == ChatQueueConfig(max_batch=32)
    for bad, message in (
        ({"max_batch": 0}, "max_batch must be a whole number >= 1"),
        ({"max_batch": 2.5}, "max_batch"),
        ({"max_wait_ms": -1}, r"max_wait_ms must be a number in \[0, 60000\]"),
        ({"wait": 5}, "unknown setting pipeline.chat_queue.wait; chat_queue takes: max_batch, max_wait_ms"),
    ):
        with pytest.raises(ConfigError, match=message) as raised:
            ChatQueueConfig.parse(bad)
        assert "\n" not in str(raised.value)
        config = tmp_path / "config.yaml"
        config.write_text("pipeline:\n  chat_queue: " + json.dumps(bad) + "\n")
        with pytest.raises(ConfigError, match="chat_queue"):
            pipelines.load("tiny", str(config))
    config.write_text("pipeline:\n  chat_queue: {max_batch: 16, max_wait_ms: 5}\n")
    loaded = pipelines.load("tiny", str(config))
    assert loaded.section("chat_queue") == {"max_batch": 16, "max_wait_ms": 5}
    assert loaded.hash == pipelines.load("tiny").hash  # how requests are batched changes no output


def test_factory_puts_one_queue_in_front_of_each_loaded_chat_model(monkeypatch) -> None:
    """Roles that share a model share its queue, with the config's settings; a server's client lets calls run
    side by side, an in-process engine one at a time. Loading is faked: this is about the wiring."""
    monkeypatch.setattr(factory, "_LOADED", {})
    monkeypatch.setattr(factory, "_QUEUES", {})
    monkeypatch.setattr(factory, "_load", lambda spec, device, dtype, kind: FakeChat(fn=echo))
    config = load_config("tiny")
    config = config.model_copy(update={"pipeline": {**config.pipeline, "chat_queue": {"max_batch": 4}}})
    built = factory.build(config, {"llm": "chat", "vlm": "chat", "refiner": "chat"})
    assert isinstance(built["llm"], ChatQueue) and built["llm"] is built["vlm"] is built["refiner"]
    assert built["llm"].config == ChatQueueConfig(max_batch=4) and built["llm"].calls_at_once == 1
    assert isinstance(built["llm"].backend, FakeChat)
    assert factory.build(load_config("tiny"), {"llm": "chat"})["llm"] is built["llm"]  # loaded once
    assert built["llm"].config == ChatQueueConfig()  # the later build's settings
    served = config.model_copy(update={"roles": {**config.roles, "llm": config.roles["llm"].model_copy(
        update={"backend": "openai", "model": "served", "options": {"base_url": "http://127.0.0.1:1/v1"}})}})
    assert factory.build(served, {"llm": "chat"})["llm"].calls_at_once is None
    with pytest.raises(ConfigError, match="pipeline.chat_queue.max_wait_ms"):
        factory.build(config.model_copy(update={"pipeline": {"chat_queue": {"max_wait_ms": "soon"}}}), {"llm": "chat"})


# -- through the shared runner --------------------------------------------------------------------------------

NOUNS = {"A red fox jumps over a log.": "fox", "A blue whale swims past a boat.": "whale"}


class AnalyzerStage:
    """A stage that runs the Analyzer on its item's caption and writes the subject it found as a rejection
    row (the runner's cheapest record that carries text back)."""

    name = "analyze"

    def __init__(self, llm: ChatModel, stats: Stats) -> None:
        self.analyzer = Analyzer(llm, AnalyzerConfig(), stats)

    def start(self, ctx) -> FunctionPass:
        def finish(decoded, so_far: Outputs) -> Outputs:
            (result,) = self.analyzer.analyze([ctx.item.caption])
            subject = ",".join(n.noun for n in result.subjects) if result.ok else f"failed: {result.failure}"
            return Outputs(rejections=[ctx.rejection(self.name, "subject_found", subject)])

        return FunctionPass(finish)


def test_two_videos_in_flight_share_backend_calls_through_the_runner(tmp_path: Path) -> None:
    """Two items finish at once in the runner; each one's Analyzer sends its own request, and the queue sends
    both in one backend call (max_batch 2: the call goes when the second joins). Each video gets its own
    subject back."""

    def answer(request: ChatRequest) -> str:
        caption = re.search(r'Caption: """(.*?)"""', prompt(request)).group(1)
        return json.dumps({"nouns": [{"noun": NOUNS[caption], "is_subject": True, "count": 1}]})

    backend = FakeChat(fn=answer)
    queue = ChatQueue(backend, ChatQueueConfig(max_batch=2, max_wait_ms=LONG_MS))
    items = []
    for k, caption in enumerate(NOUNS):
        truth = synthetic.short_video(tmp_path / f"v{k}.mp4", seconds=0.5 + 0.2 * k, fps=10)
        items.append(WorkItem(source=str(truth.path), caption=caption))
    stats = Stats()
    pipeline = Pipeline(name="fake-chat-queue", stages=[AnalyzerStage(queue, stats)], config=load_config("tiny"),
                        models={"llm": queue.model_id})
    outcomes = Runner(pipeline, Dataset(str(tmp_path / "ds")), stats=stats, videos_in_flight=2, prefetch=1).run(items)
    assert [o.status for o in outcomes] == ["done", "done"], [o.detail for o in outcomes]
    assert [o.outputs.rejections[0].detail for o in outcomes] == ["fox", "whale"]  # each video's own answer
    assert backend.batch_sizes == [2]  # the two videos' requests in one backend call
    assert {re.search(r'Caption: """(.*?)"""', prompt(r)).group(1) for r in backend.batches[0]} == set(NOUNS)
    assert stats.counters["analyzer_requests"] == 2


# -- the HTTP client behind a queue: each request's own failure, and its own HTTP/1.1 connections ---------------


def http_chat(base_url: str, **options) -> "HttpChat":
    from engine.models.chat_http import HttpChat

    return HttpChat(model="served", base_url=base_url, api_key_env=None, **{"backoff_s": 0.01, "timeout_s": 5.0,
                                                                            **options})


def test_http_client_behind_the_queue_fails_only_the_refused_request() -> None:
    from tests.scripted_server import ScriptedServer, completion

    def reply(n: int, body: dict):
        text = body["messages"][0]["content"]
        if "too long" in text:
            return 400, {"error": {"message": "prompt is too long"}}, {}, 0.0
        return 200, completion(f"answer to {text}"), {}, 0.0

    with ScriptedServer(reply) as server, http_chat(server.base_url, max_retries=3) as chat:
        assert isinstance(chat, SettledChat)
        queue = ChatQueue(chat, ChatQueueConfig(max_batch=3, max_wait_ms=LONG_MS), calls_at_once=None)
        questions = ["item 0", "item 1 is too long", "item 2"]
        results = run_callers(3, lambda i: queue.chat([ask(questions[i])]))
        unencodable = ChatRequest((ChatMessage.user(object()),))  # type: ignore[arg-type]
        settled = chat.chat_settled([ask("alone"), unencodable])
    assert results[0] == ["answer to item 0"] and results[2] == ["answer to item 2"]
    assert isinstance(results[1], ChatBackendError) and "400 prompt is too long" in str(results[1])
    assert len(server.requests) == 3 + 1  # a 400 is not retried; nothing sent again caller by caller
    assert queue.counts().backend_calls == 1
    assert settled[0] == "answer to alone" and isinstance(settled[1], ValueError)  # unencodable: never sent


class FakeRawServer:
    """A loopback HTTP/1.1 server that answers each request with the next scripted raw bytes, then closes the
    connection where the script says so; it counts the connections it accepted."""

    def __init__(self, script: list[tuple[bytes, bool]]) -> None:
        import socketserver

        self.script = list(script)
        self.connections = 0
        self.closed = threading.Semaphore(0)  # released each time the server closes a connection
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                fake.connections += 1
                while True:
                    head = b""
                    while not head.endswith(b"\r\n\r\n"):
                        line = self.rfile.readline()
                        if not line:
                            return
                        head += line
                    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                    self.rfile.read(length)
                    answer, close = fake.script.pop(0)
                    self.wfile.write(answer)
                    self.wfile.flush()
                    if close:
                        self.connection.close()
                        fake.closed.release()
                        return

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _completion_bytes(text: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()


def test_http_transport_reads_every_framing_and_reopens_closed_connections() -> None:
    """Content-Length, chunks (with an extension and a trailer), an informational 100 first, an answer ended by
    the connection's close, and a kept-alive connection the server closed while idle: all answered with no
    retry (max_retries 0), on one request slot."""
    body = _completion_bytes("chunked")
    script = [
        (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(_completion_bytes("sized")),
                                                               _completion_bytes("sized")), False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x;ext=1\r\n%s\r\n%x\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n"
         % (10, body[:10], len(body) - 10, body[10:]), False),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
         % (len(_completion_bytes("after 100")), _completion_bytes("after 100")), True),  # then closed while idle
        (b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + _completion_bytes("to the end"), True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
         % (len(_completion_bytes("last")), _completion_bytes("last")), True),
    ]
    server = FakeRawServer(script)
    try:
        with http_chat(server.base_url, max_in_flight=1, max_retries=0) as chat:
            answers = [chat.chat([ask(f"q{i}")])[0] for i in range(3)]
            assert server.closed.acquire(timeout=WAIT_S)
            (connection,) = chat._connections
            deadline = time.monotonic() + WAIT_S
            while not connection._reader.at_eof() and time.monotonic() < deadline:  # the client saw the close
                time.sleep(0.01)
            answers += [chat.chat([ask(f"q{i}")])[0] for i in range(3, 5)]
    finally:
        server.close()
    assert answers == ["sized", "chunked", "after 100", "to the end", "last"]
    assert server.connections == 3  # three answers on one kept-alive connection, then one per closing answer


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here (no network)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_http_transport_speaks_tls_and_checks_the_certificate(tmp_path: Path, monkeypatch) -> None:
    import ssl

    from tests.scripted_server import ScriptedServer, completion

    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = ScriptedServer(lambda n, body: (200, completion("over tls"), {}, 0.0))
    server.httpd.socket = context.wrap_socket(server.httpd.socket, server_side=True)
    base_url = server.base_url.replace("http://", "https://")
    with server:
        with http_chat(base_url, max_retries=0) as chat:  # the system's CAs do not know this certificate
            with pytest.raises(ChatBackendError, match="CERTIFICATE_VERIFY_FAILED"):
                chat.chat([ask("hello")])
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted as httpx would trust it
        with http_chat(base_url, max_retries=0) as chat:
            assert chat.chat([ask("hello"), ask("again")]) == ["over tls", "over tls"]
    assert len(server.requests) == 2


def test_http_client_goes_through_a_proxy_the_environment_names(monkeypatch) -> None:
    from engine.models.chat_http import proxy_for
    from tests.scripted_server import ScriptedServer, completion

    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    url = "http://model-host.invalid:8000/v1/chat/completions"
    assert proxy_for(url) is None
    with ScriptedServer(lambda n, body: (200, completion("via the proxy"), {}, 0.0)) as proxy:
        root = proxy.base_url.rsplit("/v1", 1)[0]
        monkeypatch.setenv("HTTP_PROXY", root)
        assert proxy_for(url) == root and proxy_for(url.replace("http:", "https:")) is None
        with http_chat("http://model-host.invalid:8000/v1", max_retries=0) as chat:
            assert chat.chat([ask("hello")]) == ["via the proxy"]  # the host does not resolve: only a proxy helps
        monkeypatch.setenv("NO_PROXY", "model-host.invalid")
        assert proxy_for(url) is None
    assert len(proxy.requests) == 1


def test_http_client_refuses_an_api_key_that_would_break_its_header(monkeypatch) -> None:
    from engine.models.chat_http import HttpChat

    monkeypatch.setenv("ENGINE_TEST_KEY", "sk-secret\r\nX-Injected: 1")
    with pytest.raises(ConfigError, match=r"\$ENGINE_TEST_KEY holds a line break") as raised:
        HttpChat(model="served", base_url="http://127.0.0.1:1/v1", api_key_env="ENGINE_TEST_KEY")
    assert "sk-secret" not in str(raised.value)
