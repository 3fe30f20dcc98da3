"""Row schemas shared by the stages (DESIGN.md, 'Data formats')."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FerSample:
    id: str  # unique within a dataset, stable across runs
    dataset: str  # a key of unifer_ray.labels.DATASETS, or a folder dataset's name
    split: str  # "train" or "test" (the split FERBench evaluates: RAF-DB test, FERPlus test, AffectNet/SFEW val)
    image: str | bytes  # a local path or s3:// URI, or encoded image bytes (FER2013's pixel CSV)
    label: str  # the dataset's own label name
    candidate_labels: list[str]
    rel_path: str = ""  # the image's path below the dataset root, as FERBench items name it
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. synthetic faces' action parameters


# A FERBench item is exactly a reference item: these keys and nothing else.
FERBENCH_KEYS = ("image_path", "true_label", "prompt", "candidate_labels")
