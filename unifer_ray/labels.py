"""Label sets of the four FER datasets and the canonical 8-emotion taxonomy."""

from __future__ import annotations

from dataclasses import dataclass

from unifer_ray.registry import lookup


@dataclass(frozen=True)
class DatasetSpec:
    key: str  # our short name, used in configs and ids
    name: str  # the name the paper's files use (directory names in image paths)
    labels: tuple[str, ...]  # candidate labels, in the dataset's own order
    ferbench_file: str  # the reference FERBench file name


RAFDB = DatasetSpec(
    "rafdb", "RAF-DB",
    ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"),
    "rafdb_qa.json",
)
FERPLUS = DatasetSpec(
    "ferplus", "FERPlus",
    ("angry", "contempt", "disgust", "fear", "happy", "neutral", "sad", "surprise"),
    "ferplus_qa.json",
)
AFFECTNET = DatasetSpec(
    "affectnet", "AffectNet",
    ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt"),
    "affectnet_qa.json",
)
SFEW = DatasetSpec(
    "sfew", "SFEW-2.0",
    ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"),
    "sfew_2.0_qa.json",
)
DATASETS: dict[str, DatasetSpec] = {d.key: d for d in (RAFDB, FERPLUS, AFFECTNET, SFEW)}

# The canonical taxonomy is AffectNet's order; pooled ("overall") scores use these names.
CANONICAL: tuple[str, ...] = AFFECTNET.labels
SYNONYMS: dict[str, str] = {"angry": "anger", "happy": "happiness", "sad": "sadness"}


def canonical(label: str) -> str:
    """Map a dataset label (any case) to the canonical taxonomy; raises on labels outside it."""
    name = label.strip().lower()
    name = SYNONYMS.get(name, name)
    if name not in CANONICAL:
        raise ValueError(f"{label!r} is not an emotion of the canonical taxonomy {CANONICAL}")
    return name


def dataset_spec(key: str) -> DatasetSpec:
    return lookup(DATASETS, key, "dataset")


def dataset_of(candidate_labels: list[str] | tuple[str, ...]) -> str | None:
    """The dataset whose label set, in order, is `candidate_labels`."""
    for spec in DATASETS.values():
        if list(spec.labels) == list(candidate_labels):
            return spec.key
    return None


def label_in(label: str, candidates: list[str] | tuple[str, ...]) -> str:
    """The candidate naming the same emotion as `label` (so 'happy' matches 'happiness'); raises if none."""
    target = canonical(label)
    for cand in candidates:
        if canonical(cand) == target:
            return cand
    raise ValueError(f"label {label!r} is not among the candidates {list(candidates)}")
