"""Readers of the two training sets, in their released formats, as Ray Datasets: what SFT and RL read.

- CoT items (UniFER_CoT_230K.json): `image_path`, `question`, `response` (`<think>…</think><answer>…</answer>`),
  optional `id`, `dataset`, `teacher`.
- RLVR items (UniFER_RLVR_360K.json): `image_path`, `problem`, `solution` (`<answer>label</answer>`), optional
  `id`, `dataset`, `task`.

A file is a JSON array (the released files), JSONL or Parquet, local or s3://; a directory stands for the
.json/.jsonl/.parquet files below it (the shards the curation pipelines write, a Hugging Face dataset that
`unifer export` wrote), and a hub id (org/name) for a hub dataset's files. Every file is read and validated by
one Ray task, so the sets stream at any size. `image_path` is resolved below `image_root` into `image_uri`, as
FERBench items are. A bad row never stops the read: it becomes an error record (`source`, `row`, `id`, and the
reason in `error`), dropped from the dataset unless `keep_errors=True`.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs
import ray
from ray.data.expressions import col

from unifer_ray import storage
from unifer_ray.labels import DATASETS
from unifer_ray.models.model_dir import hub_snapshot, is_hub_id
from unifer_ray.parsing import is_format_compliant
from unifer_ray.records import ErrorRecord, read_records

TRAINING_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
_SOLUTION = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass(frozen=True)
class ItemFormat:
    kind: str  # "cot" or "rlvr"
    text_fields: tuple[str, str]  # (prompt, target): question/response or problem/solution
    extra_field: str  # teacher or task


COT = ItemFormat("cot", ("question", "response"), "teacher")
RLVR = ItemFormat("rlvr", ("problem", "solution"), "task")


def training_files(paths: str | list[str]) -> list[str]:
    """The files `paths` name, directories expanded to their .json/.jsonl/.parquet files (so a Hugging Face dataset
    `unifer export` wrote reads as its parquet shards), hub dataset ids to their snapshot's; raises if none exist."""
    files: list[str] = []
    for path in [paths] if isinstance(paths, str) else list(paths):
        if is_hub_id(path) and not path.endswith(TRAINING_FILE_SUFFIXES):  # a hub dataset, e.g. one exported
            path = hub_snapshot(path, repo_type="dataset")
        fs, inner = storage.filesystem(path)
        kind = fs.get_file_info(inner).type
        if kind == pafs.FileType.NotFound:
            raise FileNotFoundError(f"training set file or directory not found: {path}")
        if kind == pafs.FileType.Directory:
            found = [f for f in storage.list_files(path) if f.endswith(TRAINING_FILE_SUFFIXES)
                     and not posixpath.basename(f).startswith(".")]
            if not found:
                raise FileNotFoundError(f"{path}: a directory without {'/'.join(TRAINING_FILE_SUFFIXES)} files")
            files += found
        else:
            files.append(path)
    return files


def dataset_from_path(image_path: str) -> str:
    """The dataset key an image path's top folder names ('/RAF-DB/aligned/x.jpg' -> 'rafdb'); '' if none."""
    top = image_path.lstrip("/").split("/", 1)[0]
    return next((spec.key for spec in DATASETS.values() if spec.name == top), "")


def _string(item: dict, key: str, required: bool) -> str:
    value = item.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ValueError(f"field '{key}' must be a {'non-empty ' if required else ''}string, got {value!r:.80}")
    return value


def validate_item(raw: object, fmt: ItemFormat, *, source: str, row: int, image_root: str | None) -> dict:
    """One valid row in our columns; raises ValueError saying what is wrong with `raw`."""
    if isinstance(raw, json.JSONDecodeError):
        raise ValueError(f"malformed JSON: {raw}")
    if not isinstance(raw, dict):
        raise ValueError(f"an item must be an object, got {type(raw).__name__}")
    missing = [k for k in ("image_path", *fmt.text_fields) if k not in raw]
    if missing:
        raise ValueError(f"missing field(s) {missing} of a {fmt.kind} item")
    image_path = _string(raw, "image_path", required=True)
    prompt, target = (_string(raw, k, required=True) for k in fmt.text_fields)
    out = {
        "id": _string(raw, "id", required=False) or f"{posixpath.basename(source)}#{row}",
        "dataset": _string(raw, "dataset", required=False) or dataset_from_path(image_path),
        "image_path": image_path,
        "image_uri": storage.join(image_root, image_path) if image_root else image_path,
        fmt.text_fields[0]: prompt,
        fmt.text_fields[1]: target,
        fmt.extra_field: _string(raw, fmt.extra_field, required=False),
    }
    if fmt.kind == "cot" and not is_format_compliant(target):
        raise ValueError("field 'response' is not one <think>…</think> block then one <answer>…</answer> block")
    if fmt.kind == "rlvr":
        # As the paper's reward reads a solution: the <answer> text, or the whole solution when it has no tags.
        match = _SOLUTION.search(target)
        out["answer"] = (match.group(1) if match else target).strip()
        if not out["answer"]:
            raise ValueError("field 'solution' has an empty answer")
    return out


def _empty_row(fmt: ItemFormat) -> dict:
    row = {k: "" for k in ("id", "dataset", "image_path", "image_uri", *fmt.text_fields, fmt.extra_field)}
    return row | ({"answer": ""} if fmt.kind == "rlvr" else {})


def _file_rows(item: dict, *, fmt: ItemFormat, image_root: str | None) -> Iterator[dict]:
    """Ray Data flat_map UDF: one file path in, its rows out (every row has the same columns)."""
    source = item["path"]
    try:
        for row, raw in read_records(source):
            try:
                out = validate_item(raw, fmt, source=source, row=row, image_root=image_root) | {"error": ""}
            except ValueError as exc:
                row_id = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else ""
                out = _empty_row(fmt) | {"id": row_id or f"{posixpath.basename(source)}#{row}", "error": str(exc)}
            yield out | {"source": source, "row": row}
    except (OSError, ValueError) as exc:  # the whole file is unreadable: one error record for it
        yield _empty_row(fmt) | {"id": f"{posixpath.basename(source)}#-1", "source": source, "row": -1,
                                 "error": f"unreadable file: {exc}"}


def _read(fmt: ItemFormat, paths: str | list[str], image_root: str | None, keep_errors: bool) -> ray.data.Dataset:
    files = training_files(paths)
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    ds = ds.flat_map(_file_rows, fn_kwargs={"fmt": fmt, "image_root": image_root})
    if keep_errors:
        return ds
    return ds.filter(expr=col("error") == "").drop_columns(["error"])


def read_cot(paths: str | list[str], image_root: str | None = None, *, keep_errors: bool = False) -> ray.data.Dataset:
    """CoT items: `id, dataset, teacher, image_path, image_uri, question, response, source, row` (+ `error` when
    `keep_errors`, "" on valid rows)."""
    return _read(COT, paths, image_root, keep_errors)


def read_rlvr(paths: str | list[str], image_root: str | None = None, *, keep_errors: bool = False) -> ray.data.Dataset:
    """RLVR items: `id, dataset, task, image_path, image_uri, problem, solution, answer, source, row` (+ `error`
    when `keep_errors`, "" on valid rows). `answer` is the text inside the solution's <answer> tags."""
    return _read(RLVR, paths, image_root, keep_errors)


def error_records(ds: ray.data.Dataset) -> list[dict]:
    """The error records of a dataset read with `keep_errors=True`: {source, row, id, reason}."""
    bad = ds.filter(expr=col("error") != "").select_columns(["source", "row", "id", "error"])
    return [ErrorRecord(r["source"], r["error"], row=r["row"], id=r["id"]).to_dict() for r in bad.take_all()]
