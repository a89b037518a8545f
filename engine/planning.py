"""Which work items need work, decided in bulk before anything is scheduled.

One read of the `items` table per run (the live rows of the pipeline, kept as Arrow columns: about 100 bytes
an item), and the cheap change check of each input from bulk listings: one listing per folder or object-store
prefix, not one request per file. An item is complete when its latest row has this run's hash and the same
fingerprint (size and mtime, or etag), and it is done or was rejected for a reason a retry would not change.
An input whose fingerprint changed but whose run hash matches goes on with its previous content hash, so the
runner can tell a touched file from a changed one without redoing it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

from engine.storage import Dataset, live_rows
from schemas import WorkItem

# Rejection reasons worth a retry at the next run or refresh: a fault of the engine or its model servers, not
# of the input (a corrupt file stays corrupt).
TRANSIENT_REASONS = ("internal_error", "transient_fault")


def fingerprint_of(info: dict[str, Any], listing: Sequence[dict[str, Any]] | None = None) -> str:
    """The cheap change check of one input, as JSON text: size and mtime (or an object store's etag) of a
    file; for a folder of frames (its `listing`), file count, total size and newest mtime."""
    if info.get("type") == "directory":
        files = [e for e in listing or () if e.get("type") == "file"]
        value: dict[str, Any] = {
            "files": len(files),
            "size": sum(int(e.get("size") or 0) for e in files),
            "mtime": max((str(e.get("mtime") or e.get("LastModified") or "") for e in files), default=""),
        }
    else:
        keys = ("size", "mtime", "ETag", "etag", "LastModified", "md5Hash")
        value = {k: str(info[k]) for k in keys if info.get(k) is not None}
    return json.dumps(value, sort_keys=True)


class Fingerprints:
    """Fingerprints of many inputs from one listing per folder (the last `folders` listings are kept)."""

    def __init__(self, *, folders: int = 4) -> None:
        self._listings: OrderedDict[tuple[int, str], dict[str, dict[str, Any]]] = OrderedDict()
        self._folders = folders
        self.listings = 0  # folder listings made (what a refresh costs on an object store)

    def _listing(self, fs: Any, folder: str) -> dict[str, dict[str, Any]]:
        key = (id(fs), folder)
        if key in self._listings:
            self._listings.move_to_end(key)
            return self._listings[key]
        try:
            entries = fs.ls(folder, detail=True)
        except (OSError, ValueError):
            entries = []
        self.listings += 1
        listing = {e["name"].rstrip("/"): e for e in entries}
        self._listings[key] = listing
        while len(self._listings) > self._folders:
            self._listings.popitem(last=False)
        return listing

    def of(self, source: str) -> str | None:
        """The input's fingerprint; None where it cannot be listed (the content hash decides then)."""
        located = _locate(source)
        if located is None:
            return None
        fs, path, parent = located
        info = self._listing(fs, parent).get(path)
        return None if info is None else _fingerprint(fs, path, info)

    def of_many(self, sources: Sequence[str]) -> list[str | None]:
        """Fingerprints of `sources`, in their order, listing each folder once however the sources interleave
        (a manifest may name files of many folders in any order)."""
        located = [_locate(s) for s in sources]
        order = sorted(range(len(sources)), key=lambda k: located[k][2] if located[k] else "")
        out: list[str | None] = [None] * len(sources)
        for k in order:
            out[k] = self.of(sources[k]) if located[k] else None
        return out


def _locate(source: str) -> tuple[Any, str, str] | None:
    """(filesystem, path, parent folder) of an input, or None where fsspec cannot place it."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(source)
    except (OSError, ValueError):
        return None
    path = path.rstrip("/")
    return fs, path, path.rpartition("/")[0] or "/"


def _fingerprint(fs: Any, path: str, info: dict[str, Any]) -> str | None:
    if info.get("type") == "directory":  # a folder of frames: its own listing
        try:
            return fingerprint_of(info, fs.ls(path, detail=True))
        except (OSError, ValueError):
            return None
    return fingerprint_of(info)


def fingerprint(source: str) -> str | None:
    """One input's fingerprint (the runner's check of a single item): one `info` call, never a listing of its
    folder (which may hold hundreds of thousands of files). A filesystem whose `info` and `ls` entries differ
    in the keys fingerprint_of reads only costs a content hash at the next check."""
    located = _locate(source)
    if located is None:
        return None
    fs, path, _ = located
    try:
        info = fs.info(path)
    except (OSError, ValueError):
        return None
    return _fingerprint(fs, path, info)


def variant_id(options: dict[str, Any]) -> str:
    from engine.ids import stable_id

    return stable_id(options, length=12)


def item_id(pipeline: str, item: WorkItem, variant: str) -> str:
    from engine.ids import stable_id

    return stable_id(pipeline, item.key, variant)


@dataclass
class Plan:
    """One chunk of items, split."""

    todo: list[WorkItem] = field(default_factory=list)
    previous: dict[str, dict[str, Any]] = field(default_factory=dict)  # item_id -> its live row (same run hash)
    skipped: int = 0
    beside: int = 0  # items that already hold outputs made with other run options
    replace: list[dict[str, Any]] = field(default_factory=list)  # with force: those other outputs' rows


class Planner:
    """Splits items of one pipeline run into those to do and those complete, a chunk at a time."""

    def __init__(
        self, dataset: Dataset, *, pipeline: str, variant: str, run_hash: str, force: bool = False, retry: Sequence[str] = TRANSIENT_REASONS
    ) -> None:
        import pyarrow.compute as pc

        self.pipeline, self.variant, self.run_hash, self.force = pipeline, variant, run_hash, force
        columns = [
            "item_key", "variant", "status", "reason", "detail", "run_hash", "fingerprint", "content_sha256", "source",
            "start_s", "end_s", "video_id", "rows", "engine_version", "run_id",
        ]
        live = live_rows(dataset.items(columns=columns, pipeline=pipeline))
        mine = pc.equal(live["variant"], variant)
        self._mine = live.filter(mine)
        self._others = live.filter(pc.invert(mine))
        self._retry = set(retry)
        self.fingerprints = Fingerprints()

    def split(self, items: Sequence[WorkItem]) -> Plan:
        """Which of `items` need work (in their order)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        plan = Plan()
        if not items:
            return plan
        ids = [item_id(self.pipeline, i, self.variant) for i in items]
        keys = pa.array([i.key for i in items], pa.string())
        if self._others.num_rows:
            beside = pc.is_in(self._others["item_key"], value_set=keys)
            plan.beside = len(set(self._others.filter(beside)["item_key"].to_pylist()))
            if self.force:
                plan.replace = self._others.filter(beside).to_pylist()
        if self.force:
            plan.todo = list(items)
            return plan
        # One vectorized pass over the pipeline's live rows per chunk: plan in chunks of thousands of items.
        known = self._mine.filter(pc.is_in(self._mine["item_id"], value_set=pa.array(ids, pa.string())))
        rows = {r["item_id"]: r for r in known.to_pylist()}  # at most one chunk's worth

        def redo(row: dict[str, Any] | None) -> bool:
            return row is None or row["run_hash"] != self.run_hash or (row["status"] == "rejected" and row["reason"] in self._retry)

        checked = [k for k, iid in enumerate(ids) if not redo(rows.get(iid)) and rows[iid]["fingerprint"] is not None]
        now = dict(zip(checked, self.fingerprints.of_many([items[k].source for k in checked])))
        for k, (item, iid) in enumerate(zip(items, ids)):
            row = rows.get(iid)
            if redo(row):
                plan.todo.append(item)
                continue
            if k in now and row["fingerprint"] == now[k]:
                plan.skipped += 1
                continue
            plan.todo.append(item)  # touched or unlistable: the content hash decides
            plan.previous[iid] = row
        return plan

    def live_rows(self) -> Any:
        """The live `items` rows of this pipeline and run options (Arrow)."""
        return self._mine


def chunked(iterable: Any, size: int) -> Any:
    """Lists of up to `size` items from any iterable, read lazily."""
    from itertools import islice

    iterator = iter(iterable)
    while chunk := list(islice(iterator, size)):
        yield chunk

