"""One interface per model role. Agents depend on these, never on a model library or a model name.

Images are RGB uint8 numpy arrays of shape (H, W, 3). Boxes are xyxy pixels in the image they were given on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Detection:
    box: Box
    score: float
    label: str = field(metadata={"doc": "the prompt phrase this box was matched to (one of the phrases asked)"})


@dataclass(frozen=True)
class GroundingAnswer:
    indexes: list[int]  # candidate box indexes named by the model, best first (0-based)
    text: str  # the model's raw answer, kept as evidence


@runtime_checkable
class Detector(Protocol):
    """Open-set detector (Grounding DINO)."""

    model_id: str

    def detect(
        self,
        images: Sequence[np.ndarray],
        phrases: Sequence[str],
        *,
        box_threshold: float,
        text_threshold: float,
    ) -> list[list[Detection]]:
        """Detect every phrase in every image, in one batched forward; one detection list per image.

        Each detection's label is exactly one of `phrases` (partial phrase matches are mapped back to the
        phrase they came from; detections matching none are dropped).
        """
        ...


@runtime_checkable
class Embedder(Protocol):
    """Image embedder for the Video Clipper (SigLIP)."""

    model_id: str
    input_size: int  # frames are squash-resized to input_size x input_size before `embed`

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """L2-normalised float32 embeddings, shape (N, D)."""
        ...


@runtime_checkable
class BoxSegmenter(Protocol):
    """Box-prompted image segmenter (SAM 2 image mode, HQ-SAM)."""

    model_id: str

    def segment(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Boolean masks, shape (N, H, W), one per xyxy box of `boxes` (shape (N, 4))."""
        ...


@runtime_checkable
class Grounder(Protocol):
    """Referring-expression grounder that answers with box indexes (RexSeek's interface)."""

    model_id: str

    def ground(self, image: np.ndarray, boxes: Sequence[Box], expressions: Sequence[str]) -> list[GroundingAnswer]:
        """For each expression, which of the numbered `boxes` it refers to; one batched call per image."""
        ...


class FrameSource(Protocol):
    """Frames the tracker runs on: uint8 RGB, squash-resized to exactly the tracker's image_size."""

    def __len__(self) -> int: ...

    def __getitem__(self, position: int) -> np.ndarray: ...


class TrackingSession(Protocol):
    """sam2's session shape: prompt objects on frames, then propagate as a generator."""

    def add_box(self, position: int, obj_id: int, box: Box) -> None:
        """Prompt object `obj_id` with an xyxy box (pixels of the output resolution) at frame `position`;
        parts outside the frame are clipped, a box wholly outside is a ValueError."""
        ...

    def add_mask(self, position: int, obj_id: int, mask: np.ndarray) -> None:
        """Prompt object `obj_id` with a boolean mask (output resolution) at frame `position`."""
        ...

    def propagate(self, start: int, *, reverse: bool = False) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
        """Yield (position, {obj_id: boolean mask at output resolution}) from `start`, inclusive,
        to the last (or, reversed, the first) frame. All prompted objects advance together."""
        ...

    def close(self) -> None:
        """Free the session's state; safe to call twice."""
        ...


@runtime_checkable
class Tracker(Protocol):
    """Video object tracker (SAM 2 video predictor)."""

    model_id: str
    image_size: int  # side of the square frames the FrameSource must hold

    def start(self, frames: FrameSource, *, height: int, width: int) -> TrackingSession:
        """Open a session over `frames`; masks come back at height x width."""
        ...


# -- chat models (every LLM / VLM role) -----------------------------------------------------------------------


@dataclass(frozen=True)
class ChatImage:
    """An image part of a message: RGB uint8 (H, W, 3)."""

    pixels: np.ndarray


@dataclass(frozen=True)
class ChatVideo:
    """A video part of a message: frames sampled from it, RGB uint8 (H, W, 3) each, in time order."""

    frames: tuple[np.ndarray, ...]
    fps: float  # the rate the frames were sampled at (a video LLM may use it for timing)


ChatPart = str | ChatImage | ChatVideo


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system | user | assistant
    content: tuple[ChatPart, ...]

    @classmethod
    def user(cls, *parts: ChatPart) -> "ChatMessage":
        return cls("user", tuple(parts))

    @classmethod
    def assistant(cls, text: str) -> "ChatMessage":
        return cls("assistant", (text,))


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[ChatMessage, ...]
    json_schema: dict | None = None  # when set, the answer must be JSON valid against this JSON Schema
    max_tokens: int = 512
    temperature: float = 0.0  # 0: greedy


@runtime_checkable
class ChatModel(Protocol):
    """A chat LLM or VLM (vLLM in-process, an OpenAI-compatible server, transformers in-process).

    Callers go through `engine.chat.ask_text` / `ask_json`, which validate answers and retry; a backend only
    turns a batch of requests into raw answers.
    """

    model_id: str

    def chat(self, requests: Sequence[ChatRequest]) -> list[str]:
        """The raw text answer to each request, in order. The whole list is one batch: the backend runs it
        together as far as its engine allows. Where `json_schema` is set the backend constrains decoding to it
        when it can (the caller validates either way). Transport faults that outlast the backend's own
        retries raise `ChatBackendError`."""
        ...
