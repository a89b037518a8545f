"""Open-set detector backend: Grounding DINO through transformers.

The prompt is the phrases, lowercased, joined with ". " and ending with "." (how Grounding DINO was trained).
The text labels transformers returns are spans of prompt tokens that passed `text_threshold`, which can be
part of a phrase or run across several; `map_label` maps each back to exactly one asked phrase. A span across
several phrases goes to the first of them; with `remove_combined` (GroundingDINO's own option of that name in
`get_phrases_from_posmap`'s caller) a box keeps only the tokens of the phrase holding its strongest token, so
it goes to the phrase it matches best.

Speed options (dtype, resolution) are described on `GroundingDinoDetector`; `random/...` model ids
build full-size architectures with random weights (`GroundingDinoDetector.random_fullsize`) for timing.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from engine.device import resolve_dtype
from engine.images import check_rgb_uint8
from engine.models.interfaces import Detection

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TINY_MODEL_ID = "tiny-random/grounding-dino"

# Words the tiny model's tokenizer knows; anything else becomes [UNK] (fine for random weights).
_TINY_WORDS = (
    "a an the of and with in on left right small big red green blue yellow white black brown "
    "person man woman girl boy child people dog cat horse bird animal ball box car bus bike "
    "shape square circle triangle rectangle object thing"
).split()
# More whole words for the full-size random model's stand-in vocabulary (see `bert_base_vocab`).
_COMMON_WORDS = (
    "is are was to for at by from it this that his her its their one two three four large little tall short "
    "long old young front back top bottom middle near far other orange purple pink gray grey dark light "
    "player kid baby lady guy adult crowd team table chair cup bottle plate bowl phone book bag hat shirt "
    "jacket dress shoe hand head face arm leg hair eye tree grass water road street building house wall door "
    "window sky floor field truck train boat plane motorcycle bicycle sheep cow elephant bear zebra giraffe "
    "fish monkey rabbit mouse duck chicken toy kite frisbee skateboard surfboard racket umbrella sign light "
    "lamp screen laptop keyboard"
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


# `bfloat16` casts the weights (and the pixel values) rather than running under autocast: transformers 5.20
# builds Grounding DINO's reference points, valid ratios and sampling grids in the model's dtype, so a bf16
# model runs end to end (checked on CPU), and every op reads half the bytes, the pure-PyTorch deformable
# attention's grid_sample included, which autocast would run in float32 (its sampling grid is float32
# there), with no per-op casts of the weights. Post-processing upcasts logits and boxes to float32.
DTYPES = ("auto", "bfloat16", "float32")
# Shortest edges `resolution` may take: below 64 px Swin's stride-32 stage has almost nothing left to see;
# above 2048 px (2.5 times the 800 px Grounding DINO was trained at) cost grows with the pixels for no gain.
MIN_RESOLUTION, MAX_RESOLUTION = 64, 2048


def resolve_detector_dtype(dtype: str, device: str) -> str:
    return resolve_dtype(dtype, device, DTYPES)


def check_resolution(resolution: int | None) -> int | None:
    if resolution is None:
        return None
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise ValueError(f"resolution must be an int (pixels of the shortest edge) or None, got {resolution!r}")
    if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise ValueError(f"resolution must be between {MIN_RESOLUTION} and {MAX_RESOLUTION}, got {resolution}")
    return resolution


def feature_positions(height: int, width: int, num_feature_levels: int = 4) -> int:
    """Positions the encoder sees for an input of height x width: feature maps at strides 8, 16, 32 (Swin's
    last three stages) and 64 (one more conv), one position per cell."""
    return sum(-(-height // s) * -(-width // s) for s in (8 * 2**level for level in range(num_feature_levels)))


def check_resolution_fits(resolution: int, config: Any) -> None:
    """The two-stage decoder picks its `num_queries` from the encoder's positions: a square image resized to
    `resolution` must have at least that many (grounding-dino-tiny's 900 need 201 px)."""
    levels = int(getattr(config, "num_feature_levels", 4))
    if feature_positions(resolution, resolution, levels) < config.num_queries:
        smallest = next(r for r in range(MIN_RESOLUTION, MAX_RESOLUTION + 1)
                        if feature_positions(r, r, levels) >= config.num_queries)
        raise ValueError(
            f"resolution {resolution} leaves fewer feature positions than the model's {config.num_queries} "
            f"queries; use at least {smallest}"
        )


def processing_size(image_processor: Any, resolution: int | None) -> dict[str, int] | None:
    """The `size` images are resized to: None (the processor's own) without `resolution`; else the shortest
    edge `resolution` and the longest edge capped in the processor's own proportion (1333/800)."""
    if resolution is None:
        return None
    size = image_processor.size
    shortest, longest = getattr(size, "shortest_edge", None), getattr(size, "longest_edge", None)
    if isinstance(size, dict):
        shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    if not shortest:
        raise ValueError(
            f"resolution needs an image processor that resizes by shortest edge; this one's size is {size!r}"
        )
    return {"shortest_edge": resolution, "longest_edge": round(resolution * (longest or shortest) / shortest)}


def _takes_device(image_processor: Any) -> bool:
    """Whether the image processor resizes and normalizes on a given device (the torchvision backend,
    transformers' default) rather than on the CPU only (the PIL backend)."""
    try:
        from transformers.image_processing_backends import TorchvisionBackend
    except ImportError:
        return False
    return isinstance(image_processor, TorchvisionBackend)


# Full-size architectures `random_fullsize` builds: GroundingDinoConfig's defaults are grounding-dino-tiny's
# (Swin-T 224 backbone, window 7; BERT-base text encoder; d_model 256; 6 encoder and 6 decoder layers; 900
# queries; 4 feature levels and 4 sampling points; max_text_len 256: as IDEA-Research/grounding-dino-tiny's
# config.json and GroundingDINO's SwinT_OGC config); grounding-dino-base swaps in Swin-B 384 (window 12).
RANDOM_MODEL_IDS = ("random/grounding-dino-tiny", "random/grounding-dino-base")


def _random_config_overrides(name: str) -> dict[str, Any]:
    if name == "random/grounding-dino-base":
        from transformers import SwinConfig

        backbone = SwinConfig(
            embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12, image_size=384,
            out_indices=[2, 3, 4],
        )
        return {"backbone_config": backbone}
    return {}


BERT_VOCAB_SIZE = 30522


def bert_base_vocab(size: int = BERT_VOCAB_SIZE) -> dict[str, int]:
    """A deterministic stand-in for bert-base-uncased's vocabulary, built offline: the same size and the same
    ids for the tokens Grounding DINO reads ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, "." 1012,
    "?" 1029: its text attention masks split phrases at [CLS], [SEP], "." and "?" by id), common words as one
    token, and 2- and 3-letter pieces so that any lowercase word takes a few tokens, as in BERT."""
    import itertools
    import string

    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [f"[unused{i}]" for i in range(99, 994)]
    # Single characters from "!" in code point order, uppercase left out (uncased), as BERT lists them.
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    tokens += chars + ["##" + c for c in chars if c.isalnum()]
    tokens += _TINY_WORDS + _COMMON_WORDS
    letters = string.ascii_lowercase
    for length in (2, 3):
        pieces = ["".join(p) for p in itertools.product(letters, repeat=length)]
        tokens += pieces + ["##" + p for p in pieces]
    vocab = {token: i for i, token in enumerate(itertools.islice(dict.fromkeys(tokens), size))}
    if len(vocab) != size or vocab["."] != 1012 or vocab["?"] != 1029 or vocab["[CLS]"] != 101:
        raise AssertionError("the stand-in BERT vocabulary lost BERT's ids")  # a bug here, not bad input
    return vocab


class GroundingDinoDetector:
    """`Detector` backend: one batched Grounding DINO forward per `detect` call.

    Options (each settable per role in a profile, `options: {...}`):
    - `dtype`: `auto` (bfloat16 on a GPU, float32 on a CPU), `bfloat16` or `float32`. bfloat16 casts the
      weights and the pixel values (see `DTYPES` for why not autocast); post-processing runs in float32.
    - `resolution`: the shortest edge images are resized to (the checkpoint's own, 800 for Grounding DINO,
      when None); the longest edge cap scales with it (1333 at 800, 1066 at 640).
    - `nms_iou`: the IoU above which a box suppresses a lower-scored box of the same label.
    - `remove_combined`: label each box with the phrase of its strongest token (see the module docstring);
      off by default, as in GroundingDINO.

    Images are resized and normalized on the model's device; the prompt is tokenized once per call and
    shared by every image of the batch; post-processing moves the model's outputs to the CPU once per call.
    """

    def __init__(
        self,
        *,
        model: Any,
        processor: Any,
        model_id: str,
        device: str = "cpu",
        nms_iou: float = 0.7,
        dtype: str = "auto",
        resolution: int | None = None,
        remove_combined: bool = False,
    ) -> None:
        import torch

        if not 0.0 < nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1], got {nms_iou}")
        self.processor = processor
        self.model_id = model_id
        self.device = device
        self.nms_iou = nms_iou
        self.remove_combined = remove_combined
        self.dtype = resolve_detector_dtype(dtype, device)
        self.torch_dtype = getattr(torch, self.dtype)
        self.model = model.to(device=device, dtype=self.torch_dtype).eval()
        self.resolution = check_resolution(resolution)
        if self.resolution is not None:
            check_resolution_fits(self.resolution, self.model.config)
        self.size = processing_size(processor.image_processor, self.resolution)
        self._text_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._label_cache: dict[tuple[tuple[int, ...], bytes], str | None] = {}

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        *,
        device: str = "cpu",
        nms_iou: float = 0.7,
        dtype: str = "auto",
        resolution: int | None = None,
        remove_combined: bool = False,
    ) -> "GroundingDinoDetector":
        """Weights from a Hugging Face id (e.g. IDEA-Research/grounding-dino-tiny) or a local folder."""
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        from engine.device import pick_device
        from engine.models.hf_loading import missing_weights_as_error

        device = pick_device(device)
        resolve_detector_dtype(dtype, device)  # fail on a bad value before loading anything
        check_resolution(resolution)
        with missing_weights_as_error(model_id_or_path, role="detector"):
            processor = AutoProcessor.from_pretrained(model_id_or_path)
            model = GroundingDinoForObjectDetection.from_pretrained(model_id_or_path)
        return cls(model=model, processor=processor, model_id=model_id_or_path, device=device, nms_iou=nms_iou,
                   dtype=dtype, resolution=resolution, remove_combined=remove_combined)

    @classmethod
    def tiny(
        cls,
        *,
        seed: int = 0,
        device: str = "cpu",
        nms_iou: float = 0.7,
        dtype: str = "auto",
        resolution: int | None = None,
        remove_combined: bool = False,
    ) -> "GroundingDinoDetector":
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
        return cls(model=model, processor=processor, model_id=TINY_MODEL_ID, device=device, nms_iou=nms_iou,
                   dtype=dtype, resolution=resolution, remove_combined=remove_combined)

    @classmethod
    def random_fullsize(
        cls,
        *,
        name: str = RANDOM_MODEL_IDS[0],
        seed: int = 0,
        device: str = "cpu",
        nms_iou: float = 0.7,
        dtype: str = "auto",
        resolution: int | None = None,
        remove_combined: bool = False,
    ) -> "GroundingDinoDetector":
        """A published Grounding DINO architecture at full size (`random/grounding-dino-tiny`: Swin-T and
        BERT-base, 172M parameters; `random/grounding-dino-base`: Swin-B) with random weights, its processor
        at Grounding DINO's own sizes and a BERT-sized vocabulary built offline: for timing on any machine.
        Its detections are meaningless."""
        import torch
        from transformers import (
            BertTokenizer,
            GroundingDinoConfig,
            GroundingDinoForObjectDetection,
            GroundingDinoImageProcessor,
            GroundingDinoProcessor,
        )

        from engine.device import pick_device

        if name not in RANDOM_MODEL_IDS:
            raise ValueError(
                f"unknown full-size random Grounding DINO {name!r}; choose from {', '.join(RANDOM_MODEL_IDS)}"
            )
        device = pick_device(device)
        resolve_detector_dtype(dtype, device)
        check_resolution(resolution)
        config = GroundingDinoConfig(**_random_config_overrides(name))
        processor = GroundingDinoProcessor(
            image_processor=GroundingDinoImageProcessor(),  # shortest edge 800, longest 1333
            tokenizer=BertTokenizer(vocab=bert_base_vocab()),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GroundingDinoForObjectDetection(config)
        log.warning("detector %s has random weights: its detections are meaningless", name)
        return cls(model=model, processor=processor, model_id=name, device=device, nms_iou=nms_iou, dtype=dtype,
                   resolution=resolution, remove_combined=remove_combined)

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
        text = self._tokenize(prompt)
        pixels = self.preprocess(images)
        n = len(images)
        with torch.inference_mode():
            outputs = self.model(
                pixel_values=pixels["pixel_values"],
                pixel_mask=pixels["pixel_mask"],
                # One prompt for the whole batch: the same token rows, expanded without a copy.
                **{key: value.expand(n, -1) for key, value in text.items()},
            )
        return self._post_process(
            outputs.logits, outputs.pred_boxes, text["input_ids"][0], [image.shape[:2] for image in images],
            box_threshold=box_threshold, text_threshold=text_threshold, prompt_phrases=prompt_phrases,
            caller_phrase=caller_phrase,
        )

    def preprocess(self, images: Sequence[np.ndarray]) -> dict[str, "torch.Tensor"]:
        """`pixel_values` (N, 3, H, W) in the model's dtype and `pixel_mask` (N, H, W), on the model's device:
        images resized to `self.size` and normalized there (on the GPU when the model is on one), then padded
        to the batch's largest size (the mask marks the padding)."""
        kwargs: dict[str, Any] = {"return_tensors": "pt", "input_data_format": "channels_last"}
        if self.size is not None:
            kwargs["size"] = self.size
        if _takes_device(self.processor.image_processor):
            kwargs["device"] = self.device
        out = self.processor.image_processor(images=list(images), **kwargs)
        return {
            "pixel_values": out["pixel_values"].to(self.device, self.torch_dtype),
            "pixel_mask": out["pixel_mask"].to(self.device),
        }

    def _tokenize(self, prompt: str) -> dict[str, "torch.Tensor"]:
        """The prompt's token rows (1, L) on the device; cached, as a pipeline asks the same phrases often."""
        cached = self._text_cache.get(prompt)
        if cached is not None:
            return cached
        tokens = self.processor.tokenizer(prompt, return_tensors="pt", return_token_type_ids=True)
        max_text_len = self.model.config.max_text_len
        if tokens["input_ids"].shape[1] > max_text_len:
            raise ValueError(
                f"the prompt {prompt!r} is {tokens['input_ids'].shape[1]} tokens, more than the model's "
                f"max_text_len {max_text_len}; call detect with fewer phrases at a time"
            )
        cached = {key: tokens[key].to(self.device) for key in ("input_ids", "token_type_ids", "attention_mask")}
        if len(self._text_cache) >= 64:
            self._text_cache.clear()  # one call, safe when threads share the detector
        self._text_cache[prompt] = cached
        return cached

    def _strongest_phrase(self, probs: "torch.Tensor", input_ids: "torch.Tensor") -> "torch.Tensor":
        """(N, queries, L) bool: the tokens of the phrase that holds each box's strongest token (phrases are the
        runs between [CLS], [SEP], "." and "?", the tokens Grounding DINO's text attention splits at)."""
        import torch

        tokenizer = self.processor.tokenizer
        ids = {tokenizer.cls_token_id, tokenizer.sep_token_id}
        ids |= {i for i in tokenizer.convert_tokens_to_ids([".", "?"]) if i != tokenizer.unk_token_id}
        separator = torch.isin(input_ids, torch.tensor(sorted(ids), device=input_ids.device))
        phrase = torch.cumsum(separator.long(), dim=0)  # phrase number of each position
        strongest = probs.masked_fill(separator, -1.0).argmax(dim=-1)  # (N, queries)
        return (phrase[strongest][..., None] == phrase) & ~separator

    def _post_process(
        self,
        logits: "torch.Tensor",
        pred_boxes: "torch.Tensor",
        input_ids: "torch.Tensor",
        sizes: list[tuple[int, int]],
        *,
        box_threshold: float,
        text_threshold: float,
        prompt_phrases: list[str],
        caller_phrase: dict[str, str],
    ) -> list[list[Detection]]:
        """transformers' `post_process_grounded_object_detection`, vectorized: scores, boxes and the token
        masks of the whole batch are computed on the device in float32 and reach the CPU in one transfer;
        each distinct token mask is decoded and mapped to a phrase once, not once per box."""
        import torch
        from torchvision.ops import batched_nms

        probs = logits.float().sigmoid()  # (N, queries, max_text_len); -inf past the prompt gives 0
        scores = probs.max(dim=-1).values
        keep = scores > box_threshold
        token_mask = probs > text_threshold
        # As transformers does: the first and the last column never count ([CLS], and the last slot).
        token_mask[..., 0] = False
        token_mask[..., -1] = False
        token_mask = token_mask[..., : input_ids.shape[0]]
        if self.remove_combined:
            token_mask &= self._strongest_phrase(probs[..., : input_ids.shape[0]], input_ids)
        cx, cy, w, h = pred_boxes.float().unbind(-1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        heights_widths = torch.tensor(sizes, dtype=torch.float32, device=boxes.device)
        scale = heights_widths[:, [1, 0, 1, 0]]  # (N, 4): w, h, w, h
        boxes = boxes * scale[:, None, :]
        # Predicted boxes can reach past the border; clip so they are valid pixel boxes of each image.
        boxes = torch.minimum(boxes.clamp(min=0), scale[:, None, :])
        image_index, query_index = keep.nonzero(as_tuple=True)
        # The only transfers to the CPU: the kept boxes, scores and token masks of the whole batch.
        boxes, scores, token_mask = (
            t[image_index, query_index].cpu() for t in (boxes, scores, token_mask)
        )
        image_index = image_index.cpu()
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        # Label each distinct token mask once: decode its tokens, map the text to an asked phrase.
        token_ids = input_ids.tolist()
        masks, inverse = np.unique(token_mask.numpy(), axis=0, return_inverse=True)
        phrase_index = {phrase: i for i, phrase in enumerate(prompt_phrases)}
        mask_phrase = []
        if len(self._label_cache) > 100_000:
            self._label_cache.clear()
        for mask in masks:
            key = (tuple(token_ids), mask.tobytes())  # frames of one video repeat masks for one prompt
            phrase = self._label_cache.get(key, "")
            if phrase == "":
                text = self.processor.tokenizer.decode([token_ids[j] for j in np.flatnonzero(mask)])
                phrase = self._label_cache[key] = map_label(text, prompt_phrases)
            mask_phrase.append(-1 if phrase is None else phrase_index[phrase])
        labels = torch.as_tensor(np.asarray(mask_phrase, dtype=np.int64)[inverse.reshape(-1)])
        valid &= labels >= 0
        out: list[list[Detection]] = []
        for i in range(len(sizes)):
            rows = (valid & (image_index == i)).nonzero().flatten()
            order = rows[batched_nms(boxes[rows], scores[rows], labels[rows], self.nms_iou)]
            out.append([
                Detection(box=tuple(box), score=score, label=caller_phrase[prompt_phrases[label]])
                for box, score, label in zip(boxes[order].tolist(), scores[order].tolist(), labels[order].tolist())
            ])
        return out
