"""The chat-model interface and its backends: transformers in process (a tiny random Qwen2.5-VL, with JSON
constrained by xgrammar), an OpenAI-compatible HTTP client (against scripted loopback servers for faults, and
a real `transformers serve`), vLLM (against a fake `vllm` module: it needs a GPU), `ask_json` over a scripted
fake chat model, and the grounder built on any of them.

Random weights make the models' answers meaningless: these tests check contracts, batching, wiring and
schema validity, never quality."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pytest
from pydantic import BaseModel, field_validator

from agents.grounder import ChatGrounder, parse_indexes
from engine.chat import ask_json, ask_text
from engine.draw import draw_numbered_boxes
from engine.errors import ChatBackendError, ConfigError, MissingWeightsError
from engine.models.chat_http import HttpChat, openai_messages, strict_schema
from engine.models.chat_transformers import TIGHT_BOUND, TransformersChat, tighten_schema
from engine.models.interfaces import (
    ChatImage,
    ChatMessage,
    ChatModel,
    ChatRequest,
    ChatVideo,
    Grounder,
    GroundingAnswer,
)
from engine.stats import Stats
from tests.scripted_server import Reply, ScriptedServer, completion
from tests.synthetic import blocky_scene as scene

H, W = 96, 160
BOXES = [(10.0, 10.0, 60.0, 60.0), (80.0, 20.0, 150.0, 90.0), (100.0, 50.0, 155.0, 95.0)]




def clip(seed: int, n: int = 4) -> ChatVideo:
    return ChatVideo(frames=tuple(scene(seed + i, 64, 80) for i in range(n)), fps=2.0)


def user(*parts: Any, **kwargs: Any) -> ChatRequest:
    return ChatRequest((ChatMessage.user(*parts),), **kwargs)


class Nouns(BaseModel):
    nouns: list[str]
    subject: str


class Inner(BaseModel):
    label: str
    count: int


class Mixed(BaseModel):
    present: bool
    n: int
    inner: Inner
    score: float
    tags: list[str]


def mixed_requests(seed: int, max_tokens: int = 512) -> list[ChatRequest]:
    """Text, image, video and image + video requests, for one batch."""
    return [
        user("List the nouns of: the dog chases a red ball.", max_tokens=max_tokens),
        user(ChatImage(scene(seed)), "List the nouns in this image.", max_tokens=max_tokens),
        user(clip(seed), "List the nouns in this video.", max_tokens=max_tokens),
        user(ChatImage(scene(seed + 1)), clip(seed + 2), "Is there a dog?", max_tokens=max_tokens),
    ]


# ---------------------------------------------------------------- transformers backend, tiny model


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny model's ops are too small to share among threads; on a busy machine two torch threads that
    spin-wait for each other made these tests ten times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_chat() -> TransformersChat:
    return TransformersChat.tiny(seed=0, max_string_length=24)


class CountingGenerate:
    """Wraps model.generate and keeps each call's batch size."""

    def __init__(self, model: Any) -> None:
        self.model, self.inner, self.batches = model, model.generate, []

    def __enter__(self) -> "CountingGenerate":
        def generate(**kwargs: Any) -> Any:
            self.batches.append(int(kwargs["input_ids"].shape[0]))
            return self.inner(**kwargs)

        self.model.generate = generate
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model.generate  # the instance attribute: back to the class's method


@pytest.mark.integration
def test_tiny_chat_answers_text_image_and_video_in_one_batch(tiny_chat) -> None:
    assert isinstance(tiny_chat, ChatModel) and tiny_chat.model_id == "tiny-random/qwen2.5-vl"
    requests = mixed_requests(0, max_tokens=24) + [  # a random model never stops on its own
        ChatRequest(
            (ChatMessage("system", ("You are a helpful assistant.",)), ChatMessage.user("hello"),
             ChatMessage.assistant("yes"), ChatMessage.user(ChatImage(scene(3)), "and this?")),
            max_tokens=6,
        )
    ]
    with CountingGenerate(tiny_chat.model) as counting:
        answers = tiny_chat.chat(requests)
    assert counting.batches == [5]  # one generate for the whole batch
    assert len(answers) == 5 and all(isinstance(a, str) for a in answers)
    assert len(tiny_chat.tokenizer(answers[4], add_special_tokens=False)["input_ids"]) <= 6
    # Left padding: batched answers equal one-request calls (rows of different lengths and kinds).
    assert [tiny_chat.chat([r])[0] for r in requests] == answers
    assert tiny_chat.chat([]) == []


@pytest.mark.integration
def test_tiny_chat_splits_batches_and_groups_constrained_rows() -> None:
    chat = TransformersChat.tiny(seed=1, batch_size=2, max_new_tokens=8, max_string_length=8)
    free = [user(f"hello {i}") for i in range(3)]
    constrained = [user("nouns?", json_schema=Nouns.model_json_schema()) for _ in range(2)]
    with CountingGenerate(chat.model) as counting:
        answers = chat.chat([free[0], constrained[0], free[1], constrained[1], free[2]])
    assert sorted(counting.batches) == [1, 2, 2]  # free rows: 2 + 1; constrained rows: 2
    assert len(answers) == 5
    with pytest.raises(ValueError, match="batch_size"):
        TransformersChat.tiny(batch_size=0)


@pytest.mark.integration
@pytest.mark.parametrize("seed", range(10))
def test_tiny_chat_json_is_schema_valid_on_every_seed(seed: int) -> None:
    chat = TransformersChat.tiny(seed=seed, max_string_length=24)
    stats = Stats()
    requests = mixed_requests(seed)
    nouns = ask_json(chat, requests, Nouns, retries=0, stats=stats, agent="analyzer")
    mixed = ask_json(chat, requests, Mixed, retries=0, stats=stats, agent="checker")
    for answer in nouns + mixed:
        assert answer.ok, (answer.raw, answer.error)
        assert len(answer.value.model_dump_json()) > 10
    assert stats.counters["analyzer_invalid_json"] == stats.counters["checker_invalid_json"] == 0
    assert stats.counters["analyzer_backend_calls"] == 1 and stats.counters["analyzer_requests"] == 4


@pytest.mark.integration
def test_tiny_chat_rows_with_different_schemas_share_one_generate(tiny_chat) -> None:
    schemas = [Nouns, Mixed, Nouns, Mixed]
    requests = [
        ChatRequest(r.messages, json_schema=schema.model_json_schema())
        for r, schema in zip(mixed_requests(5), schemas)
    ]
    with CountingGenerate(tiny_chat.model) as counting:
        answers = tiny_chat.chat(requests)
    assert counting.batches == [4]  # one grammar matcher per row
    for answer, schema in zip(answers, schemas):
        schema.model_validate_json(answer)


def test_tighten_schema_bounds_every_open_value_and_keeps_the_rest() -> None:
    class Item(BaseModel):
        name: str
        code: str = "x"
        kind: str | None = None

    class Doc(BaseModel):
        items: list[Item]
        word: str
        short: list[int]
        weight: float
        positive: int

    schema = Doc.model_json_schema()
    schema["properties"]["code_like"] = {"type": "string", "pattern": "^[a-z]+$"}
    schema["properties"]["short"]["maxItems"] = 2
    schema["properties"]["positive"]["minimum"] = 1
    schema["properties"]["long"] = {"type": "string", "minLength": 40}
    schema["properties"]["essay"] = {"type": "string", "maxLength": 2000}
    before = json.dumps(schema, sort_keys=True)
    tight = tighten_schema(schema, max_string_length=12, max_items=3)
    assert json.dumps(schema, sort_keys=True) == before  # the input is not modified
    props = tight["properties"]
    assert props["word"]["maxLength"] == 12
    assert props["long"]["maxLength"] == 40  # never below minLength
    assert props["essay"]["maxLength"] == 12  # an agent's own generous bound is tightened too
    assert "maxLength" not in props["code_like"]  # a pattern bounds it already
    assert props["items"]["maxItems"] == 3 and props["short"]["maxItems"] == 2
    assert props["short"]["items"] == {"type": "integer", "minimum": -TIGHT_BOUND, "maximum": TIGHT_BOUND}
    assert props["weight"]["type"] == "integer"  # an integer is a valid JSON number
    assert props["positive"]["minimum"] == 1 and props["positive"]["maximum"] == TIGHT_BOUND
    item = tight["$defs"]["Item"]["properties"]
    assert item["name"]["maxLength"] == 12 and item["code"]["maxLength"] == 12
    assert {"type": "string", "maxLength": 12} in item["kind"]["anyOf"]  # Optional[str]


@pytest.mark.integration
def test_tiny_chat_without_tightening_keeps_the_schema_as_given() -> None:
    chat = TransformersChat.tiny(seed=0, max_new_tokens=16)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    answer = chat.chat([user("ok?", json_schema=schema)])[0]
    assert json.loads(answer) in ({"ok": True}, {"ok": False})
    assert list(chat._grammars) == [json.dumps(schema, sort_keys=True)]  # compiled once, untouched


@pytest.mark.integration
def test_tiny_chat_from_pretrained_local_folder(tiny_chat, tmp_path) -> None:
    tiny_chat.model.save_pretrained(tmp_path)
    tiny_chat.processor.save_pretrained(tmp_path)
    loaded = TransformersChat.from_pretrained(str(tmp_path), device="cpu", max_new_tokens=8)
    assert loaded.is_vlm and loaded.model_id == str(tmp_path)
    requests = [user(ChatImage(scene(1)), "the dog", max_tokens=8), user("hello", max_tokens=8)]
    assert loaded.chat(requests) == tiny_chat.chat(requests)
    with pytest.raises(MissingWeightsError, match="no folder"):
        TransformersChat.from_pretrained(str(tmp_path / "absent"))


@pytest.mark.integration
def test_text_only_model_loads_as_causal_lm_and_refuses_images(tmp_path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from engine.models.tiny_vlm import CHAT_TEMPLATE, build_tiny_qwen2_5_vl

    _, processor = build_tiny_qwen2_5_vl()
    tokenizer = processor.tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    chat = TransformersChat.from_pretrained(str(tmp_path), device="cpu", max_new_tokens=160, max_string_length=6)
    assert not chat.is_vlm
    assert len(chat.chat([user("hello"), user("the dog and the cat")])) == 2
    assert ask_json(chat, [user("nouns?")], Nouns, retries=0)[0].ok
    with pytest.raises(ValueError, match="text-only"):
        chat.chat([user(ChatImage(scene(0)), "what is this?")])


# ---------------------------------------------------------------- ask_json over a scripted fake chat model


class FakeChatScript:
    """A scripted chat model: answer i of each request comes from `answers(request, attempt)`; keeps every
    batch it was sent."""

    model_id = "fake/scripted-chat"

    def __init__(self, answers: Callable[[ChatRequest, int], str]) -> None:
        self.answers = answers
        self.batches: list[list[ChatRequest]] = []

    def chat(self, requests: Sequence[ChatRequest]) -> list[str]:
        self.batches.append(list(requests))
        return [self.answers(r, (len(r.messages) - 1) // 2) for r in requests]  # attempt = repairs so far


class NonEmptyNouns(Nouns):
    @field_validator("nouns")
    @classmethod
    def not_empty(cls, nouns: list[str]) -> list[str]:
        if not nouns:
            raise ValueError("list at least one noun")
        return nouns


def test_ask_json_valid_answer_first_time() -> None:
    fake, stats = FakeChatScript(lambda r, a: '{"nouns": ["dog"], "subject": "dog"}'), Stats()
    [answer] = ask_json(fake, [user("caption")], Nouns, stats=stats, agent="analyzer")
    assert answer.ok and answer.value == Nouns(nouns=["dog"], subject="dog") and answer.raw == [answer.raw[0]]
    assert fake.batches[0][0].json_schema == Nouns.model_json_schema()  # the backend is asked to constrain
    assert stats.counters == {"analyzer_requests": 1, "analyzer_backend_calls": 1, "analyzer_invalid_json": 0}


def test_ask_json_repairs_invalid_json_and_shows_the_error() -> None:
    script = ['{"nouns": ["dog"], "subject": ', '```json\n{"nouns": ["dog"], "subject": "dog"}\n```']
    fake, stats = FakeChatScript(lambda r, a: script[a]), Stats()
    [answer] = ask_json(fake, [user("caption")], Nouns, stats=stats, agent="analyzer")
    assert answer.ok and answer.raw == script and answer.error is None
    retry = fake.batches[1][0]
    assert retry.messages[1] == ChatMessage.assistant(script[0])  # the bad answer, then the repair prompt
    repair = retry.messages[2].content[0]
    assert "not valid" in repair and "EOF" in repair and '"subject"' in repair  # the error and the schema
    assert stats.counters["analyzer_retried_requests"] == 1 and stats.counters["analyzer_invalid_json"] == 0


def test_ask_json_retries_wrong_types_and_empty_lists_per_request() -> None:
    def answers(request: ChatRequest, attempt: int) -> str:
        first = request.messages[0].content[0]
        if attempt or first == "fine":
            return '{"nouns": ["ball"], "subject": "ball"}'
        return '{"nouns": "dog", "subject": 3}' if first == "types" else '{"nouns": [], "subject": "dog"}'

    fake = FakeChatScript(answers)
    typed, empty, fine = ask_json(fake, [user("types"), user("empty"), user("fine")], NonEmptyNouns)
    assert typed.ok and empty.ok and fine.ok
    assert len(typed.raw) == len(empty.raw) == 2 and len(fine.raw) == 1
    assert [len(b) for b in fake.batches] == [3, 2]  # only the invalid ones are asked again, together
    repairs = [r.messages[-1].content[0] for r in fake.batches[1]]
    assert "nouns: Input should be a valid array" in repairs[0]
    assert "subject: Input should be a valid string" in repairs[0]
    assert "list at least one noun" in repairs[1]


def test_ask_json_off_topic_answer_fails_and_keeps_every_raw_answer() -> None:
    fake, stats = FakeChatScript(lambda r, a: f"I would rather talk about turtles ({a})."), Stats()
    [answer] = ask_json(fake, [user("caption")], Nouns, retries=2, stats=stats, agent="analyzer")
    assert not answer.ok and answer.value is None and answer.error
    assert answer.raw == [f"I would rather talk about turtles ({a})." for a in range(3)]
    assert stats.counters == {
        "analyzer_requests": 3, "analyzer_backend_calls": 3, "analyzer_retried_requests": 2,
        "analyzer_retried_backend_calls": 2, "analyzer_invalid_json": 1,
    }
    with pytest.raises(ValueError, match="retries"):
        ask_json(fake, [user("x")], Nouns, retries=-1)
    assert ask_text(fake, []) == [] and ask_json(fake, [], Nouns) == []


# ---------------------------------------------------------------- HTTP backend: a scripted loopback server


def ok(n: int, body: dict) -> Reply:
    return 200, completion(f"answer {n}"), {}, 0.0


def http_chat(base_url: str, **options: Any) -> HttpChat:
    options = {"max_retries": 2, "backoff_s": 0.01, "timeout_s": 5.0, **options}
    return HttpChat.from_pretrained("served-model", base_url=base_url, **options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_batch_answers_in_order_and_builds_openai_bodies() -> None:
    with ScriptedServer(lambda n, body: (200, completion(body["messages"][-1]["content"][-1]["text"]), {}, 0.0)) \
            as server, http_chat(server.base_url, max_in_flight=9) as chat:
        assert isinstance(chat, ChatModel)
        schema = Nouns.model_json_schema()
        answers = chat.chat([
            user(ChatImage(scene(0)), f"question {i}", json_schema=schema if i == 0 else None, max_tokens=7)
            for i in range(5)
        ])
        assert answers == [f"question {i}" for i in range(5)]
        connections = list(chat._connections)
        chat.chat([user(ChatImage(scene(0)), "again")])
        assert len(connections) == 9 and all(a is b for a, b in zip(chat._connections, connections))  # they persist
    body = next(b for _, b in server.requests if b["messages"][0]["content"][-1]["text"] == "question 0")
    assert body["model"] == "served-model" and body["max_tokens"] == 7 and body["temperature"] == 0.0
    sent = body["response_format"]["json_schema"]
    assert body["response_format"]["type"] == "json_schema" and sent["name"] == "Nouns" and sent["strict"] is True
    assert sent["schema"] == {**schema, "additionalProperties": False}  # OpenAI's strict mode wants it closed
    image_part = body["messages"][0]["content"][0]
    assert image_part["type"] == "image_url"
    prefix, data = image_part["image_url"]["url"].split(",", 1)
    assert prefix == "data:image/jpeg;base64"
    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(data))).size == (W, H)
    other = next(b for _, b in server.requests if b["messages"][0]["content"][-1]["text"] == "question 1")
    assert "response_format" not in other


def test_http_message_and_structured_output_variants() -> None:
    video = clip(0, n=3)
    frames = openai_messages([ChatMessage.user("look", video)])[0]["content"]
    assert [p["type"] for p in frames] == ["text", "image_url", "image_url", "image_url"]
    as_video = openai_messages([ChatMessage.user(video)], video_as="video_url")[0]["content"][0]
    url = as_video["video_url"]["url"]
    assert as_video["type"] == "video_url" and url.startswith("data:video/jpeg;base64,")
    assert len(url.split(",")) == 1 + 3  # vLLM's format: one base64 JPEG per frame, comma-separated
    assert openai_messages([ChatMessage.assistant("plain")]) == [{"role": "assistant", "content": "plain"}]
    request = user("nouns?", json_schema={"type": "object"})
    body = http_chat("http://127.0.0.1:1/v1", structured="structured_outputs").body(request)
    assert body["structured_outputs"] == {"json": {"type": "object"}} and "response_format" not in body
    body = http_chat("http://127.0.0.1:1/v1", structured="none").body(request)
    assert "structured_outputs" not in body and "response_format" not in body
    for bad in ({"structured": "guided_json"}, {"video_as": "mp4"}, {"max_in_flight": 0}, {"base_url": "localhost"}):
        with pytest.raises(ConfigError):
            http_chat(**{"base_url": "http://127.0.0.1:1/v1", **bad})
    with pytest.raises(ConfigError, match="tiny"):
        HttpChat.tiny(device="cpu")


def test_strict_schema_closes_every_object_and_requires_every_property() -> None:
    class Item(BaseModel):
        name: str
        note: str = ""

    class Doc(BaseModel):
        items: list[Item]
        extra: Item | None = None

    schema = Doc.model_json_schema()
    strict = strict_schema(schema)
    assert "additionalProperties" not in schema  # the input is not modified
    assert strict["additionalProperties"] is False and strict["required"] == ["items", "extra"]
    item = strict["$defs"]["Item"]
    assert item["additionalProperties"] is False and item["required"] == ["name", "note"]
    assert Doc.model_validate_json('{"items": [{"name": "a", "note": ""}], "extra": null}')  # still valid


def test_http_refused_connection_is_retried_then_fails() -> None:
    chat = http_chat(f"http://127.0.0.1:{free_port()}/v1", max_retries=2)
    start = time.perf_counter()
    with pytest.raises(ChatBackendError, match=r"after 3 attempts: connection failed \(ConnectionRefusedError"):
        chat.chat([user("hello")])
    assert time.perf_counter() - start < 5
    chat.close()
    chat.close()  # twice is fine


def test_http_server_error_then_success() -> None:
    replies = [(500, {"error": {"message": "overloaded"}}, {}, 0.0), (200, completion("fine"), {}, 0.0)]
    with ScriptedServer(lambda n, body: replies[n]) as server, http_chat(server.base_url) as chat:
        assert chat.chat([user("hello")]) == ["fine"]
    assert len(server.requests) == 2


def test_http_429_waits_for_retry_after() -> None:
    replies = [(429, {"error": "slow down"}, {"Retry-After": "1"}, 0.0), (200, completion("fine"), {}, 0.0)]
    with ScriptedServer(lambda n, body: replies[n]) as server, http_chat(server.base_url, backoff_s=0.0) as chat:
        start = time.perf_counter()
        assert chat.chat([user("hello")]) == ["fine"]
        assert time.perf_counter() - start >= 0.95  # the server's delay, not the (zero) backoff
    assert len(server.requests) == 2


def test_http_slow_answer_hits_the_timeout() -> None:
    with ScriptedServer(lambda n, body: (200, completion("late"), {}, 2.0)) as server, \
            http_chat(server.base_url, timeout_s=0.2, max_retries=1) as chat:
        start = time.perf_counter()
        with pytest.raises(ChatBackendError, match="after 2 attempts: (timed out|no answer)"):
            chat.chat([user("hello")])
        assert time.perf_counter() - start < 1.5
    assert len(server.requests) == 2


def test_http_client_error_is_not_retried_and_carries_the_server_message() -> None:
    reply = (400, {"error": {"message": "max_tokens is too large"}}, {}, 0.0)
    with ScriptedServer(lambda n, body: reply) as server, http_chat(server.base_url, max_retries=5) as chat:
        with pytest.raises(ChatBackendError, match="400 max_tokens is too large"):
            chat.chat([user("hello")])
    assert len(server.requests) == 1


def test_http_api_key_is_sent_but_never_shown(monkeypatch, caplog) -> None:
    secret = "sk-test-5ecret-4b1d"
    monkeypatch.setenv("ENGINE_TEST_KEY", secret)

    def echo(n: int, body: dict) -> Reply:  # a careless server that echoes the request's headers back
        headers = server.requests[n][0]
        return (500 if n < 2 else 403), {"error": {"message": f"bad auth {headers['authorization']}"}}, {}, 0.0

    caplog.set_level(logging.DEBUG)
    with ScriptedServer(echo) as server, http_chat(server.base_url, api_key_env="ENGINE_TEST_KEY") as chat:
        with pytest.raises(ChatBackendError) as raised:
            chat.chat([user("hello")])
        assert secret not in repr(chat)
    assert [h["authorization"] for h, _ in server.requests] == [f"Bearer {secret}"] * 3
    assert "403 bad auth Bearer ***" in str(raised.value)
    shown = [str(raised.value), repr(raised.value)] + [r.getMessage() for r in caplog.records]
    assert not [text for text in shown if secret in text]
    assert any("500 bad auth Bearer ***" in r.getMessage() for r in caplog.records)  # retries are logged
    monkeypatch.delenv("ENGINE_TEST_KEY")
    with ScriptedServer(ok) as server, http_chat(server.base_url, api_key_env="ENGINE_TEST_KEY") as chat:
        chat.chat([user("hello")])
    assert "authorization" not in server.requests[0][0]  # no key: no header (a local server)


def test_http_max_in_flight_bounds_concurrent_requests() -> None:
    with ScriptedServer(lambda n, body: (200, completion(str(n)), {}, 0.05)) as server, \
            http_chat(server.base_url, max_in_flight=3) as chat:
        assert len(chat.chat([user(f"q{i}") for i in range(12)])) == 12
    assert server.max_in_flight == 3


def test_http_chat_works_inside_a_running_event_loop() -> None:
    with ScriptedServer(ok) as server, http_chat(server.base_url) as chat:

        async def task() -> list[str]:  # e.g. a Prefect task: synchronous code under a running loop
            return chat.chat([user("hello"), user("again")])

        assert sorted(asyncio.run(task())) == ["answer 0", "answer 1"]
        results: list[list[str]] = []
        threads = [threading.Thread(target=lambda: results.append(chat.chat([user("x")]))) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(results) == 4


# ---------------------------------------------------------------- HTTP backend: a real `transformers serve`


@pytest.fixture(scope="module")
def served_tiny(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """`transformers serve` on loopback, serving the tiny model saved with save_pretrained: (base URL, the
    model's name there, which is its folder)."""
    for module in ("fastapi", "uvicorn", "openai"):
        pytest.importorskip(module, reason="transformers serve needs the test extra (transformers[serving])")
    from engine.models.tiny_vlm import build_tiny_qwen2_5_vl

    folder = tmp_path_factory.mktemp("tiny-vlm")
    model, processor = build_tiny_qwen2_5_vl(seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    port = free_port()
    cli = Path(sys.executable).parent / "transformers"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    log = (folder / "serve.log").open("wb")
    server = subprocess.Popen(
        [str(cli), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        import httpx

        deadline = time.monotonic() + 180  # generous: a cold start on a busy machine
        while True:
            if server.poll() is not None:
                pytest.fail(f"transformers serve exited with {server.returncode}: "
                            f"{(folder / 'serve.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("transformers serve did not start within 180 s")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/v1", str(folder)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.mark.integration
def test_http_chat_against_transformers_serve(served_tiny) -> None:
    base_url, model = served_tiny
    with HttpChat.from_pretrained(model, base_url=base_url, structured="none", max_in_flight=4) as chat:
        requests = [
            user("hello", max_tokens=8),
            user(ChatImage(scene(0)), "what is this?", max_tokens=8),
            user(clip(0, n=2), "what happens?", max_tokens=8),  # frames as images
        ]
        answers = chat.chat(requests)
        assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
        grounder = ChatGrounder(chat)
        for answer in grounder.ground(scene(1), BOXES, ["the dog", "the red ball"]):
            assert answer.indexes == parse_indexes(answer.text, len(BOXES))


# ---------------------------------------------------------------- vLLM backend, against a fake `vllm` module


class FakeVllm:
    """Stands in for the `vllm` package (it needs a GPU): records what the backend builds and asks."""

    def __init__(self) -> None:
        self.llms: list[FakeVllmLLM] = []
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs: Any) -> None:
                self.kwargs = kwargs

        class StructuredOutputsParams:
            def __init__(self, **kwargs: Any) -> None:
                self.kwargs = kwargs

        class LLM(FakeVllmLLM):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                fake.llms.append(self)

        self.module = types.ModuleType("vllm")
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams  # type: ignore[attr-defined]
        self.sampling = types.ModuleType("vllm.sampling_params")
        self.sampling.StructuredOutputsParams = StructuredOutputsParams  # type: ignore[attr-defined]
        self.sampling.SamplingParams = SamplingParams  # type: ignore[attr-defined]


class FakeVllmLLM:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls: list[tuple[list, list, dict]] = []

    def chat(self, conversations: list, sampling_params: list, **kwargs: Any) -> list:
        self.calls.append((conversations, sampling_params, kwargs))
        output = lambda i: types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"answer {i}")])  # noqa: E731
        return [output(i) for i in range(len(conversations))]


@pytest.fixture
def fake_vllm(monkeypatch) -> FakeVllm:
    fake = FakeVllm()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", fake.sampling)
    return fake


def test_vllm_builds_the_engine_from_options(fake_vllm) -> None:
    from engine.models.chat_vllm import VllmChat

    chat = VllmChat.from_pretrained(
        "Qwen/Qwen2.5-VL-7B-Instruct", device="cuda", max_model_len=32768,
        limit_mm_per_prompt={"image": 2, "video": 1}, engine_args={"enforce_eager": True},
    )
    assert isinstance(chat, ChatModel) and chat.model_id == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert fake_vllm.llms[0].kwargs == {
        "model": "Qwen/Qwen2.5-VL-7B-Instruct", "dtype": "auto", "gpu_memory_utilization": 0.85,
        "tensor_parallel_size": 1, "load_format": "auto", "seed": 0, "trust_remote_code": False,
        "max_model_len": 32768,
        "limit_mm_per_prompt": {"image": 2, "video": 1}, "enforce_eager": True,
    }
    with pytest.raises(ConfigError, match="CUDA GPU"):
        VllmChat.from_pretrained("m", device="cpu")
    with pytest.raises(ConfigError, match="transformers"):
        VllmChat.tiny(device="cuda")


def test_vllm_sends_the_whole_batch_with_per_request_sampling(fake_vllm) -> None:
    from engine.models.chat_vllm import VllmChat

    chat = VllmChat(llm=fake_vllm.module.LLM(model="m"), model_id="m")
    schema = Nouns.model_json_schema()
    requests = [
        user("plain", max_tokens=5),
        user(ChatImage(scene(0)), clip(1, n=2), "look", json_schema=schema, temperature=0.7),
    ]
    assert chat.chat(requests) == ["answer 0", "answer 1"]
    assert chat.chat([]) == []
    [(conversations, params, kwargs)] = fake_vllm.llms[0].calls
    assert kwargs == {"use_tqdm": False}
    assert conversations[0] == [{"role": "user", "content": "plain"}]
    image, video, text = conversations[1][0]["content"]
    assert image["type"] == "image_pil" and np.array_equal(np.asarray(image["image_pil"]), scene(0))
    assert video["type"] == "video_url" and video["video_url"]["url"].startswith("data:video/jpeg;base64,")
    assert len(video["video_url"]["url"].split(",")) == 3  # prefix + one JPEG per frame
    assert text == {"type": "text", "text": "look"}
    assert params[0].kwargs == {"max_tokens": 5, "temperature": 0.0, "structured_outputs": None}
    assert params[1].kwargs["temperature"] == 0.7
    assert params[1].kwargs["structured_outputs"].kwargs == {"json": schema}


def test_vllm_missing_package_says_how_to_install(monkeypatch) -> None:
    from engine.models.chat_vllm import VllmChat

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ConfigError, match=r"vllm. extra"):
        VllmChat.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct", device="cuda")


# ---------------------------------------------------------------- the grounder on a chat model


@pytest.mark.parametrize(
    ("text", "n_boxes", "expected"),
    [
        ("2", 3, [2]),
        ("<obj1><obj3>", 4, [1, 3]),
        ("<obj1><obj3>", 3, [1]),
        ("objects 1 and 7", 3, [1]),
        ("1, 1, 0", 3, [1, 0]),
        ("None of them.", 3, []),
        ("", 3, []),
    ],
)
def test_parse_indexes(text: str, n_boxes: int, expected: list[int]) -> None:
    assert parse_indexes(text, n_boxes) == expected


class FakeChatRecorder:
    """Answers every request with a fixed text and keeps each batch."""

    model_id = "fake/recorder"

    def __init__(self, answer: str = " <obj2> ") -> None:
        self.answer = answer
        self.batches: list[list[ChatRequest]] = []

    def chat(self, requests: Sequence[ChatRequest]) -> list[str]:
        self.batches.append(list(requests))
        return [self.answer] * len(requests)


def test_grounder_shows_the_numbered_boxes_and_asks_rexseek() -> None:
    from prompts import template_hash

    fake = FakeChatRecorder()
    grounder = ChatGrounder(fake, max_pixels=None)
    assert isinstance(grounder, Grounder) and grounder.model_id == "fake/recorder"
    assert grounder.prompt_hash == template_hash("grounder")
    answers = grounder.ground(scene(0), BOXES, ["the dog", " the   cat "])
    assert answers == [GroundingAnswer(indexes=[2], text="<obj2>")] * 2
    [batch] = fake.batches  # one chat call, one request per expression
    assert len(batch) == 2
    for request, expression in zip(batch, ["the dog", "the cat"]):
        [message] = request.messages
        image, prompt = message.content
        assert np.array_equal(image.pixels, draw_numbered_boxes(scene(0), BOXES))
        assert f"Please detect {expression} in this image. Answer the question with object indexes." in prompt
        assert request.json_schema is None and request.max_tokens == 16


def test_grounder_downscales_the_marked_image_to_max_pixels() -> None:
    fake = FakeChatRecorder()
    ChatGrounder(fake, max_pixels=40 * 40).ground(scene(0), BOXES, ["the dog"])
    shown = fake.batches[0][0].messages[0].content[0].pixels
    assert shown.shape[0] * shown.shape[1] <= 40 * 40 and shown.shape[1] > shown.shape[0]  # aspect kept
    with pytest.raises(ValueError, match="max_pixels"):
        ChatGrounder(fake, max_pixels=10)


def test_grounder_edge_cases() -> None:
    fake = FakeChatRecorder()
    grounder = ChatGrounder(fake)
    assert grounder.ground(scene(0), BOXES, []) == []
    assert grounder.ground(scene(0), [], ["the dog"]) == [GroundingAnswer(indexes=[], text="")]
    assert fake.batches == []  # nothing to ask
    with pytest.raises(ValueError, match="empty"):
        grounder.ground(scene(0), BOXES, ["the dog", "  "])
    with pytest.raises(ValueError, match="box 0"):
        grounder.ground(scene(0), [(0, 0, float("nan"), 5)], ["the dog"])
    with pytest.raises(ValueError, match="RGB uint8"):
        grounder.ground(scene(0)[..., 0], BOXES, ["the dog"])
    with pytest.raises(ValueError, match="one string"):
        grounder.ground(scene(0), BOXES, "the dog")


@pytest.mark.integration
def test_grounder_on_the_tiny_vlm_answers_valid_indexes(tiny_chat) -> None:
    grounder = ChatGrounder(tiny_chat)
    expressions = ["the dog", "a red ball on the left", "the girl"]
    answers = grounder.ground(scene(0), BOXES, expressions)
    assert len(answers) == 3
    for answer in answers:
        assert isinstance(answer, GroundingAnswer) and isinstance(answer.text, str)
        assert all(0 <= i < len(BOXES) for i in answer.indexes)
        assert answer.indexes == parse_indexes(answer.text, len(BOXES))
    # Left padding: the batched answers equal one-expression calls.
    assert answers[:2] == [grounder.ground(scene(0), BOXES, [e])[0] for e in expressions[:2]]


# ---------------------------------------------------------------- import cost


def test_chat_modules_import_without_heavy_libraries() -> None:
    code = (
        "import sys, engine.chat, engine.models.chat_transformers, engine.models.chat_vllm, "
        "engine.models.chat_http, agents.grounder; "
        "heavy = {'torch', 'transformers', 'httpx', 'vllm', 'xgrammar', 'cv2', 'PIL'} & set(sys.modules); "
        "sys.exit(f'imported {heavy}' if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
