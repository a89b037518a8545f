"""SAM 2 image-mode box segmenter backend (`BoxSegmenter`) on `sam2.SAM2ImagePredictor`.

torch and sam2 are imported inside functions so importing this module stays light.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any

import numpy as np

from engine.images import check_rgb_uint8
from engine.models.sam2_tracker import (
    TINY_CONFIG,
    TINY_MODEL_ID,
    check_dtype,
    clip_boxes,
    load_checkpoint_message,
    random_fullsize_config,
    resolve_sam2_weights,
    tiny_overrides,
)

log = logging.getLogger(__name__)


class Sam2BoxSegmenter:
    """Box-prompted masks on one image: the image is embedded once, all boxes are decoded in one batch."""

    def __init__(self, *, model: Any, model_id: str, dtype: str = "bfloat16") -> None:
        """`model` is a sam2 `SAM2Base` (as built by `sam2.build_sam.build_sam2`)."""
        from sam2.modeling.sam2_base import SAM2Base
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        if not isinstance(model, SAM2Base):
            raise ValueError(f"model must be a sam2 SAM2Base, got {type(model).__name__}")
        self.model_id = model_id
        self.dtype = check_dtype(dtype)
        self.image_size: int = int(model.image_size)
        with warnings.catch_warnings():  # SAM2Transforms uses torch.jit.script, deprecated in torch 2.10+
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            self.predictor = SAM2ImagePredictor(model)
        # SAM2ImagePredictor hard-codes the backbone feature sizes of a 1024 input; derive them from the
        # model's image_size (strides 4, 8, 16) so other sizes (the tiny model's) work too.
        s = self.image_size
        self.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
        # The predictor holds one image's features between set_image and predict: one video at a time.
        self._lock = threading.Lock()

    @property
    def device(self) -> str:
        return str(self.predictor.device)

    def segment(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Boolean masks (N, H, W), one per xyxy pixel box of `boxes` (N, 4); boxes are clipped to the image."""
        image = check_rgb_uint8(image, "image")
        h, w = image.shape[:2]
        boxes = clip_boxes(boxes, width=w, height=h)
        if len(boxes) == 0:
            return np.zeros((0, h, w), dtype=bool)
        import torch

        from engine.device import autocast

        with self._lock, torch.inference_mode(), autocast(self.device, self.dtype):
            self.predictor.set_image(image)
            try:
                masks, _, _ = self.predictor.predict(box=boxes, multimask_output=False)
            finally:
                self.predictor.reset_predictor()  # do not keep this image's features alive between calls
        # sam2 returns (N, 1, H, W) for several boxes and (1, H, W) for one.
        return np.asarray(masks).reshape(len(boxes), h, w) > 0

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        config: str | None = None,
        device: str = "auto",
        dtype: str = "bfloat16",
    ) -> "Sam2BoxSegmenter":
        """A local .pt checkpoint (config from its file name unless given) or a Hugging Face id such as
        "facebook/sam2.1-hiera-small" (downloaded into the Hugging Face cache on first use)."""
        from sam2.build_sam import build_sam2

        from engine.device import pick_device

        check_dtype(dtype)
        config, ckpt_path = resolve_sam2_weights(model, config)
        try:
            sam_model = build_sam2(config, ckpt_path, device=pick_device(device))
        except RuntimeError as exc:  # sam2 raises a bare RuntimeError() on a key mismatch
            raise ValueError(load_checkpoint_message(exc, ckpt_path, config)) from exc
        return cls(model=sam_model, model_id=model, dtype=dtype)

    @classmethod
    def tiny(
        cls, *, image_size: int = 256, seed: int = 0, device: str = "cpu", dtype: str = "bfloat16"
    ) -> "Sam2BoxSegmenter":
        """sam2.1 hiera-t with random weights (same builder config as `Sam2Tracker.tiny`); masks are noise."""
        import torch
        from sam2.build_sam import build_sam2

        from engine.device import pick_device

        check_dtype(dtype)
        overrides = tiny_overrides(image_size)
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
            torch.manual_seed(seed)
            sam_model = build_sam2(
                TINY_CONFIG, ckpt_path=None, device=pick_device(device), hydra_overrides_extra=overrides
            )
        log.warning("SAM 2 box segmenter %s has random weights: its masks are meaningless", TINY_MODEL_ID)
        return cls(model=sam_model, model_id=TINY_MODEL_ID, dtype=dtype)

    @classmethod
    def random_fullsize(
        cls,
        *,
        name: str = "random/sam2.1-hiera-small",
        seed: int = 0,
        device: str = "auto",
        dtype: str = "bfloat16",
    ) -> "Sam2BoxSegmenter":
        """A released SAM 2 architecture at full size (its own config and image_size, 1024) with random
        weights: `random/<name>` for any `facebook/<name>` sam2 knows, e.g. random/sam2.1-hiera-small. For
        timing where no weights can be fetched; masks are noise."""
        import torch
        from sam2.build_sam import build_sam2

        from engine.device import pick_device

        check_dtype(dtype)
        config = random_fullsize_config(name)
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
            torch.manual_seed(seed)
            sam_model = build_sam2(config, ckpt_path=None, device=pick_device(device))
        log.warning("SAM 2 box segmenter %s has random weights: its masks are meaningless", name)
        return cls(model=sam_model, model_id=name, dtype=dtype)

