"""HQ-SAM box segmenter backend (`BoxSegmenter`) on transformers' `SamHQModel`.

HQ-SAM is SAM's ViT encoder and mask decoder plus a high-quality output token that reads the encoder's early
(global-attention) features; the released checkpoints are `syscv-community/sam-hq-vit-base|large|huge`.
torch and transformers are imported inside functions so importing this module stays light.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.device import resolve_dtype
from engine.images import check_rgb_uint8
from engine.models.sam2_tracker import clip_boxes

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TINY_MODEL_ID = "tiny-random/sam-hq"
DTYPES = ("auto", "bfloat16", "float32")
# The released checkpoints' ViT encoders (SAM's: width, depth, heads, the blocks with global attention).
# Everything else (1024 px input, 16 px patches, 14 px windows, 256-d prompt and decoder) is SamHQConfig's
# default, which is what all three checkpoints use; the HQ decoder reads features of the encoder's width.
RANDOM_ENCODERS: dict[str, dict[str, Any]] = {
    "random/sam-hq-vit-base": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11]
    ),
    "random/sam-hq-vit-large": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=[5, 11, 17, 23]
    ),
    "random/sam-hq-vit-huge": dict(
        hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]
    ),
}
TINY_IMAGE_SIZE = 128  # 8x8 patches of 16 px: the smallest input at which a window and a global block differ


def masks_to_image(
    processor: Any,
    low_res: "torch.Tensor",
    *,
    original_size: tuple[int, int],
    reshaped_size: tuple[int, int],
    threshold: float = 0.0,
) -> np.ndarray:
    """The decoder's low-resolution mask logits (N, 1, h, w) as boolean masks (N, H, W) on the original image.

    The processor's `post_process_masks` undoes the preprocessing: upsample to the padded input square, crop
    the padding (the image sits top-left), resize to `original_size`; logits above `threshold` are the mask.
    """
    (masks,) = processor.post_process_masks(
        [low_res.float()], [list(original_size)], [list(reshaped_size)], mask_threshold=threshold, binarize=True
    )
    return masks[:, 0].cpu().numpy()


class SamHqBoxSegmenter:
    """Box-prompted masks on one image: the image is embedded once and all its boxes are decoded in the same
    forward (one prompt batch), one mask per box (`multimask_output=False`).

    `hq_token_only`: False (HQ-SAM's default) adds the HQ token's mask to SAM's; True keeps the HQ mask alone,
    which HQ-SAM's authors suggest for images of a single object.
    """

    def __init__(
        self,
        *,
        model: Any,
        processor: Any,
        model_id: str,
        device: str = "cpu",
        dtype: str = "auto",
        hq_token_only: bool = False,
        mask_threshold: float = 0.0,
    ) -> None:
        from transformers import SamHQModel, SamHQProcessor

        if not isinstance(model, SamHQModel):
            raise ValueError(f"model must be a transformers SamHQModel, got {type(model).__name__}")
        if not isinstance(processor, SamHQProcessor):
            raise ValueError(f"processor must be a transformers SamHQProcessor, got {type(processor).__name__}")
        self.model_id = model_id
        self.device = device
        self.dtype = resolve_dtype(dtype, device, DTYPES)
        self.model = model.to(device).eval()
        self.processor = processor
        self.hq_token_only = hq_token_only
        self.mask_threshold = float(mask_threshold)
        # One image's activations at a time: several videos in flight share the model without stacking up
        # encoder activations (1024 px ViT-H) on the device.
        self._lock = threading.Lock()

    def segment(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Boolean masks (N, H, W), one per xyxy pixel box of `boxes` (N, 4); boxes are clipped to the image."""
        image = check_rgb_uint8(image, "image")
        h, w = image.shape[:2]
        boxes = clip_boxes(boxes, width=w, height=h)
        if len(boxes) == 0:
            return np.zeros((0, h, w), dtype=bool)
        import torch

        from engine.device import autocast

        # channels_last: a tiny image (3 rows) would otherwise be guessed to be channels-first
        inputs = self.processor(
            images=image, input_boxes=[boxes.tolist()], input_data_format="channels_last", return_tensors="pt"
        )
        reshaped = tuple(int(v) for v in inputs["reshaped_input_sizes"][0])
        with self._lock, torch.inference_mode():
            with autocast(self.device, self.dtype):
                outputs = self.model(
                    pixel_values=inputs["pixel_values"].to(self.device),
                    input_boxes=inputs["input_boxes"].to(self.device, torch.float32),
                    multimask_output=False,
                    hq_token_only=self.hq_token_only,
                )
            # pred_masks: (1 image, N boxes, 1 mask, 256, 256) logits on the padded input square; resized in
            # float32, outside autocast, so a bf16 run thresholds the same interpolation
            return masks_to_image(
                self.processor, outputs.pred_masks[0], original_size=(h, w), reshaped_size=reshaped,
                threshold=self.mask_threshold,
            )

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        hq_token_only: bool = False,
        mask_threshold: float = 0.0,
    ) -> "SamHqBoxSegmenter":
        """A Hugging Face id (e.g. syscv-community/sam-hq-vit-huge) or a local folder holding the model and its
        processor config; with HF_HUB_OFFLINE=1 only the cache and local folders are read."""
        from transformers import SamHQModel, SamHQProcessor

        from engine.device import pick_device
        from engine.models.hf_loading import missing_weights_as_error

        device = pick_device(device)
        resolve_dtype(dtype, device, DTYPES)  # fail on a bad value before loading anything
        with missing_weights_as_error(model, role="box segmenter"):
            # the model first: for a path that is not there it raises OSError, the processor a ValueError
            sam_model = SamHQModel.from_pretrained(model)
            processor = SamHQProcessor.from_pretrained(model)
        return cls(model=sam_model, processor=processor, model_id=model, device=device, dtype=dtype,
                   hq_token_only=hq_token_only, mask_threshold=mask_threshold)

    @classmethod
    def tiny(
        cls,
        *,
        seed: int = 0,
        device: str = "cpu",
        dtype: str = "auto",
        hq_token_only: bool = False,
        mask_threshold: float = 0.0,
    ) -> "SamHqBoxSegmenter":
        """A randomly initialised miniature HQ-SAM (about 0.1M parameters, 128 px input, one windowed and one
        global ViT block) for tests and wiring checks: its masks are meaningless."""
        from transformers import SamHQConfig

        from engine.device import pick_device

        s, width = TINY_IMAGE_SIZE, 32
        config = SamHQConfig(
            vision_config=dict(
                hidden_size=width, output_channels=width, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                image_size=s, patch_size=16, window_size=4, global_attn_indexes=[1], num_pos_feats=width // 2,
            ),
            prompt_encoder_config=dict(hidden_size=width, image_size=s, patch_size=16, mask_input_channels=8),
            mask_decoder_config=dict(
                hidden_size=width, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=width, vit_dim=width
            ),
        )
        model = _random_model(config, seed)
        return cls(model=model, processor=_processor(s), model_id=TINY_MODEL_ID, device=pick_device(device),
                   dtype=dtype, hq_token_only=hq_token_only, mask_threshold=mask_threshold)

    @classmethod
    def random_fullsize(
        cls,
        *,
        name: str = "random/sam-hq-vit-base",
        seed: int = 0,
        device: str = "auto",
        dtype: str = "auto",
        hq_token_only: bool = False,
        mask_threshold: float = 0.0,
    ) -> "SamHqBoxSegmenter":
        """A released HQ-SAM architecture at full size (1024 px) with random weights, named like the checkpoint:
        `random/sam-hq-vit-base|large|huge`. For timing where no weights can be fetched; masks are noise."""
        from transformers import SamHQConfig

        from engine.device import pick_device

        encoder = RANDOM_ENCODERS.get(name)
        if encoder is None:
            raise ValueError(f"unknown full-size random HQ-SAM {name!r}; choose from {', '.join(RANDOM_ENCODERS)}")
        config = SamHQConfig(vision_config=encoder, mask_decoder_config=dict(vit_dim=encoder["hidden_size"]))
        model = _random_model(config, seed)
        log.warning("HQ-SAM box segmenter %s has random weights: its masks are meaningless", name)
        return cls(model=model, processor=_processor(config.vision_config.image_size), model_id=name,
                   device=pick_device(device), dtype=dtype, hq_token_only=hq_token_only,
                   mask_threshold=mask_threshold)


def _random_model(config: Any, seed: int) -> Any:
    import torch
    from transformers import SamHQModel

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        return SamHQModel(config)


def _processor(image_size: int) -> Any:
    """SAM's preprocessing at `image_size`: longest edge resized to it, padded to a square (the checkpoints'
    processor config at 1024)."""
    from transformers import SamHQProcessor, SamImageProcessor

    image_processor = SamImageProcessor(
        size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size}
    )
    return SamHQProcessor(image_processor=image_processor)
