"""FER samples -> FERBench items, identical to the reference files in shared/ferbench when the data is laid out
as they name it (`/RAF-DB/aligned/test_0001_aligned.jpg` is a path below the data root)."""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterable
from pathlib import Path

from unifer_ray import storage
from unifer_ray.data.hf_source import HFSource, read_hf_samples
from unifer_ray.data.schema import FerSample
from unifer_ray.data.sources import SourceResult, read_samples
from unifer_ray.labels import DATASETS
from unifer_ray.prompts import ferbench_prompt
from unifer_ray.records import write_jsonl


def to_ferbench_items(samples: Iterable[FerSample], path_prefix: str) -> list[dict]:
    items = []
    for sample in samples:
        if not sample.rel_path:
            raise ValueError(f"sample {sample.id!r} of {sample.dataset} has no rel_path to build its image_path from")
        items.append({
            "image_path": path_prefix.rstrip("/") + "/" + sample.rel_path,
            "true_label": sample.label,
            "prompt": ferbench_prompt(sample.candidate_labels),
            "candidate_labels": list(sample.candidate_labels),
        })
    return items


def dataset_dir_name(dataset: str) -> str:
    """The directory name FERBench paths use for a dataset ('RAF-DB'); a new dataset's own name."""
    return DATASETS[dataset].name if dataset in DATASETS else dataset


def default_path_prefix(dataset: str, root: str | Path) -> str:
    """'/' + the directory name FERBench paths use ('/RAF-DB'); a generic folder uses its own name."""
    name = DATASETS[dataset].name if dataset in DATASETS else Path(os.path.abspath(root)).name
    return "/" + name


def convert_ferbench(
    dataset: str,
    root: str | Path,
    out: str | Path,
    *,
    split: str = "test",
    path_prefix: str | None = None,
    image_out: str | Path | None = None,
) -> dict:
    """Write the FERBench items of one split of a dataset to `out` (a JSON array), and a report of what happened.

    Bad rows go to `<out stem>.errors.jsonl`, rows the dataset excludes to `<out stem>.dropped.jsonl`.
    Images held as bytes (FER2013's pixel CSV) are written as files below `image_out` (default: `root`).
    """
    result = read_samples(dataset, root, split)
    _check_samples(result, f"{dataset} in {root}", split)
    image_dir = str(image_out if image_out is not None else root)
    images_written = 0
    for sample in result.samples:
        if isinstance(sample.image, bytes):
            storage.write_bytes(storage.join(image_dir, sample.rel_path), sample.image)
            images_written += 1
    prefix = path_prefix if path_prefix is not None else default_path_prefix(dataset, root)
    report = _write_items(result, out, prefix)
    return {"dataset": dataset, "split": split, **report, "images_written": images_written,
            "image_dir": image_dir if images_written else None}


def convert_hf_ferbench(source: HFSource, out: str | Path, *, path_prefix: str | None = None,
                        image_out: str | Path | None = None) -> dict:
    """`convert_ferbench` for a Hugging Face dataset: its images are written below `image_out` (default: the
    dataset's FERBench directory name beside `out`, e.g. ferbench/RAF-DB), so that the items' image_path
    ('/RAF-DB/test/<hash>.png') reads below the directory that holds `out`."""
    name = dataset_dir_name(source.dataset)
    image_dir = str(image_out if image_out is not None else storage.join(posixpath.dirname(str(out)) or ".", name))
    result = read_hf_samples(source, image_dir)
    _check_samples(result, f"{source.dataset} in {source.path}", source.split)
    report = _write_items(result, out, path_prefix if path_prefix is not None else "/" + name)
    return {"dataset": source.dataset, "split": source.split, **report, "images_written": len(result.samples),
            "image_dir": image_dir}


def _check_samples(result: SourceResult, what: str, split: str) -> None:
    if not result.samples:
        first = result.errors[0] if result.errors else None
        raise ValueError(
            f"no {split} samples of {what} ({len(result.errors)} errors, "
            f"{len(result.dropped)} dropped; first error: {first})"
        )


def _write_items(result: SourceResult, out: str | Path, prefix: str) -> dict:
    """The items as a JSON array (the reference files' format), the errors and dropped rows beside them."""
    items = to_ferbench_items(result.samples, prefix)
    storage.write_text(out, json.dumps(items, indent=2, ensure_ascii=False))
    stem = posixpath.splitext(str(out))[0]
    errors_path, dropped_path = stem + ".errors.jsonl", stem + ".dropped.jsonl"
    write_jsonl(errors_path, result.errors)
    write_jsonl(dropped_path, result.dropped)
    return {
        "samples": len(result.samples),
        "errors": len(result.errors),
        "dropped": len(result.dropped),
        "items_path": str(out),
        "errors_path": errors_path,
        "dropped_path": dropped_path,
    }
