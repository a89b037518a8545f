"""`ChatModel` backend: vLLM's offline engine (`vllm.LLM`) in this process, on a CUDA GPU.

A whole batch goes to one `LLM.chat` call, each request with its own `SamplingParams` (JSON Schema requests
constrained through `StructuredOutputsParams(json=...)`; `guided_json` is gone since vLLM 0.12). Images go in
as PIL images (`image_pil` parts); videos as vLLM's frames-as-video data URL (`video/jpeg`, the frames' base64
JPEGs joined by commas), so no file or network is involved.

Untested on a GPU in this repository's test suite (vLLM needs one): its tests check message conversion and
sampling parameters against a fake `vllm` module.
"""

from __future__ import annotations

import threading

from typing import Any, Sequence

from engine.errors import ConfigError
from engine.images import check_rgb_uint8
from engine.models.chat_http import content_parts, video_data_url
from engine.models.interfaces import ChatImage, ChatMessage, ChatPart, ChatRequest


def _import_vllm() -> tuple[Any, Any]:
    """(vllm, StructuredOutputsParams), or a ConfigError that says how to get them."""
    try:
        import vllm
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError as exc:
        raise ConfigError(
            "backend vllm needs the vllm package, which runs on a CUDA GPU: install the `vllm` extra there "
            "(pip install 'video-data-engine[vllm]'), or use backend transformers (in process) or openai "
            f"(a served model) ({exc})"
        ) from exc
    return vllm, StructuredOutputsParams


def vllm_messages(messages: Sequence[ChatMessage]) -> list[dict]:
    """One conversation in `LLM.chat`'s format: images as PIL images, videos as vLLM's JPEG data URL."""
    from PIL import Image

    def part(item: ChatPart) -> list[dict]:
        if isinstance(item, ChatImage):
            return [{"type": "image_pil", "image_pil": Image.fromarray(check_rgb_uint8(item.pixels))}]
        return [{"type": "video_url", "video_url": {"url": video_data_url(item)}}]

    return content_parts(messages, part)


class VllmChat:
    """`ChatModel` over an in-process `vllm.LLM`; see the module docstring."""

    def __init__(self, *, llm: Any, model_id: str) -> None:
        self.llm = llm
        self.model_id = model_id
        self._lock = threading.Lock()  # vllm's in-process engine serves one caller at a time

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.85,
        limit_mm_per_prompt: dict[str, int] | None = None,
        tensor_parallel_size: int = 1,
        load_format: str = "auto",
        seed: int = 0,
        mm_processor_kwargs: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        engine_args: dict[str, Any] | None = None,
    ) -> "VllmChat":
        """Weights from a Hugging Face id or a local folder. `limit_mm_per_prompt` e.g. {"image": 4, "video": 1};
        `load_format="dummy"` runs random weights from a folder's config and tokenizer (for timing);
        `mm_processor_kwargs` go to the model's HF processor (e.g. {"max_pixels": 802816});
        `trust_remote_code` runs the checkpoint's own code (InternVL2 needs it); `engine_args` are any other
        `vllm.LLM` keyword arguments."""
        from engine.device import pick_device
        from engine.models.hf_loading import missing_weights_as_error

        vllm, _ = _import_vllm()
        device = pick_device(device)
        if not device.startswith("cuda"):
            raise ConfigError(
                f"backend vllm runs on a CUDA GPU, not {device!r}: use backend transformers on this machine"
            )
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        args: dict[str, Any] = dict(
            model=model,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            load_format=load_format,
            seed=seed,
            trust_remote_code=trust_remote_code,
        )
        if max_model_len is not None:
            args["max_model_len"] = max_model_len
        if limit_mm_per_prompt is not None:
            args["limit_mm_per_prompt"] = dict(limit_mm_per_prompt)
        if mm_processor_kwargs is not None:
            args["mm_processor_kwargs"] = dict(mm_processor_kwargs)
        args.update(engine_args or {})
        with missing_weights_as_error(model, role="chat"):
            llm = vllm.LLM(**args)
        return cls(llm=llm, model_id=model)

    @classmethod
    def tiny(cls, **options: Any) -> "VllmChat":
        raise ConfigError(
            "backend vllm has no tiny random model: use backend transformers for tiny-random models; to time vLLM "
            "with random weights, save a full-size config and tokenizer to a folder, name the folder as model and "
            "set options {load_format: dummy}"
        )

    def sampling_params(self, request: ChatRequest) -> Any:
        vllm, structured_outputs_params = _import_vllm()
        structured = None
        if request.json_schema is not None:
            structured = structured_outputs_params(json=request.json_schema)
        return vllm.SamplingParams(
            max_tokens=request.max_tokens, temperature=request.temperature, structured_outputs=structured
        )

    def chat(self, requests: Sequence[ChatRequest]) -> list[str]:
        if not requests:
            return []
        conversations = [vllm_messages(r.messages) for r in requests]
        params = [self.sampling_params(r) for r in requests]
        with self._lock:
            outputs = self.llm.chat(conversations, sampling_params=params, use_tqdm=False)
        return [o.outputs[0].text if o.outputs else "" for o in outputs]
