"""Entity Recognizer (Strefer §2.1.1, Prompt P.1): a video LLM lists a video's "active" entities.

An active entity is a person, animal or object with dynamic behaviour (actions, interactions, movement); the
prompt gives that definition and asks for appearance words that tell the entities apart. The answer is a free
paragraph, which the Referring Parser turns into structured lists. The caller samples frames from the whole
video; every video of a call goes to the model in one batch, the video first in each message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from agents.common import Failure
from engine.chat import ask_text
from engine.models.interfaces import ChatMessage, ChatModel, ChatRequest, ChatVideo
from engine.stats import Stats
from prompts import render

AGENT = "recognizer"
TEMPLATE = "entity_recognizer"


@dataclass(frozen=True)
class RecognizerConfig:
    max_tokens: int = 512
    max_paragraph_chars: int = 4000  # longer answers are cut (counted) before they reach the parser

    def __post_init__(self) -> None:
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens must be >= 16, got {self.max_tokens}")
        if self.max_paragraph_chars < 16:
            raise ValueError(f"max_paragraph_chars must be >= 16, got {self.max_paragraph_chars}")


class EntityRecognizer:
    """`EntityRecognizer(vlm).recognize(videos)` -> per video, the paragraph or a `Failure`, in order.

    Failures: `no_frames` (the video had no sampled frame; not sent), `empty_answer` (the model said nothing).
    """

    prompts = (TEMPLATE,)  # template names, for provenance (prompts.template_hash)

    def __init__(self, vlm: ChatModel, config: RecognizerConfig | None = None, stats: Stats | None = None) -> None:
        self.vlm = vlm
        self.config = config or RecognizerConfig()
        self.stats = stats if stats is not None else Stats()

    def recognize(self, videos: Sequence[ChatVideo]) -> list[str | Failure]:
        cfg, stats = self.config, self.stats
        prompt = render(TEMPLATE)
        results: list[str | Failure | None] = [None] * len(videos)
        asked: list[int] = []
        requests: list[ChatRequest] = []
        for i, video in enumerate(videos):
            stats.count(f"{AGENT}_videos")
            if not video.frames:
                results[i] = Failure("no_frames", "the video has no sampled frame to show the model")
                stats.count(f"{AGENT}_failed_no_frames")
                continue
            asked.append(i)
            requests.append(ChatRequest(messages=(ChatMessage.user(video, prompt),), max_tokens=cfg.max_tokens))

        with stats.timer(AGENT):
            answers = ask_text(self.vlm, requests, stats=stats, agent=AGENT)
        for i, answer in zip(asked, answers):
            if not answer:
                results[i] = Failure("empty_answer", "the model listed no entity", (answer,))
                stats.count(f"{AGENT}_failed_empty")
                continue
            if len(answer) > cfg.max_paragraph_chars:
                answer = answer[: cfg.max_paragraph_chars]
                stats.count(f"{AGENT}_truncated")
            results[i] = answer
            stats.count(f"{AGENT}_paragraphs")
        return results  # type: ignore[return-value]
