"""`engine view` pages opened from disk in a real headless Chromium: frames load, each mask is drawn where it
is and in its token's color, the conversation is there, and the index filters its rows."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from engine import masks
from engine.decode import DecodeLimits
from engine.ids import stable_id
from engine.probe import probe_video
from engine.storage import Dataset
from engine.view import FILL_ALPHA
from engine.writer import TableWriter
from flows.cli import app
from schemas import Assignment, FrameMask, ItemRecord, MaskletRecord, Provenance, Review, SampleRecord, Turn, VideoRecord
from tests import synthetic

PROV = Provenance(engine_version="0", profile="tiny", models={}, config_hash="c")
FPS = 12
BACKGROUND = (50, 50, 50)
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[synthetic.GroundTruth, Dataset, dict[str, MaskletRecord]]:
    """A 96x64 video with a square and a circle, and three samples: a kept VideoRefer caption with <region>, a
    dropped UFVideo answer with [SEG] tokens (one masklet named twice), and a Strefer sample whose masklet is
    missing."""
    root = tmp_path_factory.mktemp("view")
    square = synthetic.ShapeSpec("the square", "square", (240, 240, 240), "rect", (16, 16), lambda i: (20 + 2 * i, 40))
    circle = synthetic.ShapeSpec("the circle", "circle", (240, 240, 240), "circle", (18, 18), lambda i: (72, 28))
    truth = synthetic.make_video(
        root / "shapes.mp4", width=96, height=64, fps=FPS, num_frames=12,
        scenes=[synthetic.SceneSpec(0, BACKGROUND)], shapes=[square, circle],
    )
    info = probe_video(str(truth.path), limits=DecodeLimits())
    video = VideoRecord(
        video_id=stable_id(info.path), source=info.path, content_sha256="0" * 64, duration_s=info.duration_s,
        fps=info.fps, num_frames=info.num_frames, width=info.width, height=info.height, rotation=0, codec=info.codec,
        decode_width=info.decode_width, decode_height=info.decode_height,
    )
    masklets = {name: _masklet(video.video_id, truth, name) for name in ("the square", "the circle")}
    sq, ci = masklets["the square"].masklet_id, masklets["the circle"].masklet_id
    samples = [
        _sample("caption", video, "videorefer", "detailed_caption",
                [("human", "<video>\nDescribe <region> in detail."), ("gpt", "A white square slides to the right.")],
                [sq], frames=[2, 8]),
        _sample("seg", video, "ufvideo", "pixrqa",
                [("human", "<video>\nSegment the square and the circle."), ("gpt", "Here: [SEG] and [SEG]; again [SEG].")],
                [sq, ci, sq], frames=[5], kept=False),
        _sample("gone", video, "strefer", "type1", [("human", "<video>\nWhat is <region>?"), ("gpt", "A shape.")],
                ["no-such-masklet"], frames=[3]),
    ]
    dataset = Dataset(str(root / "ds"))
    item = ItemRecord(item_id="item", pipeline="videorefer", item_key="item", variant="v", source=video.source,
                      status="done", video_id=video.video_id, run_hash="h", write_id="", run_id="", engine_version="",
                      committed_at="")
    with TableWriter(dataset, "run") as writer:
        writer.add(item, {"videos": [video], "masklets": list(masklets.values()), "samples": samples})
    return truth, dataset, masklets


def _masklet(video_id: str, truth: synthetic.GroundTruth, name: str) -> MaskletRecord:
    by_frame = {i: truth.mask(name, i) for i in range(truth.num_frames)}
    return MaskletRecord(
        masklet_id=stable_id(video_id, name), video_id=video_id, expression=name, noun=name.split()[-1],
        method="source", start_frame=0, start_time=0.0, detector_score=1.0, detector_box=[0, 0, 1, 1],
        assignment=Assignment(method="source", candidate_index=0, num_candidates=1, score=1.0),
        num_frames_tracked=len(by_frame), track_fps=0,
        frames=[FrameMask(frame_index=i, timestamp=i / FPS, rle=masks.encode(m), box=masks.mask_box(m)) for i, m in by_frame.items()],
        provenance=PROV,
    )


def _sample(name, video, pipeline, data_type, turns, masklet_ids, *, frames, kept=True) -> SampleRecord:
    review = None if kept else Review(verdict=False, reason="the region is a circle", region_caption="a disc", frame_index=5)
    return SampleRecord(
        sample_id=stable_id(name), video_id=video.video_id, source=video.source, pipeline=pipeline, data_type=data_type,
        conversation=[Turn(role=r, value=v) for r, v in turns], masklet_ids=masklet_ids, frames=frames,
        kept=kept, review=review, provenance=PROV,
    )


@pytest.fixture(scope="module")
def pages(built, tmp_path_factory) -> Path:
    _, dataset, _ = built
    out = tmp_path_factory.mktemp("pages")
    result = CliRunner().invoke(app, ["view", dataset.url, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 sample pages" in result.output and "masklet_missing 1" in result.output
    return out


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH or at /usr/bin/chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


def _open(browser, path: Path):
    """A page at `path` (file://), with every request it makes recorded."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.requests = []
    page.on("request", lambda request: page.requests.append(request.url))
    page.goto(path.as_uri(), wait_until="load")
    return page


def _rgb(css: str) -> np.ndarray:
    return np.array([int(v) for v in css[css.index("(") + 1 : css.index(")")].split(",")[:3]], dtype=float)


def _shot(page, frame: int) -> np.ndarray:
    from PIL import Image

    png = page.locator(f'figure[data-frame="{frame}"] .stack').screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)


def _at(shot: np.ndarray, truth: synthetic.GroundTruth, x: float, y: float) -> np.ndarray:
    """The screenshot's pixel at frame pixel (x, y) (the frame is drawn scaled to the element)."""
    h, w = shot.shape[:2]
    return shot[int((y + 0.5) * h / truth.height), int((x + 0.5) * w / truth.width)]


def _center(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def _tokens(page) -> list[tuple[str, str, str]]:
    """(text, region number, background) of each token span of the conversation."""
    return page.eval_on_selector_all(
        ".conversation .tok",
        "spans => spans.map(s => [s.firstChild.textContent, s.dataset.region || '', getComputedStyle(s).backgroundColor])",
    )


def _check_frames_loaded(page, width: int) -> None:
    sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
    assert sizes and all(done and natural == width for done, natural in sizes), sizes
    assert all(url.startswith("file://") for url in page.requests), page.requests  # no external asset


def _check_mask_drawn(shot: np.ndarray, truth, name: str, frame: int, color: np.ndarray) -> None:
    """Inside the mask the frame's pixel has the region's color mixed in; the shape's own color does not pass."""
    x, y = _center(truth.mask(name, frame))
    raw = truth.render(frame)[int(y), int(x)].astype(float)
    expected = (1 - FILL_ALPHA) * raw + FILL_ALPHA * color
    got = _at(shot, truth, x, y)
    assert np.abs(got - expected).max() < 24, (name, frame, got, expected)
    assert np.abs(got - raw).max() > 40, (name, frame, got, raw)


def test_a_region_sample_page_shows_its_mask_in_its_token_color(built, pages, browser):
    truth, _, _ = built
    page = _open(browser, pages / "samples" / f"{stable_id('caption')}.html")
    _check_frames_loaded(page, truth.width)
    assert page.locator("figure.frame").count() == 2  # the sample's frames 2 and 8
    assert "A white square slides to the right." in page.inner_text(".conversation")
    assert "Describe" in page.inner_text(".conversation")
    ((text, region, background),) = _tokens(page)
    assert (text, region) == ("<region>", "1")
    color = _rgb(background)
    assert np.abs(color - np.array(BACKGROUND)).max() > 60  # a color, not the page's gray
    for frame in (2, 8):
        shot = _shot(page, frame)
        _check_mask_drawn(shot, truth, "the square", frame, color)
        far = _at(shot, truth, 90, 60)  # bottom-right corner: no mask, no tag
        assert np.abs(far - np.array(BACKGROUND)).max() < 12, far
        circle = _at(shot, truth, *_center(truth.mask("the circle", frame)))
        assert np.abs(circle - 240).max() < 16, circle  # a masklet the sample does not name is not drawn
    assert page.inner_text('figure[data-frame="2"] .tag').strip() == "1 the square"
    page.close()


def test_seg_tokens_name_masklets_in_order_and_repeat_their_colors(built, pages, browser):
    truth, _, _ = built
    page = _open(browser, pages / "samples" / f"{stable_id('seg')}.html")
    _check_frames_loaded(page, truth.width)
    tokens = _tokens(page)
    assert [(t, r) for t, r, _ in tokens] == [("[SEG]", "1"), ("[SEG]", "2"), ("[SEG]", "1")]
    assert tokens[0][2] == tokens[2][2] != tokens[1][2]
    shot = _shot(page, 5)
    _check_mask_drawn(shot, truth, "the square", 5, _rgb(tokens[0][2]))
    _check_mask_drawn(shot, truth, "the circle", 5, _rgb(tokens[1][2]))
    assert "dropped by the Reviewer: the region is a circle" in page.inner_text(".dropped")
    page.close()


def test_a_missing_masklet_leaves_a_note_and_the_page_is_written(built, pages, browser):
    truth, _, _ = built
    page = _open(browser, pages / "samples" / f"{stable_id('gone')}.html")
    _check_frames_loaded(page, truth.width)  # its frame is shown, without masks
    assert "masklet no-such-masklet is not in the dataset" in page.inner_text(".note")
    assert page.locator("img.overlay").count() == 0
    page.close()


def test_the_index_lists_every_sample_and_filters_rows(pages, browser):
    page = _open(browser, pages / "index.html")
    rows = page.locator("tr.sample")
    assert rows.count() == 3

    def shown() -> set[str]:
        return set(page.eval_on_selector_all("tr.sample:not([hidden]) a", "links => links.map(a => a.textContent)"))

    assert shown() == {stable_id(n) for n in ("caption", "seg", "gone")}
    page.select_option("#f-pipeline", "ufvideo")
    assert shown() == {stable_id("seg")}
    page.select_option("#f-pipeline", "")
    page.select_option("#f-status", "kept")
    assert shown() == {stable_id("caption"), stable_id("gone")}
    page.select_option("#f-data-type", "detailed_caption")
    assert shown() == {stable_id("caption")} and page.inner_text("#shown") == "1 shown"
    page.select_option("#f-status", "dropped")
    assert shown() == set()
    href = page.get_attribute('tr.sample[data-data-type="detailed_caption"] a', "href")  # links lead to the pages
    assert (pages / href).is_file()
    page.close()


def test_view_options_bound_and_select_the_samples(built, tmp_path):
    _, dataset, _ = built
    runner = CliRunner()
    one = runner.invoke(app, ["view", dataset.url, "--out", str(tmp_path / "one"), "--sample", stable_id("seg")])
    assert one.exit_code == 0, one.output
    assert [p.name for p in (tmp_path / "one" / "samples").iterdir()] == [f"{stable_id('seg')}.html"]
    limited = runner.invoke(app, ["view", dataset.url, "--out", str(tmp_path / "lim"), "--limit", "1"])
    assert limited.exit_code == 0 and "more samples match" in limited.output
    assert len(list((tmp_path / "lim" / "samples").iterdir())) == 1
    typed = runner.invoke(app, ["view", dataset.url, "--out", str(tmp_path / "typed"), "--pipeline", "strefer"])
    assert typed.exit_code == 0 and "1 sample pages" in typed.output

    missing = runner.invoke(app, ["view", dataset.url, "--out", str(tmp_path / "x"), "--sample", "nope"])
    assert missing.exit_code == 2 and "no sample 'nope'" in missing.output
    assert "Traceback" not in missing.output
    unknown = runner.invoke(app, ["view", dataset.url, "--out", str(tmp_path / "y"), "--version", "7"])
    assert unknown.exit_code == 2


def test_frames_past_the_end_and_a_missing_video_leave_notes(built, tmp_path):
    from engine.view import view

    _, dataset, masklets = built
    video = dataset.read_records("videos")[0]
    square = masklets["the square"]
    elsewhere = video.model_copy(update={"video_id": "not-written"})
    samples = [
        _sample("late", video, "videorefer", "short_caption", [("human", "<video>\n<region>?"), ("gpt", "A square.")],
                [square.masklet_id], frames=[3, 40]),
        _sample("orphan", elsewhere, "videorefer", "short_caption", [("human", "<video>\nWhat?"), ("gpt", "Nothing.")],
                [], frames=[1]),
    ]
    small = Dataset(str(tmp_path / "ds"))
    item = ItemRecord(item_id="item", pipeline="videorefer", item_key="item", variant="v", source=video.source,
                      status="done", video_id=video.video_id, run_hash="h", write_id="", run_id="", engine_version="",
                      committed_at="")
    with TableWriter(small, "run") as writer:
        writer.add(item, {"videos": [video], "masklets": [square], "samples": samples})
    summary = view(small.url, str(tmp_path / "pages"))
    assert summary.pages == 2 and summary.frames == 1
    assert summary.notes == {"frames_missing": 1, "video_missing": 1}
    late = (tmp_path / "pages" / "samples" / f"{stable_id('late')}.html").read_text()
    assert "frames 40 were not decoded" in late and 'data-frame="3"' in late
    orphan = (tmp_path / "pages" / "samples" / f"{stable_id('orphan')}.html").read_text()
    assert "video not-written is not in the dataset" in orphan
