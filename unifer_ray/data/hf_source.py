"""Hugging Face datasets as a FER source: a dataset saved with `save_to_disk`, a folder of parquet or arrow files,
an `imagefolder` tree, or a hub id (what `datasets.load_dataset(path, name)` takes).

`datasets` finds the split's files: `load_from_disk` for a saved dataset, `load_dataset_builder` for parquet and
arrow folders and hub ids (their files are read where they are, hub files through `hf://`), and `load_dataset` for
everything else (an imagefolder tree, a hub dataset in another format), whose split it writes to its Arrow cache.
Each file is then read in record batches, never whole: one after the other, or on Ray Data one block per file (as
the training-set readers do). Ray Data's own readers do not fit: `from_huggingface` copies an in-memory dataset into
the object store whole (and asks the hub for parquet URLs first, which fails offline), and `read_parquet` neither
reads save_to_disk's Arrow files nor numbers the rows for the errors table.

Every image (the `Image` feature's bytes, or the file its path names) is checked to decode and written once to
`image_dir/<split>/<sha256 prefix>.<format>`: the path, below the dataset's own directory name, is what FERBench
items and training sets name, and the same image always lands at the same path. Labels (a `ClassLabel`'s names,
strings, or ids without names) are mapped to the candidate labels: by an explicit `label_map`, else by name (any
case; FERBench's synonyms, so 'Happy' is 'happiness'), and plain ids by the candidates' order. A row without an
image or label, with an undecodable image or a label outside the candidates is an error record {source: file, row:
row in that file, reason}; a second row with the same image is dropped.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from unifer_ray import storage
from unifer_ray.data.images import ImageError, load_image
from unifer_ray.data.schema import FerSample
from unifer_ray.labels import DATASETS, label_in
from unifer_ray.records import PARQUET_BATCH_ROWS

HF_LAYOUT = ("a dataset saved with save_to_disk, a folder of parquet or arrow files, an imagefolder tree, "
             "or a hub id")
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes at the top of its directory


@dataclass(frozen=True)
class HFSource:
    """One split of a Hugging Face dataset, and how its columns become FER samples."""

    path: str  # a local directory or a hub id
    split: str
    dataset: str  # our dataset key (rafdb...: its label set) or a new dataset's name
    name: str | None = None  # the dataset's configuration (load_dataset's `name`)
    revision: str | None = None  # a hub dataset's branch, tag or commit
    image_column: str = "image"
    label_column: str = "label"
    labels: tuple[str, ...] | None = None  # the candidate labels; default: the dataset's, or the ClassLabel names
    label_map: dict[str, str] = field(default_factory=dict)  # the dataset's label name or id -> a candidate


@dataclass(frozen=True)
class SplitFiles:
    files: list[str]  # local paths or hf:// URLs, in the split's order
    fmt: str  # "parquet" or "arrow" (Arrow IPC streams, as datasets writes them)


@dataclass(frozen=True)
class LabelMap:
    """How a value of the label column becomes one of `candidates`."""

    candidates: tuple[str, ...]
    names: tuple[str, ...] | None  # the ClassLabel's names, when the column is one
    overrides: dict[str, str]  # from HFSource.label_map

    def label(self, value: object) -> str:
        """The candidate `value` stands for; raises ValueError saying why there is none."""
        keys = [str(value)]
        if self.names is not None and isinstance(value, int) and 0 <= value < len(self.names):
            keys.insert(0, self.names[value])
        for key in keys:
            if key in self.overrides:
                return self.overrides[key]
        if isinstance(value, str) or self.names is not None:
            found = match_label(keys[0], self.candidates)
            if found is None:
                raise ValueError(f"label {keys[0]!r} is not one of the candidate labels {list(self.candidates)}; "
                                 "map it with label_map")
            return found
        if isinstance(value, int) and 0 <= value < len(self.candidates):
            return self.candidates[value]  # ids without names follow the candidates' order
        raise ValueError(f"label {value!r} is not an index of the candidate labels {list(self.candidates)}")


def match_label(name: str, candidates: tuple[str, ...] | list[str]) -> str | None:
    """The candidate equal to `name` in any case, else the one naming the same emotion ('Happy' -> 'happiness')."""
    for cand in candidates:
        if cand.lower() == name.strip().lower():
            return cand
    try:
        return label_in(name, candidates)
    except ValueError:
        return None


def is_saved_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, marker)) for marker in SAVED_MARKERS)


def _pick_split(source: HFSource, splits: list[str]) -> None:
    if not splits:
        raise ValueError(f"Hugging Face dataset {source.path} has no splits")
    if source.split not in splits:
        raise ValueError(f"Hugging Face dataset {source.path} has no split {source.split!r}; it has {splits}")


def split_files(source: HFSource) -> SplitFiles:
    """The files holding `source.split`; a split that does not exist raises, naming those that do."""
    import datasets

    if os.path.isdir(source.path) and is_saved_dataset(source.path):
        saved = datasets.load_from_disk(source.path)
        if isinstance(saved, datasets.DatasetDict):
            _pick_split(source, list(saved))
            saved = saved[source.split]
        elif saved.split is not None and str(saved.split) != source.split:
            # A single saved Dataset is the split it was made from; one without a recorded split is any split.
            _pick_split(source, [str(saved.split)])
        return SplitFiles([f["filename"] for f in saved.cache_files], "arrow")
    if not os.path.exists(source.path) and (source.path.startswith((".", "/")) or source.path.count("/") > 1):
        raise FileNotFoundError(f"Hugging Face dataset {source.path} not found: expected {HF_LAYOUT}")
    builder = datasets.load_dataset_builder(source.path, source.name, revision=source.revision)
    data_files = builder.config.data_files or {}
    _pick_split(source, [str(s) for s in data_files] or list(builder.info.splits or {}))
    if builder.name in ("parquet", "arrow"):
        return SplitFiles([str(f) for f in data_files[source.split]], builder.name)
    loaded = datasets.load_dataset(source.path, source.name, split=source.split, revision=source.revision)
    return SplitFiles([f["filename"] for f in loaded.cache_files], "arrow")


def _filesystem(path: str):
    """The PyArrow filesystem of a split file: hf:// through huggingface_hub's fsspec filesystem."""
    if path.startswith("hf://"):
        from huggingface_hub import HfFileSystem

        return pa.fs.PyFileSystem(pa.fs.FSSpecHandler(HfFileSystem())), path[len("hf://"):]
    return storage.filesystem(path)


def _batches(path: str, fmt: str) -> Iterator[pa.RecordBatch]:
    fs, inner = _filesystem(path)
    if fmt == "parquet":
        yield from pq.ParquetFile(fs.open_input_file(inner)).iter_batches(batch_size=PARQUET_BATCH_ROWS)
    else:
        with fs.open_input_stream(inner) as stream:
            yield from pa.ipc.open_stream(stream)


def _schema(path: str, fmt: str) -> pa.Schema:
    fs, inner = _filesystem(path)
    if fmt == "parquet":
        return pq.read_schema(fs.open_input_file(inner))
    with fs.open_input_stream(inner) as stream:
        return pa.ipc.open_stream(stream).schema


def label_map(source: HFSource, schema: pa.Schema) -> LabelMap:
    """The candidate labels and the label column's ClassLabel names, from the file's own schema (its `datasets`
    features); a missing column raises, naming the columns there are."""
    import datasets

    features = datasets.Features.from_arrow_schema(schema)
    for column in (source.image_column, source.label_column):
        if column not in features:
            raise ValueError(f"Hugging Face dataset {source.path} has no column {column!r}; its columns are "
                             f"{list(features)} (set the image and label columns)")
    feature = features[source.label_column]
    names = tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    if source.labels is not None:
        candidates = tuple(source.labels)
    elif source.dataset in DATASETS:
        candidates = DATASETS[source.dataset].labels
    elif names is not None:
        candidates = names
    else:
        raise ValueError(f"{source.dataset!r} is not one of {sorted(DATASETS)} and the label column "
                         f"{source.label_column!r} is no ClassLabel: give the candidate labels")
    wrong = {k: v for k, v in source.label_map.items() if v not in candidates}
    if wrong:
        raise ValueError(f"label_map {wrong} maps to labels outside the candidate labels {list(candidates)}")
    return LabelMap(candidates, names, dict(source.label_map))


def _image_bytes(value: object, base_dir: str) -> bytes:
    """The encoded image of an `Image` feature's value ({bytes, path}) or of a path string."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise ImageError("no image")
    path = value if "://" in value or os.path.isabs(value) else os.path.join(base_dir, value)
    try:
        return storage.read_bytes(path)
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc}") from None


def file_rows(item: dict, *, fmt: str, source: HFSource, labels: LabelMap, image_dir: str) -> Iterator[dict]:
    """Ray Data flat_map UDF: one split file's path in, a row per record out: {source, row, image_file (the image's
    own file, "" for bytes), rel_path, image (where it was written), label, error ("" when good)}. Images are checked
    to decode and written once."""
    path = item["path"]
    base_dir = source.path if os.path.isdir(source.path) else ""
    row = 0
    for batch in _batches(path, fmt):
        for image, value in zip(batch.column(source.image_column).to_pylist(),
                                batch.column(source.label_column).to_pylist()):
            named = image.get("path") if isinstance(image, dict) and not image.get("bytes") else image
            out = {"source": path, "row": row, "image_file": named if isinstance(named, str) else "", "rel_path": "",
                   "image": "", "label": "", "error": ""}
            try:
                if value is None:
                    raise ValueError(f"no label in column {source.label_column!r}")
                out["label"] = labels.label(value)
                data = _image_bytes(image, base_dir)
                load_image(data)
            except ValueError as exc:  # ImageError is a ValueError
                out["error"] = str(exc)
            else:
                out["rel_path"] = f"{source.split}/{hashlib.sha256(data).hexdigest()[:20]}.{_extension(data)}"
                out["image"] = storage.join(image_dir, out["rel_path"])
                if not storage.exists(out["image"]):
                    storage.write_bytes(out["image"], data)
            yield out
            row += 1


def _extension(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:
        return {"JPEG": "jpg"}.get(image.format, (image.format or "png").lower())


def read_hf_samples(source: HFSource, image_dir: str | Path, *, on_ray: bool = False):
    """All samples of the split, sorted by id, as a sources.SourceResult. The split's files are read one after the
    other, or (`on_ray`) by Ray Data, one block per file, streamed in record batches."""
    from unifer_ray.data.sources import SourceResult

    files = split_files(source)
    if not files.files:
        raise ValueError(f"split {source.split!r} of Hugging Face dataset {source.path} has no files")
    labels = label_map(source, _schema(files.files[0], files.fmt))
    kwargs = {"fmt": files.fmt, "source": source, "labels": labels, "image_dir": str(image_dir)}
    items = [{"path": f} for f in files.files]
    if on_ray:
        import ray

        ds = ray.data.from_items(items, override_num_blocks=len(items))
        rows = ds.flat_map(file_rows, fn_kwargs=kwargs).iter_rows()
    else:
        rows = (row for item in items for row in file_rows(item, **kwargs))
    result = SourceResult()
    seen: dict[str, str] = {}
    for row in rows:
        # A record names the image file where the row has one (an imagefolder tree), as folder sources do.
        where = os.path.split(row["image_file"]) if row["image_file"] else (row["source"], row["row"])
        if row["error"]:
            result.add_error(*where, row["error"])
        elif row["rel_path"] in seen:
            result.add_dropped(*where, f"the same image as {seen[row['rel_path']]}")
        else:
            seen[row["rel_path"]] = f"{where[1]} of {where[0]}"
            result.samples.append(FerSample(
                id=row["rel_path"], dataset=source.dataset, split=source.split, image=row["image"],
                label=row["label"], candidate_labels=list(labels.candidates), rel_path=row["rel_path"]))
    result.samples.sort(key=lambda s: s.id)
    return result
