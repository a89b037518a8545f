"""Reviewer (VideoRefer §3.1.1, supplementary §4.1): does the mask show the object the Annotator described?

Step 1: a region captioner (Osprey in the paper; here any VLM shown the frame with the region outlined, Set-of-
Mark style, by `engine.draw.draw_region`) describes the marked object on one frame, in plain text.
Step 2: a judge LLM reads that description beside the Annotator's and answers whether both refer to the same
object. Each step sends every job in one batch. The paper keeps about 40% of samples, with precision 0.88 by
human check, so expect many drops and keep the reasons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.chat import ask_json, ask_text
from engine.draw import draw_region
from engine.images import check_rgb_uint8
from engine.models.interfaces import ChatImage, ChatMessage, ChatModel, ChatRequest
from engine.stats import Stats
from prompts import render
from schemas.records import Review

AGENT = "reviewer"
INVALID_JUDGE = "invalid_judge_answer"
MAX_REASON_CHARS = 400


@dataclass(frozen=True)
class ReviewJob:
    image: np.ndarray  # the frame, RGB uint8 (H, W, 3)
    mask: np.ndarray  # the region on that frame, bool (H, W)
    frame_index: int
    noun: str  # the noun or referring expression the description is about
    description: str  # the Annotator's (or Refiner's) description of the object

    def __post_init__(self) -> None:
        check_rgb_uint8(self.image, "ReviewJob.image")
        mask = np.asarray(self.mask)
        if mask.dtype != bool or mask.shape != self.image.shape[:2]:
            raise ValueError(
                f"ReviewJob.mask must be boolean with the image's height and width {self.image.shape[:2]}, "
                f"got {mask.dtype} {mask.shape}"
            )
        if self.frame_index < 0:
            raise ValueError(f"ReviewJob.frame_index must be >= 0, got {self.frame_index}")


class JudgeAnswer(BaseModel):
    """`{"reason": "...", "same_object": true}`. The reason comes first so the model states its grounds
    before its verdict; key order is free in JSON, so either order validates."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=MAX_REASON_CHARS)
    same_object: bool

    @field_validator("reason")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        value = " ".join(value.split())
        if not value:
            raise ValueError("reason is blank: say in one sentence why")
        return value


@dataclass(frozen=True)
class ReviewerConfig:
    outline_color: tuple[int, int, int] = (255, 0, 0)
    outline_color_name: str = "red"  # said in the captioner's prompt; must name `outline_color`
    outline_thickness: int | None = None  # None: about 1/320 of the frame's short side
    fill_alpha: float = 0.1  # light tint inside the mask; 0 for none (see draw_region)
    caption_max_tokens: int = 192
    judge_max_tokens: int = 192
    max_region_caption_chars: int = 1000
    max_description_chars: int = 2000  # the Annotator's description is cut to this in the judge's prompt
    raw_in_reason_chars: int = 300  # how much of an invalid judge answer the reason keeps
    retries: int = 2

    def __post_init__(self) -> None:
        if len(self.outline_color) != 3 or any(not 0 <= int(c) <= 255 for c in self.outline_color):
            raise ValueError(f"outline_color must be three ints in [0, 255], got {self.outline_color!r}")
        if not self.outline_color_name.strip():
            raise ValueError("outline_color_name must name the outline color for the prompt, e.g. 'red'")
        if self.outline_thickness is not None and self.outline_thickness < 1:
            raise ValueError(f"outline_thickness must be >= 1 or None, got {self.outline_thickness}")
        if not 0.0 <= self.fill_alpha <= 0.5:
            raise ValueError(
                f"fill_alpha must be in [0, 0.5], got {self.fill_alpha}: a heavy fill makes the captioner "
                "describe the fill color (Strefer §4.1.3)"
            )
        for name in ("caption_max_tokens", "judge_max_tokens"):
            if getattr(self, name) < 16:
                raise ValueError(f"{name} must be >= 16, got {getattr(self, name)}")
        for name in ("max_region_caption_chars", "max_description_chars", "raw_in_reason_chars"):
            if getattr(self, name) < 16:
                raise ValueError(f"{name} must be >= 16, got {getattr(self, name)}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Reviewer:
    """`Reviewer(region_captioner, judge).review(jobs)` -> one `Review` per job, in order."""

    prompts = ("region_captioner", "reviewer")  # template names, for provenance (prompts.template_hash)

    def __init__(
        self,
        region_captioner: ChatModel,
        judge: ChatModel,
        config: ReviewerConfig | None = None,
        stats: Stats | None = None,
    ) -> None:
        self.region_captioner = region_captioner
        self.judge = judge
        self.config = config or ReviewerConfig()
        self.stats = stats if stats is not None else Stats()

    def mark(self, job: ReviewJob) -> np.ndarray:
        """The frame as the region captioner sees it: the region outlined, lightly tinted."""
        cfg = self.config
        return draw_region(job.image, np.asarray(job.mask), cfg.outline_color,
                           thickness=cfg.outline_thickness, fill_alpha=cfg.fill_alpha)

    def review(self, jobs: Sequence[ReviewJob]) -> list[Review]:
        cfg, stats = self.config, self.stats
        reviews: list[Review | None] = [None] * len(jobs)
        stats.count(f"{AGENT}_jobs", len(jobs))

        # Step 1: describe each marked region, all jobs in one batch. An empty mask has nothing to show.
        shown: list[int] = []
        caption_requests: list[ChatRequest] = []
        prompt = render("region_captioner", color_name=cfg.outline_color_name, tinted=cfg.fill_alpha > 0)
        for i, job in enumerate(jobs):
            if not np.asarray(job.mask).any():
                reviews[i] = self._drop(job, "empty_mask: the mask is empty on this frame", "")
                stats.count(f"{AGENT}_empty_mask")
                continue
            shown.append(i)
            caption_requests.append(ChatRequest(
                messages=(ChatMessage.user(ChatImage(self.mark(job)), prompt),), max_tokens=cfg.caption_max_tokens,
            ))
        with stats.timer(f"{AGENT}_captioner"):
            captions = ask_text(self.region_captioner, caption_requests, stats=stats, agent=f"{AGENT}_captioner")

        # Step 2: judge both descriptions, all captioned jobs in one batch.
        judged: list[int] = []
        region_captions: dict[int, str] = {}
        judge_requests: list[ChatRequest] = []
        for i, raw in zip(shown, captions):
            caption = _clip(" ".join(raw.split()), cfg.max_region_caption_chars)
            if not caption:
                reviews[i] = self._drop(jobs[i], "empty_region_caption: the region captioner said nothing", "")
                stats.count(f"{AGENT}_empty_region_caption")
                continue
            region_captions[i] = caption
            judged.append(i)
            job = jobs[i]
            judge_prompt = render(
                "reviewer",
                region_caption=caption,
                noun=" ".join(job.noun.split()),
                description=_clip(" ".join(job.description.split()), cfg.max_description_chars),
            )
            judge_requests.append(ChatRequest(messages=(ChatMessage.user(judge_prompt),),
                                              max_tokens=cfg.judge_max_tokens))
        with stats.timer(f"{AGENT}_judge"):
            answers = ask_json(self.judge, judge_requests, JudgeAnswer, retries=cfg.retries, stats=stats,
                               agent=f"{AGENT}_judge")

        for i, answer in zip(judged, answers):
            job, caption = jobs[i], region_captions[i]
            if not answer.ok:
                last = answer.raw[-1] if answer.raw else ""
                reason = f"{INVALID_JUDGE}: {answer.error}; raw answer: {_clip(last, cfg.raw_in_reason_chars)!r}"
                reviews[i] = self._drop(job, reason, caption)
                stats.count(f"{AGENT}_invalid_judge")
                continue
            verdict = answer.value.same_object
            reviews[i] = Review(verdict=verdict, reason=answer.value.reason, region_caption=caption,
                                frame_index=job.frame_index)
            stats.count(f"{AGENT}_kept" if verdict else f"{AGENT}_dropped")
        return reviews  # type: ignore[return-value]

    def _drop(self, job: ReviewJob, reason: str, region_caption: str) -> Review:
        self.stats.count(f"{AGENT}_dropped")
        return Review(verdict=False, reason=reason, region_caption=region_caption, frame_index=job.frame_index)
