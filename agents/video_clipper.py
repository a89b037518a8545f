"""Video Clipper (Strefer §2.1.4, Algorithm 2): cut a video into clips at scene changes.

One decode pass feeds two frame consumers (`ClipperPass.consumers`):
- a cut detector: PySceneDetect's ContentDetector (threshold 20), fed exactly the frames and timecodes that
  `scenedetect.detect(path, ContentDetector(threshold=20))` would feed it, so the cuts are the same;
- a sampler that keeps frames at `hac_fps` (3 FPS) for the embedder, used only when no cut is found.

`ClipperPass.finish` then returns the clips: between content cuts; else, for a video of at least 3 s, between
the segments found by agglomerative clustering of the frame embeddings (SigLIP in the paper); else one clip.
"""

from __future__ import annotations

import math
from array import array
from itertools import accumulate, groupby
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Sequence

import numpy as np

from engine.decode import FrameConsumer, RateGate
from engine.ids import stable_id
from engine.models.interfaces import Embedder
from engine.stats import Stats
from schemas import ClipRecord, Provenance

LINKAGES = ("single", "complete", "average", "weighted", "ward", "centroid", "median")
# scipy computes these three from Euclidean geometry; the others take any precomputed distance.
_EUCLIDEAN_LINKAGES = ("ward", "centroid", "median")
_MICROSECOND = Fraction(1, 1_000_000)


@dataclass(frozen=True)
class ClipperConfig:
    threshold: float = 20.0  # ContentDetector score threshold (Strefer: 20; PySceneDetect's default is 27)
    min_scene_len: int = 15  # frames; ContentDetector merges cuts closer than this
    hac_fps: float = 3.0  # embedding sample rate (Strefer: 3 FPS)
    hac_std_factor: float = 1.7  # f in the auto threshold min(mean + f * std, max) (Algorithm 2)
    min_video_s_for_hac: float = 3.0  # shorter videos without a content cut stay one clip
    min_clip_s: float = 1.0  # clustering fragments shorter than this merge into a neighbour
    # Ward, as in scikit-learn's AgglomerativeClustering (its default linkage, and the usual way to cluster
    # with a distance threshold). With average linkage, Algorithm 2's threshold min(mean + 1.7 std, max)
    # reaches the max distance whenever two segments are of comparable length (the pairwise distances are
    # then two equal groups), so it could only split off short outliers. Ward's merge heights grow with
    # cluster size and do split them. Ward needs Euclidean distances (monotone in cosine on unit vectors).
    linkage: str = "ward"
    use_hac: bool = True
    embed_batch: int = 32  # frames per embedder call
    # Pairwise distances grow with the square of the samples (an hour at 3 FPS: 10.8k samples, ~470 MB);
    # beyond this many, every k-th sample is clustered (4000 samples: 64 MB).
    max_hac_samples: int = 4000

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"threshold must be > 0 (ContentDetector score, 0-255 scale), got {self.threshold}")
        if type(self.min_scene_len) is not int or self.min_scene_len < 0:
            raise ValueError(f"min_scene_len must be a whole number of frames >= 0, got {self.min_scene_len!r}")
        if not self.hac_fps > 0:
            raise ValueError(f"hac_fps must be > 0 (embedding samples per second), got {self.hac_fps}")
        if not self.hac_std_factor >= 0:
            raise ValueError(f"hac_std_factor must be >= 0, got {self.hac_std_factor}")
        if not self.min_video_s_for_hac >= 0:
            raise ValueError(f"min_video_s_for_hac must be >= 0 seconds, got {self.min_video_s_for_hac}")
        if not self.min_clip_s >= 0:
            raise ValueError(f"min_clip_s must be >= 0 seconds, got {self.min_clip_s}")
        if self.linkage not in LINKAGES:
            raise ValueError(f"linkage must be one of {', '.join(LINKAGES)} (scipy methods), got {self.linkage!r}")
        if self.embed_batch < 1:
            raise ValueError(f"embed_batch must be >= 1, got {self.embed_batch}")
        if self.max_hac_samples < 2:
            raise ValueError(f"max_hac_samples must be >= 2, got {self.max_hac_samples}")


# -- the clustering math (Algorithm 2), pure functions -----------------------------------------------------


def auto_threshold(distances: np.ndarray, *, std_factor: float) -> float:
    """Algorithm 2, ClusteringAutoThreshold(D, f): min(mean(D) + f * std(D), max(D))."""
    return float(min(distances.mean() + std_factor * distances.std(), distances.max()))


def merge_short_runs(labels: Sequence[int], *, min_len: int) -> list[int]:
    """Segment starts (indexes into `labels`) after merging short runs of equal consecutive labels.

    A run shorter than `min_len` joins the previous run (the first joins the next), and runs that then touch
    with the same label become one, so a one-sample flash inside a scene leaves no boundary behind.
    """
    runs = [[label, len(list(group))] for label, group in groupby(labels)]
    i = 0
    while i < len(runs) and len(runs) > 1:
        if runs[i][1] >= min_len:
            i += 1
        elif i == 0:
            runs[1][1] += runs[0][1]
            del runs[0]
        else:
            runs[i - 1][1] += runs[i][1]
            del runs[i]
            if i < len(runs) and runs[i][0] == runs[i - 1][0]:
                runs[i - 1][1] += runs[i][1]
                del runs[i]
    starts = list(accumulate(length for _, length in runs))
    return starts[:-1]


def hac_boundaries(embeddings: np.ndarray, *, std_factor: float, linkage: str, min_len_samples: int) -> list[int]:
    """Sample indexes where a new segment starts (Algorithm 2): agglomerative clustering of the embeddings
    cut at the auto threshold, a boundary wherever consecutive samples fall in different clusters, fragments
    shorter than min_len_samples merged into a neighbour."""
    from scipy.cluster.hierarchy import fcluster
    from scipy.cluster.hierarchy import linkage as build_linkage
    from scipy.spatial.distance import pdist

    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {', '.join(LINKAGES)}, got {linkage!r}")
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (samples, dims), got shape {x.shape}")
    if len(x) < 2:
        return []
    metric = "euclidean" if linkage in _EUCLIDEAN_LINKAGES else "cosine"
    distances = pdist(x, metric=metric)
    if not np.isfinite(distances).all():
        raise ValueError("embeddings give non-finite distances (a zero or non-finite vector?)")
    np.clip(distances, 0.0, None, out=distances)  # cosine distance can come out at -1e-16
    threshold = auto_threshold(distances, std_factor=std_factor)
    labels = fcluster(build_linkage(distances, method=linkage), t=threshold, criterion="distance")
    return merge_short_runs(labels.tolist(), min_len=min_len_samples)


# -- frame consumers -----------------------------------------------------------------------------------


class _CutDetector:
    """Feeds ContentDetector as `scenedetect.detect()` does with its default OpenCV backend and SceneManager:
    BGR frames, auto-downscaled (SceneManager.compute_downscale_factor of the long side, target 256 px,
    cv2.INTER_LINEAR), timecodes in microseconds of presentation time at the stream's frame rate."""

    def __init__(self, *, config: ClipperConfig, fps: float, width: int, height: int, stats: Stats) -> None:
        from scenedetect import ContentDetector
        from scenedetect.common import framerate_to_fraction
        from scenedetect.scene_manager import compute_downscale_factor

        self._detector = ContentDetector(threshold=config.threshold, min_scene_len=config.min_scene_len)
        self._rate = framerate_to_fraction(fps)
        factor = compute_downscale_factor(max(width, height))
        self._size = (max(1, round(width / factor)), max(1, round(height / factor)))
        self._stats = stats
        self._index_by_pts: dict[int, int] = {}  # cuts come back as timecodes; a frame index is what we keep
        self._last: Any = None
        self.times = array("d")  # timestamp of every frame, for the clip times
        self.cuts: list[int] = []

    def wants(self, index: int, time: float) -> bool:
        return True

    def consume(self, index: int, time: float, frame: np.ndarray) -> None:
        import cv2
        from scenedetect.common import FrameTimecode, Timecode

        with self._stats.timer("clip.cut"):
            if (frame.shape[1], frame.shape[0]) != self._size:
                frame = cv2.resize(frame, self._size, interpolation=cv2.INTER_LINEAR)
            bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)  # resize and channel swap commute; swap the small one
            pts = round(time * 1_000_000)
            self._index_by_pts[pts] = index
            self._last = FrameTimecode(Timecode(pts=pts, time_base=_MICROSECOND), fps=self._rate)
            self._add(self._detector.process_frame(self._last, bgr))
        self.times.append(time)
        self._stats.count("frames_cut_detected")

    def end_of_stream(self) -> None:
        """SceneManager's final post_process call, after the last frame (the decoder calls it)."""
        if self._last is not None:
            self._add(self._detector.post_process(self._last))

    def _add(self, cuts: list[Any]) -> None:
        self.cuts += [self._index_by_pts[cut.pts] for cut in cuts]


class _Sampler:
    """Keeps one frame per 1/hac_fps seconds, squash-resized to the embedder's input size, and embeds them in
    batches as they come, so a long video holds embeddings rather than frames. Once a content cut is found
    the clustering cannot run, so it drops what it has and stops."""

    def __init__(self, *, embedder: Embedder, config: ClipperConfig, cuts: list[int], stats: Stats) -> None:
        self._embedder = embedder
        self._gate = RateGate(config.hac_fps)
        self._batch = config.embed_batch
        self._cuts = cuts  # the cut detector's list, read live
        self._stats = stats
        self._pending: list[np.ndarray] = []
        self._embedded: list[np.ndarray] = []
        self.indexes: list[int] = []  # frame index of each sample

    def wants(self, index: int, time: float) -> bool:
        if self._cuts:
            if self.indexes:
                self._pending, self._embedded, self.indexes = [], [], []
            return False
        return self._gate.open(time)

    def consume(self, index: int, time: float, frame: np.ndarray) -> None:
        import cv2

        size = self._embedder.input_size
        self._pending.append(cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA))
        self.indexes.append(index)
        self._gate.take(time)
        if len(self._pending) >= self._batch:
            self._embed_pending()

    def embeddings(self) -> np.ndarray:
        self._embed_pending()
        return np.concatenate(self._embedded) if self._embedded else np.zeros((0, 0), dtype=np.float32)

    def _embed_pending(self) -> None:
        if not self._pending:
            return
        with self._stats.timer("clip.embed"):
            self._embedded.append(np.asarray(self._embedder.embed(self._pending), dtype=np.float32))
        self._stats.count("frames_embedded", len(self._pending))
        self._pending = []


# -- the agent -----------------------------------------------------------------------------------------


class VideoClipper:
    def __init__(
        self, *, embedder: Embedder | None, config: ClipperConfig = ClipperConfig(), stats: Stats | None = None
    ) -> None:
        self.embedder = embedder
        self.config = config
        self.stats = stats or Stats()

    def start(self, *, video_id: str, fps: float, width: int, height: int, provenance: Provenance) -> ClipperPass:
        """Open the pass for one video; width and height are its display size (VideoInfo.width/height)."""
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if width < 1 or height < 1:
            raise ValueError(f"width and height must be >= 1, got {width}x{height}")
        return ClipperPass(self, video_id=video_id, fps=fps, width=width, height=height, provenance=provenance)


class ClipperPass:
    """The state of one video between its decode and `finish` (one per video, not shared)."""

    def __init__(
        self, clipper: VideoClipper, *, video_id: str, fps: float, width: int, height: int, provenance: Provenance
    ) -> None:
        self.cfg, self.stats = clipper.config, clipper.stats
        self.video_id, self.fps, self.provenance = video_id, fps, provenance
        self._first = 0
        self._cut = _CutDetector(config=self.cfg, fps=fps, width=width, height=height, stats=self.stats)
        self._sampler = (
            _Sampler(embedder=clipper.embedder, config=self.cfg, cuts=self._cut.cuts, stats=self.stats)
            if clipper.embedder is not None and self.cfg.use_hac
            else None
        )

    @property
    def consumers(self) -> list[FrameConsumer]:
        return [self._cut] if self._sampler is None else [self._cut, self._sampler]

    def finish(self, *, frames_decoded: int, end_time: float, first_frame: int = 0) -> list[ClipRecord]:
        """Clips covering frames [first_frame, frames_decoded) contiguously; pass DecodeResult's fields
        (`first_frame` is `first_index`: where a window of the source starts, 0 for a whole video)."""
        if frames_decoded <= first_frame:
            raise ValueError("no frames were decoded: there is nothing to clip")
        self._first = first_frame
        cuts = sorted({c for c in self._cut.cuts if first_frame < c < frames_decoded})
        self.stats.count("cuts_found", len(cuts))
        if cuts:
            return self._clips(cuts, "content", frames_decoded, end_time)
        sampler = self._sampler
        if sampler is not None and end_time >= self.cfg.min_video_s_for_hac and len(sampler.indexes) >= 2:
            step = math.ceil(len(sampler.indexes) / self.cfg.max_hac_samples)
            # Samples are step/min(hac_fps, fps) s apart: at low frame rates every frame is a sample.
            rate = min(self.cfg.hac_fps, self.fps) / step
            min_len = max(1, math.ceil(self.cfg.min_clip_s * rate - 1e-9))
            starts = hac_boundaries(
                sampler.embeddings()[::step],
                std_factor=self.cfg.hac_std_factor,
                linkage=self.cfg.linkage,
                min_len_samples=min_len,
            )
            indexes = sampler.indexes[::step]
            bounds = [i for i in (indexes[s] for s in starts) if first_frame < i < frames_decoded]
            if bounds:
                return self._clips(bounds, "siglip-hac", frames_decoded, end_time)
        return self._clips([], "single", frames_decoded, end_time)

    def _time(self, frame: int) -> float:
        times, at = self._cut.times, frame - self._first  # times holds the frames the detector saw, from the first
        return times[at] if 0 <= at < len(times) else frame / self.fps

    def _clips(self, bounds: list[int], method: str, frames_decoded: int, end_time: float) -> list[ClipRecord]:
        edges = [self._first, *bounds, frames_decoded]
        return [
            ClipRecord(
                clip_id=stable_id(self.video_id, self.provenance.config_hash, i),
                video_id=self.video_id,
                clip_index=i,
                start_frame=start,
                end_frame=end,
                start_time=self._time(start),
                end_time=end_time if end == frames_decoded else self._time(end),
                method=method,  # type: ignore[arg-type]
                provenance=self.provenance,
            )
            for i, (start, end) in enumerate(zip(edges[:-1], edges[1:]))
        ]
