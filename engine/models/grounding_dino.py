"""Open-set detector backend: Grounding DINO through transformers.

The prompt is the phrases, lowercased, joined with ". " and ending with "." (how Grounding DINO was trained).
The text labels transformers returns are spans of prompt tokens that passed `text_threshold`, which can be
part of a phrase or run across several; `map_label` maps each back to exactly one asked phrase.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from engine.images import check_rgb_uint8
from engine.models.interfaces import Detection

if TYPE_CHECKING:
    import torch

TINY_MODEL_ID = "tiny-random/grounding-dino"

# Words the tiny model's tokenizer knows; anything else becomes [UNK] (fine for random weights).
_TINY_WORDS = (
    "a an the of and with in on left right small big red green blue yellow white black brown "
    "person man woman girl boy child people dog cat horse bird animal ball box car bus bike "
    "shape square circle triangle rectangle object thing"
).split()

_SPECIAL_TOKEN = re.compile(r"\[[A-Z]+\]")  # BERT's [CLS] [SEP] [PAD] ... as they appear in decoded labels
_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return _WORD.findall(_SPECIAL_TOKEN.sub(" ", text).lower())


def _normalize_phrase(phrase: str) -> str:
    text = " ".join(str(phrase).split()).lower().rstrip(". ").strip()
    if not text:
        raise ValueError(f"phrase {phrase!r} is empty; every phrase needs at least one word")
    if "." in text:
        # "." separates phrases in Grounding DINO's prompt; inside a phrase it would split it in two.
        raise ValueError(f"phrase {phrase!r} contains '.', which Grounding DINO uses between phrases")
    return text


def normalize_phrases(phrases: Sequence[str]) -> list[str]:
    """The phrases as the prompt holds them: stripped, lowercased, trailing dots removed, duplicates dropped."""
    if isinstance(phrases, str):
        raise ValueError("phrases must be a sequence of strings, not one string")
    if not phrases:
        raise ValueError("phrases is empty: give at least one phrase to detect")
    return list(dict.fromkeys(_normalize_phrase(p) for p in phrases))


def build_prompt(phrases: Sequence[str]) -> str:
    """Grounding DINO's text prompt: "person. red ball."."""
    return ". ".join(normalize_phrases(phrases)) + "."


def _contains(haystack: list[str], needle: list[str]) -> bool:
    """Whether `needle` occurs in `haystack` as a contiguous run of words."""
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def map_label(label: str, phrases: Sequence[str]) -> str | None:
    """The one phrase of `phrases` a detector text label stands for, or None.

    Exact match (ignoring case, punctuation and special tokens) first; else the phrases that contain the
    label or are contained in it; else the phrases sharing words with it. Among several candidates the one
    with the highest word overlap (Jaccard) wins, then the longer phrase, then the earlier one.
    """
    label_words = _words(label)
    if not label_words:
        return None
    phrase_words = [_words(p) for p in phrases]
    for phrase, words in zip(phrases, phrase_words):
        if words == label_words:
            return phrase

    def overlap(words: list[str]) -> float:
        a, b = set(words), set(label_words)
        return len(a & b) / len(a | b) if a | b else 0.0

    def best(candidates: list[int]) -> str | None:
        if not candidates:
            return None
        i = max(candidates, key=lambda i: (overlap(phrase_words[i]), len(phrase_words[i]), -i))
        return phrases[i]

    containing = [
        i
        for i, words in enumerate(phrase_words)
        if words and (_contains(words, label_words) or _contains(label_words, words))
    ]
    if containing:
        return best(containing)
    return best([i for i, words in enumerate(phrase_words) if overlap(words) > 0])


def nms_per_label(detections: Sequence[Detection], iou_threshold: float) -> list[Detection]:
    """Non-maximum suppression within each label (boxes of different labels never suppress each other);
    the kept detections come back best score first."""
    if not detections:
        return []
    import torch
    from torchvision.ops import batched_nms

    labels = sorted({d.label for d in detections})
    boxes = torch.tensor([d.box for d in detections], dtype=torch.float32)
    scores = torch.tensor([d.score for d in detections], dtype=torch.float32)
    idxs = torch.tensor([labels.index(d.label) for d in detections], dtype=torch.int64)
    keep = batched_nms(boxes, scores, idxs, iou_threshold)
    return [detections[i] for i in keep.tolist()]



class GroundingDinoDetector:
    """`Detector` backend: one batched Grounding DINO forward per `detect` call."""

    def __init__(
        self,
        *,
        model: Any,
        processor: Any,
        model_id: str,
        device: str = "cpu",
        nms_iou: float = 0.7,
    ) -> None:
        if not 0.0 < nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1], got {nms_iou}")
        self.model = model.eval()
        self.processor = processor
        self.model_id = model_id
        self.device = device
        self.nms_iou = nms_iou

    @classmethod
    def from_pretrained(
        cls, model_id_or_path: str, *, device: str = "cpu", nms_iou: float = 0.7
    ) -> "GroundingDinoDetector":
        """Weights from a Hugging Face id (e.g. IDEA-Research/grounding-dino-tiny) or a local folder."""
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        from engine.device import pick_device
        from engine.models.hf_loading import missing_weights_as_error

        device = pick_device(device)
        with missing_weights_as_error(model_id_or_path, role="detector"):
            processor = AutoProcessor.from_pretrained(model_id_or_path)
            model = GroundingDinoForObjectDetection.from_pretrained(model_id_or_path)
        return cls(model=model.to(device), processor=processor, model_id=model_id_or_path, device=device,
                   nms_iou=nms_iou)

    @classmethod
    def tiny(cls, *, seed: int = 0, device: str = "cpu", nms_iou: float = 0.7) -> "GroundingDinoDetector":
        """A randomly initialised miniature Grounding DINO (about 0.4M parameters) for tests and wiring
        checks: its detections are meaningless."""
        import torch
        from transformers import (
            BertConfig,
            BertTokenizer,
            GroundingDinoConfig,
            GroundingDinoForObjectDetection,
            GroundingDinoImageProcessor,
            GroundingDinoProcessor,
            SwinConfig,
        )

        from engine.device import pick_device

        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."]
        vocab = {token: i for i, token in enumerate(dict.fromkeys(specials + _TINY_WORDS))}
        # transformers 5 ignores `vocab_file=` (every token becomes [UNK]); `vocab=` takes the dict.
        tokenizer = BertTokenizer(vocab=vocab)
        image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 128})
        processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
        config = GroundingDinoConfig(
            backbone_config=SwinConfig(
                embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, image_size=128,
                out_indices=[2, 3, 4],
            ),
            text_config=BertConfig(
                vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
            ),
            d_model=32,
            encoder_layers=1,
            encoder_ffn_dim=64,
            encoder_attention_heads=2,
            # One decoder layer fails on the tied bbox_embed weights; two is the minimum.
            decoder_layers=2,
            decoder_ffn_dim=64,
            decoder_attention_heads=2,
            num_queries=10,
            encoder_n_points=2,
            decoder_n_points=2,
            max_text_len=32,
        )
        device = pick_device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GroundingDinoForObjectDetection(config)
        return cls(
            model=model.to(device), processor=processor, model_id=TINY_MODEL_ID, device=device, nms_iou=nms_iou
        )

    def detect(
        self,
        images: Sequence[np.ndarray],
        phrases: Sequence[str],
        *,
        box_threshold: float,
        text_threshold: float,
    ) -> list[list[Detection]]:
        for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        prompt_phrases = normalize_phrases(phrases)
        # Labels come back as the caller's own strings: the first phrase with each normalized form.
        caller_phrase: dict[str, str] = {}
        for phrase in phrases:
            caller_phrase.setdefault(_normalize_phrase(phrase), phrase)
        images = list(images)
        if not images:
            return []
        for i, image in enumerate(images):
            check_rgb_uint8(image, f"image {i}")

        import torch

        prompt = ". ".join(prompt_phrases) + "."
        # Images of different sizes are padded to a common size (pixel_mask marks the padding).
        inputs = self.processor(
            images=images, text=[prompt] * len(images), padding=True, return_tensors="pt"
        )
        max_text_len = self.model.config.max_text_len
        if inputs["input_ids"].shape[1] > max_text_len:
            raise ValueError(
                f"the prompt {prompt!r} is {inputs['input_ids'].shape[1]} tokens, more than the model's "
                f"max_text_len {max_text_len}; call detect with fewer phrases at a time"
            )
        inputs = inputs.to(self.device)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        sizes = [image.shape[:2] for image in images]
        results = self.processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=box_threshold,
            text_threshold=text_threshold,
            target_sizes=sizes,
        )
        return [
            self._detections(result, height, width, prompt_phrases, caller_phrase)
            for result, (height, width) in zip(results, sizes)
        ]

    def _detections(
        self,
        result: dict[str, Any],
        height: int,
        width: int,
        prompt_phrases: list[str],
        caller_phrase: dict[str, str],
    ) -> list[Detection]:
        boxes: torch.Tensor = result["boxes"].float().cpu()
        # Predicted boxes can reach past the border; clip so they are valid pixel boxes of this image.
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        detections = []
        for box, score, text in zip(boxes.tolist(), result["scores"].tolist(), result["text_labels"]):
            phrase = map_label(text, prompt_phrases)
            if phrase is None or box[2] <= box[0] or box[3] <= box[1]:
                continue
            detections.append(Detection(box=tuple(box), score=float(score), label=caller_phrase[phrase]))
        return nms_per_label(detections, self.nms_iou)
