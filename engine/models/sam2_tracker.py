"""SAM 2 video tracker backend (`Tracker`) on sam2's video predictor, fed frames from a `FrameSource`.

Two sam2 predictor classes can run it. sam2 1.1.0's default `sam2.sam2_video_predictor.SAM2VideoPredictor`
tracks each object in its own forward, so its cost grows linearly with objects; the batched one it still ships,
`sam2.sam2_video_predictor_legacy.SAM2VideoPredictor`, runs all objects of a frame in one forward (about 6x
the frames/s at 8 objects on a GPU) under stricter prompting rules (see `Sam2Session`). Batched is the default.

sam2's public `init_state` takes a path and loads every frame as fp32 (12 MiB a frame at 1024), and its mp4
reader needs decord. Here the session state is built directly (see `_new_inference_state` and
`_new_batched_inference_state`) around frames our own decoder stored compressed, each converted to fp32 only
when sam2 indexes it.

torch and sam2 are imported inside functions so importing this module stays light.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from engine.errors import MissingWeightsError
from engine.models.interfaces import Box, FrameSource
from engine.stats import Stats

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# The sam2 release whose predictors' `init_state` `_new_inference_state` and `_new_batched_inference_state` mirror.
SAM2_MIRRORED_VERSION = "1.1.0"
# sam2's batched video predictor class, picked at build time with a hydra override of the model's target.
BATCHED_PREDICTOR_TARGET = "sam2.sam2_video_predictor_legacy.SAM2VideoPredictor"
# ImageNet statistics, as in sam2.utils.misc.load_video_frames.
IMG_MEAN = (0.485, 0.456, 0.406)
IMG_STD = (0.229, 0.224, 0.225)
DTYPES = ("bfloat16", "float16", "float32")
# sam2 stores video memories in bf16, which float16 autocast cannot mix with ("Unexpected floating ScalarType
# in at::autocast::prioritize"), so the tracker offers bf16 autocast or plain float32.
TRACKER_DTYPES = ("bfloat16", "float32")
TINY_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
TINY_MODEL_ID = "tiny-random/sam2.1-hiera-t"
# Frames of non-conditioning memory kept behind the current frame. sam2 reads at most num_maskmem-1 = 6
# memory frames and max_obj_ptrs_in_encoder-1 = 15 object pointers behind it, so 16 changes no result.
DEFAULT_KEEP_WINDOW = 16


def resolve_sam2_weights(model: str, config: str | None) -> tuple[str, str]:
    """(sam2 config name, local checkpoint path) for a local .pt file or a Hugging Face id.

    A Hugging Face id is mapped to its config and file name with sam2's own table and downloaded (or read
    from the cache) with `huggingface_hub.hf_hub_download`.
    """
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    if model.endswith(".pt") or os.path.isfile(model):
        if not os.path.isfile(model):
            raise MissingWeightsError(
                f"SAM 2 checkpoint {model!r} does not exist; give a local .pt file or a Hugging Face id "
                f"such as 'facebook/sam2.1-hiera-small'"
            )
        if config is None:
            by_file = {ckpt: cfg for cfg, ckpt in HF_MODEL_ID_TO_FILENAMES.values()}
            config = by_file.get(os.path.basename(model))
            if config is None:
                raise ValueError(
                    f"cannot tell the sam2 config of checkpoint {model!r} from its file name; pass config=, "
                    f"one of {sorted(by_file.values())}"
                )
        return config, model
    if model not in HF_MODEL_ID_TO_FILENAMES:
        raise ValueError(
            f"unknown SAM 2 model {model!r}: give a local .pt checkpoint or one of "
            f"{sorted(HF_MODEL_ID_TO_FILENAMES)}"
        )
    hf_config, filename = HF_MODEL_ID_TO_FILENAMES[model]
    from huggingface_hub import hf_hub_download

    try:
        ckpt_path = hf_hub_download(repo_id=model, filename=filename)
    except Exception as exc:  # offline, hub down, gated, disk full: all mean "no weights here"
        raise MissingWeightsError(
            f"SAM 2 weights {model}/{filename} are not in the Hugging Face cache and could not be downloaded "
            f"({type(exc).__name__}: {exc}); download them where there is network "
            f"(`huggingface-cli download {model} {filename}`) or pass a local .pt path"
        ) from exc
    return config or hf_config, ckpt_path


def clip_boxes(boxes: np.ndarray, *, width: int, height: int) -> np.ndarray:
    """Validate xyxy pixel boxes (N, 4) and clip them to the image; float32 (N, 4).

    Detectors overshoot the border by a pixel or two, so parts outside are clipped; a box with nothing
    inside the image, or that is empty or not xyxy, is a ValueError."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) as xyxy pixels, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("boxes must be finite numbers")
    if (arr[:, 2] <= arr[:, 0]).any() or (arr[:, 3] <= arr[:, 1]).any():
        bad = int(np.flatnonzero((arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1]))[0])
        raise ValueError(f"box {bad} {arr[bad].tolist()} is empty or not xyxy (need x0 < x1 and y0 < y1)")
    clipped = arr.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    outside = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if outside.any():
        bad = int(np.flatnonzero(outside)[0])
        raise ValueError(f"box {bad} {arr[bad].tolist()} lies outside the {width}x{height} image")
    return clipped.astype(np.float32)


def check_dtype(dtype: str, allowed: Sequence[str] = DTYPES) -> str:
    if dtype not in allowed:
        raise ValueError(f"dtype must be one of {tuple(allowed)}, got {dtype!r}")
    return dtype


def random_fullsize_config(name: str) -> str:
    """The sam2 config of `random/<name>`, for any `facebook/<name>` sam2 knows (e.g. random/sam2.1-hiera-small)."""
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    configs = {"random/" + hf.split("/", 1)[1]: cfg for hf, (cfg, _) in HF_MODEL_ID_TO_FILENAMES.items()}
    if name not in configs:
        raise ValueError(f"unknown full-size random SAM 2 {name!r}; choose from {', '.join(sorted(configs))}")
    return configs[name]


def tiny_overrides(image_size: int) -> list[str]:
    if not isinstance(image_size, int) or image_size < 64 or image_size % 32:
        # Hiera's last stage has stride 32 and sam2's mask path expects image_size // 16 features.
        raise ValueError(f"image_size must be a multiple of 32 and at least 64, got {image_size!r}")
    return [f"++model.image_size={image_size}"]


def predictor_overrides(batched: bool) -> list[str]:
    """hydra overrides for `build_sam2_video_predictor` that pick sam2's batched predictor class."""
    return [f"++model._target_={BATCHED_PREDICTOR_TARGET}"] if batched else []


def predictor_is_batched(predictor: Any) -> bool:
    """True for sam2's batched (legacy) video predictor, False for its per-object one; else a ValueError."""
    from sam2.sam2_video_predictor import SAM2VideoPredictor
    from sam2.sam2_video_predictor_legacy import SAM2VideoPredictor as BatchedVideoPredictor

    if isinstance(predictor, BatchedVideoPredictor):
        return True
    if isinstance(predictor, SAM2VideoPredictor):
        return False
    raise ValueError(
        f"predictor must be a sam2 video predictor (sam2.sam2_video_predictor.SAM2VideoPredictor or "
        f"{BATCHED_PREDICTOR_TARGET}), got {type(predictor).__name__}"
    )


def load_checkpoint_message(exc: BaseException, ckpt_path: str | None, config: str) -> str:
    detail = " ".join(str(exc).split())[:300] or "missing or unexpected keys"  # torch lists every key
    return (
        f"SAM 2 checkpoint {ckpt_path!r} does not load into config {config!r} ({detail}); "
        f"pass the config it was trained with as config="
    )


class _NormalizedFrames:
    """The `images` entry of a sam2 inference state, made lazy.

    sam2 only does `len(images)` and `images[i].to(device).float()`; here `images[i]` converts the stored
    uint8 frame to the normalized fp32 [3, S, S] tensor on the model's device at that moment and keeps
    nothing, so the only fp32 frame alive is the one in sam2's single-entry `cached_features`.

    Propagation reads frames in order, so once two reads show the direction, the next frame is fetched
    (decoded) in a background thread while the model works on this one: on a GPU a 1024 JPEG decode (about
    7 ms here) is a sizeable part of a frame's time. At most one uint8 frame is held ahead.
    """

    def __init__(
        self, frames: FrameSource, *, image_size: int, device: "torch.device", prefetch: bool = True
    ) -> None:
        import torch

        self._frames = frames
        self._num_frames = len(frames)
        self._image_size = image_size
        self._device = device
        self._mean = torch.tensor(IMG_MEAN, dtype=torch.float32, device=device).view(3, 1, 1)
        self._std = torch.tensor(IMG_STD, dtype=torch.float32, device=device).view(3, 1, 1)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sam2-frames") if prefetch else None
        self._ahead: tuple[int, Future[np.ndarray]] | None = None
        self._last: int | None = None
        self.conversions = 0  # frames converted so far (a frame revisited is converted again)

    def __len__(self) -> int:
        return self._num_frames

    def frame(self, index: int) -> np.ndarray:
        """The FrameSource's frame `index`, checked to be what sam2 needs."""
        if not 0 <= index < self._num_frames:
            raise IndexError(f"frame {index} is out of range for a video of {self._num_frames} frames")
        frame = self._frames[index]
        s = self._image_size
        if not isinstance(frame, np.ndarray) or frame.shape != (s, s, 3) or frame.dtype != np.uint8:
            raise ValueError(
                f"frame {index} of the FrameSource must be RGB uint8 of shape ({s}, {s}, 3), squash-resized "
                f"to the tracker's image_size, got {getattr(frame, 'shape', None)} "
                f"{getattr(frame, 'dtype', type(frame).__name__)}"
            )
        return frame

    def _fetch(self, index: int) -> np.ndarray:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == index:
            frame = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].cancel()
            frame = self.frame(index)
        if self._pool is not None and self._last is not None and index != self._last:
            following = index + (1 if index > self._last else -1)  # keep going the way reads went
            if 0 <= following < self._num_frames:
                self._ahead = (following, self._pool.submit(self.frame, following))
        self._last = index
        return frame

    def __getitem__(self, index: int) -> "torch.Tensor":
        import torch

        frame = self._fetch(index)
        # Move uint8 (4x smaller than fp32) to the device, then convert there; contiguous CHW as sam2's loader.
        pixels = torch.from_numpy(np.ascontiguousarray(frame)).to(self._device)
        image = pixels.permute(2, 0, 1).contiguous().float().div_(255.0)
        self.conversions += 1
        return image.sub_(self._mean).div_(self._std)

    def close(self) -> None:
        self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _shared_inference_state(
    predictor: Any,
    images: _NormalizedFrames,
    *,
    height: int,
    width: int,
    offload_state_to_cpu: bool,
) -> dict[str, Any]:
    """The entries both sam2 1.1.0 predictors' `init_state` build alike, with `images` supplied by us.

    Differences from init_state: frames come from `images` instead of `load_video_frames`, and the warm-up
    backbone pass on frame 0 is skipped (features are computed on first use anyway).
    """
    import torch

    device = predictor.device
    return {
        "images": images,
        "num_frames": len(images),
        "offload_video_to_cpu": False,  # unused by sam2 after init_state; frames are converted on demand
        "offload_state_to_cpu": offload_state_to_cpu,
        "video_height": height,
        "video_width": width,
        "device": device,
        "storage_device": torch.device("cpu") if offload_state_to_cpu else device,
        "point_inputs_per_obj": {},
        "mask_inputs_per_obj": {},
        "cached_features": {},
        "constants": {},
        "obj_id_to_idx": OrderedDict(),
        "obj_idx_to_id": OrderedDict(),
        "obj_ids": [],
    }


def _new_inference_state(
    predictor: Any,
    images: _NormalizedFrames,
    *,
    height: int,
    width: int,
    offload_state_to_cpu: bool,
) -> dict[str, Any]:
    """The dict `sam2.sam2_video_predictor.SAM2VideoPredictor.init_state` builds in sam2 1.1.0 (per-object
    outputs only), with the differences of `_shared_inference_state`."""
    return {
        **_shared_inference_state(
            predictor, images, height=height, width=width, offload_state_to_cpu=offload_state_to_cpu
        ),
        "output_dict_per_obj": {},
        "temp_output_dict_per_obj": {},
        "frames_tracked_per_obj": {},
    }


def _new_batched_inference_state(
    predictor: Any,
    images: _NormalizedFrames,
    *,
    height: int,
    width: int,
    offload_state_to_cpu: bool,
) -> dict[str, Any]:
    """The dict `sam2.sam2_video_predictor_legacy.SAM2VideoPredictor.init_state` builds in sam2 1.1.0 (outputs
    of all objects consolidated per frame, plus per-object views of them), with the differences of
    `_shared_inference_state`."""
    return {
        **_shared_inference_state(
            predictor, images, height=height, width=width, offload_state_to_cpu=offload_state_to_cpu
        ),
        "output_dict": {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
        "output_dict_per_obj": {},
        "temp_output_dict_per_obj": {},
        "consolidated_frame_inds": {"cond_frame_outputs": set(), "non_cond_frame_outputs": set()},
        "tracking_has_started": False,
        "frames_already_tracked": {},
    }


def _warn_if_other_sam2() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("sam2")
    except PackageNotFoundError:  # a source checkout
        return
    if installed != SAM2_MIRRORED_VERSION:
        log.warning(
            "sam2 %s is installed; Sam2Tracker builds the inference state as sam2 %s does: check "
            "_new_inference_state and _new_batched_inference_state against the predictors' init_state",
            installed,
            SAM2_MIRRORED_VERSION,
        )


def _has_sam2_extension() -> bool:
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


class Sam2Session:
    """One video's tracking state: every object of the video in one sam2 inference state.

    With sam2's batched predictor (`batched`) every object of a frame is tracked in one forward, under its
    rules (sam2 RELEASE_NOTES): all objects are prompted before the first propagation (a prompt after it is
    a RuntimeError here: open a new session with every prompt), and on a frame that carries prompts, an
    object not prompted there is taken as absent (an empty mask that conditions its tracking). So prompt
    every object on the same frame. The per-object predictor has neither rule, at a cost per frame that
    grows linearly with the objects.
    """

    def __init__(
        self,
        *,
        predictor: Any,
        frames: FrameSource,
        height: int,
        width: int,
        dtype: str = "bfloat16",
        keep_window: int | None = DEFAULT_KEEP_WINDOW,
        offload_state_to_cpu: bool = False,
    ) -> None:
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width)):
            raise ValueError(f"height and width must be positive ints, got {height!r} x {width!r}")
        if keep_window is not None and (not isinstance(keep_window, int) or keep_window < 1):
            raise ValueError(f"keep_window must be a positive int or None (keep everything), got {keep_window!r}")
        num_frames = len(frames)
        if num_frames == 0:
            raise ValueError("cannot track over an empty FrameSource: append frames first")
        self._predictor = predictor
        self._device = predictor.device
        self._dtype = check_dtype(dtype, TRACKER_DTYPES)
        self.height = height
        self.width = width
        self.num_frames = num_frames
        self.keep_window = keep_window
        self.stats = Stats()
        self.batched = predictor_is_batched(predictor)
        self._propagating = False
        self._images = _NormalizedFrames(frames, image_size=predictor.image_size, device=self._device)
        self._images.frame(0)  # fail now, not mid-propagation, on frames of the wrong size
        new_state = _new_batched_inference_state if self.batched else _new_inference_state
        self._state: dict[str, Any] | None = new_state(
            predictor, self._images, height=height, width=width, offload_state_to_cpu=offload_state_to_cpu
        )

    # -- prompts ---------------------------------------------------------------------------------------

    def add_box(self, position: int, obj_id: int, box: Box) -> None:
        """Prompt `obj_id` with an xyxy pixel box at frame `position`; parts outside the frame are clipped."""
        state = self._prompt_state()
        self._check_position(position, "add_box")
        self._check_obj_id(obj_id)
        clipped = self._check_box(box)
        with self._inference():
            self._predictor.add_new_points_or_box(state, frame_idx=int(position), obj_id=int(obj_id), box=clipped)
        self.stats.count("tracker_prompts")

    def add_mask(self, position: int, obj_id: int, mask: np.ndarray) -> None:
        """Prompt `obj_id` with a boolean (height, width) mask at frame `position`."""
        state = self._prompt_state()
        self._check_position(position, "add_mask")
        self._check_obj_id(obj_id)
        mask = np.asarray(mask)
        if mask.shape != (self.height, self.width):
            raise ValueError(
                f"mask for object {obj_id} must have the output shape ({self.height}, {self.width}), "
                f"got {mask.shape}"
            )
        if mask.dtype != np.bool_:
            if not np.issubdtype(mask.dtype, np.number) or not np.isin(mask, (0, 1)).all():
                raise ValueError(f"mask for object {obj_id} must be boolean (or 0/1), got dtype {mask.dtype}")
            mask = mask.astype(bool)
        if not mask.any():
            raise ValueError(f"mask for object {obj_id} at frame {position} is empty: nothing to track")
        import torch

        with self._inference():
            self._predictor.add_new_mask(
                state, frame_idx=int(position), obj_id=int(obj_id), mask=torch.from_numpy(mask)
            )
        self.stats.count("tracker_prompts")

    # -- propagation -----------------------------------------------------------------------------------

    def propagate(self, start: int, *, reverse: bool = False) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
        """Yield (position, {obj_id: bool mask (height, width)}) from `start`, inclusive, to the last frame
        (or, reversed, to frame 0). Validates before the first frame is asked for."""
        state = self._open_state()
        self._check_position(start, "propagate")
        if not state["obj_ids"]:
            raise ValueError("propagate called before any prompt: add_box or add_mask first")
        if self._propagating:
            raise RuntimeError("this session is already propagating; finish or close that iterator first")
        return self._propagate(state, int(start), bool(reverse))

    def _propagate(
        self, state: dict[str, Any], start: int, reverse: bool
    ) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
        if reverse and start == 0:
            # sam2 yields nothing for a reverse pass from frame 0; the contract includes `start`, so track
            # that one frame (a prompted frame 0 returns its prompt output unchanged).
            steps = self._predictor.propagate_in_video(state, start_frame_idx=0, max_frame_num_to_track=0)
        else:
            steps = self._predictor.propagate_in_video(state, start_frame_idx=start, reverse=reverse)
        self._propagating = True
        self.stats.count("tracker_passes")
        try:
            if self._dtype == "float32":
                with self._inference():
                    self._upcast_prompt_memories(state)
            while self._state is not None:  # closed mid-pass: stop
                # Enter inference mode and autocast per step, not around the generator: held across a
                # `yield` they would leak into the caller's code between frames.
                with self._inference():
                    try:
                        frame_idx, obj_ids, mask_logits = next(steps)
                    except StopIteration:
                        return
                    masks = (mask_logits[:, 0] > 0).cpu().numpy()
                    self._prune(state, frame_idx, reverse)
                self.stats.count("tracker_frames")
                yield frame_idx, {int(obj_id): masks[i] for i, obj_id in enumerate(obj_ids)}
        finally:
            steps.close()
            self._propagating = False

    def _upcast_prompt_memories(self, state: dict[str, Any]) -> None:
        """Make float32 (no autocast) work where sam2's own fp32 path fails (sam2 issue 308).

        sam2 stores every memory in bf16. A frame whose memory holds only conditioning memories and no
        object pointers (the first frame of a pass that starts beyond every prompt, e.g. reverse from a frame
        after the prompt) then feeds bf16 alone into fp32 layers: "mat1 and mat2 must have the same dtype".
        Conditioning memories in fp32 make every memory concatenation promote to fp32.
        """
        self._predictor.propagate_in_video_preflight(state)  # moves prompt outputs in; a no-op if done
        if self.batched:
            # Tracking reads the consolidated outputs (every one has a memory after the preflight).
            for t, out in state["output_dict"]["cond_frame_outputs"].items():
                out["maskmem_features"] = out["maskmem_features"].float()
                # the per-object outputs are slices of the consolidated one: slice the fp32 copy again
                self._predictor._add_output_per_object(state, t, out, "cond_frame_outputs")
            return
        for obj_outputs in state["output_dict_per_obj"].values():
            for out in obj_outputs["cond_frame_outputs"].values():
                if out["maskmem_features"] is not None:
                    out["maskmem_features"] = out["maskmem_features"].float()

    def _prune(self, state: dict[str, Any], frame_idx: int, reverse: bool) -> None:
        """Drop per-object non-conditioning outputs more than `keep_window` frames behind `frame_idx`.

        sam2 keeps every tracked frame's memory (about 0.75 MiB per object per frame at 1024) for the whole
        session, though it only attends to the last num_maskmem-1 frames, the last max_obj_ptrs_in_encoder-1
        object pointers, and the conditioning (prompted) frames, which are never dropped here. Upstream
        suggests this pruning for long videos (sam2 issues 196, 545).

        The batched predictor tracks from consolidated outputs (all objects of a frame in one) and keeps
        per-object slices of them, which share their tensors: both are dropped, or the slices would keep the
        memory alive. It takes no prompt once tracking started, so its record of tracked frames stays.
        """
        if self.keep_window is not None:
            if reverse:
                is_stale = lambda t: t > frame_idx + self.keep_window  # noqa: E731
            else:
                is_stale = lambda t: t < frame_idx - self.keep_window  # noqa: E731
            dropped = 0
            for obj_idx, obj_outputs in state["output_dict_per_obj"].items():
                non_cond = obj_outputs["non_cond_frame_outputs"]
                for t in [t for t in non_cond if is_stale(t)]:
                    del non_cond[t]
                    if not self.batched:
                        # Also forget that sam2 tracked the frame, so a later prompt there starts a fresh
                        # conditioning frame instead of "correcting" an output that is gone.
                        state["frames_tracked_per_obj"][obj_idx].pop(t, None)
                    dropped += 1
            if self.batched:
                consolidated = state["output_dict"]["non_cond_frame_outputs"]
                for t in [t for t in consolidated if is_stale(t)]:
                    del consolidated[t]
            if dropped:
                self.stats.count("tracker_pruned_outputs", dropped)
        cached = state["cached_features"]
        if len(cached) > 1:  # sam2 1.1.0 keeps one entry; hold it to that if a later version caches more
            for t in list(cached)[:-1]:
                del cached[t]

    # -- lifecycle -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the session's tensors; the session cannot be used afterwards. Safe to call twice."""
        state, self._state = self._state, None
        if state is None:
            return
        with self._inference():
            self._predictor.reset_state(state)
        state["cached_features"].clear()
        state["constants"].clear()
        state["images"] = None
        self._images.close()

    def __enter__(self) -> "Sam2Session":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- introspection (tests, benchmarks) -------------------------------------------------------------

    @property
    def obj_ids(self) -> list[int]:
        return list(self._open_state()["obj_ids"])

    def stored_outputs(self) -> dict[str, int]:
        """How many per-object frame outputs the state holds, by kind. With the batched predictor an object
        holds a frame where its slice or the frame's consolidated output is kept."""
        state = self._open_state()
        per_obj = state["output_dict_per_obj"].values()

        def held(kind: str) -> int:
            consolidated = state["output_dict"][kind].keys() if self.batched else set()
            return sum(len(o[kind].keys() | consolidated) for o in per_obj)

        return {
            "cond": held("cond_frame_outputs"),
            "non_cond": held("non_cond_frame_outputs"),
            "cached_features": len(state["cached_features"]),
        }

    # -- helpers ---------------------------------------------------------------------------------------

    @contextmanager
    def _inference(self) -> Iterator[None]:
        import torch

        from engine.device import autocast

        # bf16 autocast also on CPU: without it, a pass that starts beyond every prompt fails with
        # "mat1 and mat2 must have the same dtype" (sam2 stores memories in bf16; sam2 issue 308).
        with torch.inference_mode(), autocast(str(self._device), self._dtype):
            yield

    def _open_state(self) -> dict[str, Any]:
        if self._state is None:
            raise RuntimeError("this tracking session is closed; start a new one")
        return self._state

    def _prompt_state(self) -> dict[str, Any]:
        state = self._open_state()
        if self._propagating:
            raise RuntimeError("cannot prompt while a propagation of this session is running; finish it first")
        if self.batched and state["tracking_has_started"]:
            # sam2 would refuse a new object, but take a new prompt frame of a known one and call every
            # other object absent there: a silently wrong result.
            raise RuntimeError(
                "the batched SAM 2 tracker takes every prompt before the first propagation: open a new session "
                "and prompt all objects before propagating (or use batched=False)"
            )
        return state

    def _check_position(self, position: int, what: str) -> None:
        if not isinstance(position, (int, np.integer)) or isinstance(position, bool):
            raise ValueError(f"{what}: frame position must be an int, got {type(position).__name__}")
        if not 0 <= position < self.num_frames:
            raise ValueError(
                f"{what}: frame position {position} is out of range for a video of {self.num_frames} frames"
            )

    @staticmethod
    def _check_obj_id(obj_id: int) -> None:
        if not isinstance(obj_id, (int, np.integer)) or isinstance(obj_id, bool):
            raise ValueError(f"obj_id must be an int, got {obj_id!r}")

    def _check_box(self, box: Sequence[float]) -> np.ndarray:
        try:
            values = np.asarray(box, dtype=np.float64).reshape(1, 4)
        except (TypeError, ValueError):
            raise ValueError(f"box must be four numbers x0, y0, x1, y1, got {box!r}") from None
        return clip_boxes(values, width=self.width, height=self.height)[0]


def _silence_sam2_progress_bar() -> None:
    """sam2 wraps every propagation in a tqdm bar on stderr; the engine reports progress itself. Replaced in
    sam2's predictor modules only, so other libraries' bars (downloads) stay."""
    import sam2.sam2_video_predictor as video_predictor
    import sam2.sam2_video_predictor_legacy as batched_video_predictor

    for module in (video_predictor, batched_video_predictor):
        module.tqdm = lambda iterable, *args, **kwargs: iterable


def _settle_rope_tables(predictor: Any) -> None:
    """Build sam2's rotary position tables for this image_size now, as its first forward would.

    `RoPEAttention.forward` rebinds its `freqs_cis` table on every call and rebuilds it when the token count
    differs from its config's (any image_size but 1024). Sessions in several threads on a fresh predictor can
    interleave there: one writes the stale table back after another rebuilt it, and the other then applies
    it (a shape assertion on its first frame). With the table already right, those rebinds are no-ops.
    """
    from sam2.modeling.sam.transformer import RoPEAttention

    side = int(predictor.sam_image_embedding_size)  # memory attention runs on the stride-16 feature map
    for module in predictor.modules():
        if isinstance(module, RoPEAttention) and (
            module.freqs_cis.shape[0] != side * side or module.freqs_cis.device != predictor.device
        ):
            module.freqs_cis = module.compute_cis(end_x=side, end_y=side).to(predictor.device)


class Sam2Tracker:
    """`Tracker` on sam2's video predictor. Load once per worker; `start` a session per video.

    `batched` says which predictor class runs it: sam2's batched one (one forward per frame for all objects,
    see `Sam2Session` for its prompting rules) or the per-object one. Given to `__init__`, it must match the
    predictor's class; None takes the predictor's. Sessions of one tracker may run in several threads at once.
    """

    def __init__(
        self,
        *,
        predictor: Any,
        model_id: str,
        dtype: str = "bfloat16",
        keep_window: int | None = DEFAULT_KEEP_WINDOW,
        offload_state_to_cpu: bool = False,
        batched: bool | None = None,
    ) -> None:
        is_batched = predictor_is_batched(predictor)
        if batched is not None and batched != is_batched:
            raise ValueError(
                f"batched={batched} but the predictor is sam2's {'batched' if is_batched else 'per-object'} "
                f"{type(predictor).__module__}.{type(predictor).__name__}"
            )
        if keep_window is not None and (not isinstance(keep_window, int) or keep_window < 1):
            raise ValueError(f"keep_window must be a positive int or None (keep everything), got {keep_window!r}")
        _warn_if_other_sam2()
        if predictor.fill_hole_area > 0 and not _has_sam2_extension():
            # Without the optional CUDA extension sam2 skips hole filling anyway, after a long warning.
            log.info("sam2's _C extension is not built: hole filling in tracked masks is off")
            predictor.fill_hole_area = 0
        _silence_sam2_progress_bar()
        _settle_rope_tables(predictor)
        self.predictor = predictor
        self.batched = is_batched
        self.model_id = model_id
        self.image_size: int = int(predictor.image_size)
        self.dtype = check_dtype(dtype, TRACKER_DTYPES)
        self.keep_window = keep_window
        self.offload_state_to_cpu = offload_state_to_cpu

    @property
    def device(self) -> str:
        return str(self.predictor.device)

    @property
    def exact_keep_window(self) -> int:
        """A keep_window at least this large changes no mask: the farthest frame behind the current one that
        sam2 reads (memory frames at the eval stride, or object pointers)."""
        p = self.predictor
        stride = max(1, int(p.memory_temporal_stride_for_eval))
        # See SAM2Base._prepare_memory_conditioned_features: memory frames reach 1 + stride*(num_maskmem-2)
        # frames back, object pointers max_obj_ptrs_in_encoder-1.
        memory_reach = 1 + stride * (p.num_maskmem - 2) if p.num_maskmem >= 2 else 0
        pointer_reach = p.max_obj_ptrs_in_encoder - 1 if p.use_obj_ptrs_in_encoder else 0
        return max(memory_reach, pointer_reach, 1)

    def start(self, frames: FrameSource, *, height: int, width: int) -> Sam2Session:
        return Sam2Session(
            predictor=self.predictor,
            frames=frames,
            height=height,
            width=width,
            dtype=self.dtype,
            keep_window=self.keep_window,
            offload_state_to_cpu=self.offload_state_to_cpu,
        )

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        config: str | None = None,
        device: str = "auto",
        dtype: str = "bfloat16",
        keep_window: int | None = DEFAULT_KEEP_WINDOW,
        batched: bool = True,
    ) -> "Sam2Tracker":
        """Load a local .pt checkpoint (config from its file name unless given) or a Hugging Face id such as
        "facebook/sam2.1-hiera-small" (downloaded into the Hugging Face cache on first use). `batched` picks
        sam2's batched predictor class (one forward per frame for all objects) over the per-object one."""
        from sam2.build_sam import build_sam2_video_predictor

        from engine.device import pick_device

        check_dtype(dtype, TRACKER_DTYPES)
        config, ckpt_path = resolve_sam2_weights(model, config)
        try:
            # vos_optimized=False: the VOS variant torch.compiles for minutes, which a batch job rarely repays.
            predictor = build_sam2_video_predictor(
                config,
                ckpt_path,
                device=pick_device(device),
                hydra_overrides_extra=predictor_overrides(batched),
                vos_optimized=False,
            )
        except RuntimeError as exc:  # sam2 raises a bare RuntimeError() on a key mismatch
            raise ValueError(load_checkpoint_message(exc, ckpt_path, config)) from exc
        return cls(predictor=predictor, model_id=model, dtype=dtype, keep_window=keep_window, batched=batched)

    @classmethod
    def tiny(
        cls,
        *,
        image_size: int = 256,
        seed: int = 0,
        device: str = "cpu",
        dtype: str = "bfloat16",
        keep_window: int | None = DEFAULT_KEEP_WINDOW,
        batched: bool = True,
    ) -> "Sam2Tracker":
        """sam2.1 hiera-t with random weights at a small image_size: for tests and wiring; masks are noise.
        Both predictor classes draw the same weights for one seed."""
        import torch
        from sam2.build_sam import build_sam2_video_predictor

        from engine.device import pick_device

        check_dtype(dtype, TRACKER_DTYPES)
        overrides = tiny_overrides(image_size) + predictor_overrides(batched)
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
            torch.manual_seed(seed)
            predictor = build_sam2_video_predictor(
                TINY_CONFIG,
                ckpt_path=None,
                device=pick_device(device),
                hydra_overrides_extra=overrides,
                vos_optimized=False,
            )
        log.warning("SAM 2 tracker %s has random weights: its masks are meaningless", TINY_MODEL_ID)
        return cls(predictor=predictor, model_id=TINY_MODEL_ID, dtype=dtype, keep_window=keep_window, batched=batched)

    @classmethod
    def random_fullsize(
        cls,
        *,
        name: str = "random/sam2.1-hiera-small",
        seed: int = 0,
        device: str = "auto",
        dtype: str = "bfloat16",
        keep_window: int | None = DEFAULT_KEEP_WINDOW,
        batched: bool = True,
    ) -> "Sam2Tracker":
        """A released SAM 2 architecture at full size (its own config and image_size, 1024) with random
        weights: `random/<name>` for any `facebook/<name>` sam2 knows, e.g. random/sam2.1-hiera-small. For
        timing where no weights can be fetched; masks are noise."""
        import torch
        from sam2.build_sam import build_sam2_video_predictor

        from engine.device import pick_device

        check_dtype(dtype, TRACKER_DTYPES)
        config = random_fullsize_config(name)
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
            torch.manual_seed(seed)
            predictor = build_sam2_video_predictor(
                config,
                ckpt_path=None,
                device=pick_device(device),
                hydra_overrides_extra=predictor_overrides(batched),
                vos_optimized=False,
            )
        log.warning("SAM 2 tracker %s has random weights: its masks are meaningless", name)
        return cls(predictor=predictor, model_id=name, dtype=dtype, keep_window=keep_window, batched=batched)

