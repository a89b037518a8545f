"""Device and precision choice shared by the torch backends."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(device: str, dtype: str = "bfloat16") -> Any:
    """bf16 autocast on the device's type (also on CPU); `float32` disables it."""
    import torch

    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))
