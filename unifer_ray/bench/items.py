"""Read FERBench item files (the reference JSON arrays, JSONL or Parquet) into validated rows."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from unifer_ray import storage
from unifer_ray.data.schema import FERBENCH_KEYS
from unifer_ray.labels import dataset_of
from unifer_ray.records import ErrorRecord, read_records


@dataclass
class ItemRows:
    rows: list[dict] = field(default_factory=list)  # valid items, one dict each, with `id` and `dataset`
    errors: list[dict] = field(default_factory=list)  # bad items, as ErrorRecord.to_dict()


def _problem(item: object) -> str | None:
    if isinstance(item, json.JSONDecodeError):
        return f"malformed JSON: {item}"
    if not isinstance(item, dict):
        return f"an item must be a JSON object, got {type(item).__name__}"
    missing = [k for k in FERBENCH_KEYS if k not in item]
    if missing:
        return f"missing field(s) {missing}"
    for key in ("image_path", "true_label", "prompt"):
        if not isinstance(item[key], str) or not item[key]:
            return f"field '{key}' must be a non-empty string"
    labels = item["candidate_labels"]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        return "field 'candidate_labels' must be a non-empty list of strings"
    if item["true_label"] not in labels:
        return f"true_label {item['true_label']!r} is not among candidate_labels {labels}"
    return None


def read_items(path: str, *, image_root: str, dataset: str | None = None, limit: int | None = None) -> ItemRows:
    """Validated FERBench rows of one file. `image_path` is resolved below `image_root` into `image_uri`."""
    result = ItemRows()
    seen: set[str] = set()
    for row, item in read_records(path):
        if limit is not None and len(result.rows) >= limit:
            break
        problem = _problem(item)
        key = dataset or (dataset_of(item["candidate_labels"]) if problem is None else None)
        if problem is None and key is None:
            problem = f"candidate_labels {item['candidate_labels']} match no known dataset; set `dataset` for this file"
        item_id = f"{key}:{item['image_path']}" if problem is None else f"{path}#{row}"
        if problem is None and item_id in seen:
            problem = f"duplicate item {item['image_path']!r}"
        if problem is not None:
            result.errors.append(ErrorRecord(path, problem, row=row, id=item_id).to_dict())
            continue
        seen.add(item_id)
        result.rows.append({
            "id": item_id,
            "dataset": key,
            "image_path": item["image_path"],
            "image_uri": storage.join(image_root, item["image_path"]),
            "true_label": item["true_label"],
            "candidate_labels": list(item["candidate_labels"]),
            "prompt": item["prompt"],
        })
    return result
