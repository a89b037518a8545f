"""Image embedder backend: SigLIP's vision tower through transformers.

SigLIP was trained on images squash-resized to a square (no center crop) and normalised with mean = std = 0.5
per channel, so CLIP's preprocessing would shift its embeddings; `preprocess` does SigLIP's.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from engine.images import check_rgb_uint8

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TINY_MODEL_ID = "tiny-random/siglip"
# `random/siglip-<size>-patch<p>-<image>` builds this vision tower at full size with random weights.
RANDOM_MODEL_PATTERN = re.compile(r"random/siglip-(base|large|so400m)-patch(14|16)-(\d+)")
# Width, MLP width, depth and heads of SigLIP's released vision towers (SiglipVisionConfig's defaults are base).
RANDOM_TOWERS = {
    "base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "large": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "so400m": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
}
SIGLIP_MEAN = 0.5
SIGLIP_STD = 0.5


def squash_resize(image: np.ndarray, size: int) -> np.ndarray:
    """`image` resized to size x size, aspect ratio ignored (SigLIP's resize)."""
    import cv2

    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image
    # INTER_AREA anti-aliases when shrinking; bicubic when enlarging, as SigLIP's own processor does.
    interpolation = cv2.INTER_AREA if size * size < height * width else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interpolation)


def preprocess(images: Sequence[np.ndarray], size: int) -> "torch.Tensor":
    """RGB uint8 images (any size) to SigLIP's float32 input, shape (N, 3, size, size), values in [-1, 1]."""
    import torch

    batch = np.stack([squash_resize(image, size) for image in images]).astype(np.float32)
    batch = (batch / 255.0 - SIGLIP_MEAN) / SIGLIP_STD
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    # transformers logs its weight-loading report as a warning from this logger.
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class SiglipEmbedder:
    """`Embedder` backend over a transformers `SiglipVisionModel` (the text tower is never loaded)."""

    def __init__(self, *, model: Any, model_id: str, device: str = "cpu", batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.model_id = model_id
        self.device = device
        self.batch_size = batch_size
        # SiglipModel keeps the vision settings in vision_config; SiglipVisionModel's config is them.
        vision_config = getattr(model.config, "vision_config", model.config)
        self.input_size: int = int(vision_config.image_size)

    @classmethod
    def from_pretrained(
        cls, model_id_or_path: str, *, device: str = "cpu", batch_size: int = 32
    ) -> "SiglipEmbedder":
        """Weights from a Hugging Face id (e.g. google/siglip-base-patch16-224) or a local folder holding a
        SigLIP (full or vision-only) checkpoint."""
        from transformers import SiglipVisionModel

        from engine.device import pick_device
        from engine.errors import MissingWeightsError
        from engine.models.hf_loading import missing_weights_as_error

        device = pick_device(device)
        with missing_weights_as_error(model_id_or_path, role="embedder"), _quiet_load_report():
            # A full SiglipModel checkpoint loads as its vision tower alone (half the memory for so400m);
            # its text weights are "unexpected" by design, so the load report is checked here instead.
            model, info = SiglipVisionModel.from_pretrained(model_id_or_path, output_loading_info=True)
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise MissingWeightsError(
                f"{model_id_or_path!r} is not a complete SigLIP vision checkpoint: {len(missing)} weights are "
                f"missing (first: {missing[:3]})"
            )
        return cls(model=model.to(device), model_id=model_id_or_path, device=device, batch_size=batch_size)

    @classmethod
    def tiny(cls, *, seed: int = 0, device: str = "cpu", batch_size: int = 32) -> "SiglipEmbedder":
        """A randomly initialised miniature SigLIP vision tower (64 px input, 32-d embeddings) for tests and
        wiring checks: its embeddings are meaningless."""
        import torch
        from transformers import SiglipVisionConfig, SiglipVisionModel

        from engine.device import pick_device

        config = SiglipVisionConfig(
            image_size=64, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2,
        )
        device = pick_device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SiglipVisionModel(config)
        return cls(model=model.to(device), model_id=TINY_MODEL_ID, device=device, batch_size=batch_size)

    @classmethod
    def random_fullsize(
        cls, *, name: str = "random/siglip-base-patch16-224", seed: int = 0, device: str = "cpu",
        batch_size: int = 32,
    ) -> "SiglipEmbedder":
        """A released SigLIP vision tower at full size with random weights, named like the checkpoint:
        `random/siglip-base-patch16-224` (93M parameters with its pooling head), `-large-patch16-256`,
        `-so400m-patch14-384`, ... For timing where no weights can be fetched; its embeddings are meaningless."""
        import torch
        from transformers import SiglipVisionConfig, SiglipVisionModel

        from engine.device import pick_device

        match = RANDOM_MODEL_PATTERN.fullmatch(name)
        if match is None or int(match[3]) % int(match[2]):
            raise ValueError(
                f"unknown full-size random SigLIP {name!r}; name it random/siglip-<base|large|so400m>-"
                f"patch<14|16>-<image size, a multiple of the patch>, e.g. random/siglip-base-patch16-224"
            )
        tower, patch, image_size = match[1], int(match[2]), int(match[3])
        config = SiglipVisionConfig(**RANDOM_TOWERS[tower], patch_size=patch, image_size=image_size)
        device = pick_device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SiglipVisionModel(config)
        log.warning("embedder %s has random weights: its embeddings are meaningless", name)
        return cls(model=model.to(device), model_id=name, device=device, batch_size=batch_size)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """L2-normalised float32 embeddings, shape (N, D), one row per image, in order."""
        images = list(images)
        for i, image in enumerate(images):
            check_rgb_uint8(image, f"image {i}")
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)

        import torch

        dtype = next(self.model.parameters()).dtype
        # A full SiglipModel passed in embeds through get_image_features; a SiglipVisionModel through forward.
        encode = getattr(self.model, "get_image_features", self.model)
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                pixels = preprocess(images[start : start + self.batch_size], self.input_size)
                output = encode(pixel_values=pixels.to(self.device, dtype))
                # pooler_output is SigLIP's attention-pooled head, the embedding it was trained to align
                # (transformers 5 returns an output object here; 4.x returned the tensor itself).
                features = getattr(output, "pooler_output", output).float()
                chunks.append(torch.nn.functional.normalize(features, dim=-1).cpu())
        return torch.cat(chunks).numpy().astype(np.float32, copy=False)

    @property
    def dim(self) -> int:
        vision_config = getattr(self.model.config, "vision_config", self.model.config)
        return int(vision_config.hidden_size)
