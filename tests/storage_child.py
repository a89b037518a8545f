"""A writer process for the storage tests: runs a small fake pipeline (a real decode, one clip row per video)
over a folder of videos into a dataset through the real runner, writer and planner, then publishes a version.

    python -m tests.storage_child DATASET VIDEOS_FOLDER [--pause-before-items]

With --pause-before-items, every flush announces itself on stdout ("FLUSH data-written") after the data
tables' appends and waits before the `items` append, so a test can SIGKILL it exactly there.
"""

from __future__ import annotations

import sys
import time
import uuid

from engine.config import load_config
from engine.decode import DecodeResult
from engine.ids import stable_id
from engine.runner import FunctionPass, Outputs, Pipeline, Runner, VideoContext
from engine.stats import Stats
from engine.storage import ITEMS, Dataset
from engine.writer import TableWriter
from flows.pipelines import finish_run
from schemas import ClipRecord, RunSettings
from flows.pipelines import iter_items

NAME = "fake-storage"


class OneClipStage:
    """Fake stage: one clip per video, spanning every decoded frame."""

    name = "one-clip"

    def start(self, ctx: VideoContext) -> FunctionPass:
        def finish(decoded: DecodeResult, so_far: Outputs) -> Outputs:
            n = decoded.frames_decoded
            clip = ClipRecord(
                clip_id=stable_id(ctx.video_id, ctx.provenance.config_hash, 0), video_id=ctx.video_id, clip_index=0,
                start_frame=0, end_frame=n, start_time=0.0, end_time=n / ctx.info.fps, method="single",
                provenance=ctx.provenance,
            )
            return Outputs(clips=[clip])

        return FunctionPass(finish)


def main(out: str, folder: str, pause: bool) -> None:
    if pause:
        import deltalake

        real = deltalake.write_deltalake

        def announcing(uri, data, **kw):  # the flush's last append is the items table's
            if str(uri).rstrip("/").endswith("/" + ITEMS):
                print("FLUSH data-written", flush=True)
                time.sleep(60)
            return real(uri, data, **kw)

        deltalake.write_deltalake = announcing
    config = load_config("tiny")
    pipeline = Pipeline(name=NAME, stages=[OneClipStage()], config=config, models={})
    dataset = Dataset(out)
    stats = Stats()
    run_id = uuid.uuid4().hex[:16]
    items = list(iter_items([folder]))
    with TableWriter(dataset, run_id, flush_mb=1e-6, combine_every=1) as writer:  # every item its own flush
        Runner(pipeline, dataset, stats=stats, writer=writer, videos_in_flight=1, prefetch=0).run(items)
    settings = RunSettings(
        pipeline=NAME, variant=pipeline.variant, run_hash=pipeline.run_hash, options="{}", config=config.model_dump_json(), sources=[folder]
    )
    finish_run(out, stats, config, run_id=run_id, kind="run", settings=[settings], counts={"done": stats.counters["items_done"]})
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--pause-before-items" in sys.argv[3:])
