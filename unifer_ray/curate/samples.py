"""The curation input: train-split FER samples as rows, one per image, with a stable id and a FERBench-style path."""

from __future__ import annotations

import hashlib
import json
import logging
import os

from unifer_ray import storage
from unifer_ray.curate.config import CurateSource
from unifer_ray.data.convert import dataset_dir_name, default_path_prefix
from unifer_ray.data.hf_source import read_hf_samples
from unifer_ray.data.sources import read_samples
from unifer_ray.data.synthetic import ACTIONS_FILE, load_action_params

log = logging.getLogger(__name__)

# Below a set's out_dir: the images of its Hugging Face sources, one directory per dataset (the items' image root).
IMAGES_DIR = "images"


def source_rows(source: CurateSource, *, with_action_params: bool = False,
                image_root: str | None = None) -> tuple[list[dict], list[dict]]:
    """(rows, error records) of one source.

    A row: `id` ("<dataset>:<image_path>", as FERBench items are keyed), `dataset`, `image_path`
    ('/RAF-DB/aligned/x.jpg'), `image_uri` (where the pixels are), `label`, `candidate_labels`, `action_params`
    (a JSON object of the synthetic face's actions, or "" when not asked for) and `error` ("").
    Images held as bytes (FER2013's pixel CSV) are written below the dataset root first, as the FERBench
    converter does, so that every item points to a file. A Hugging Face dataset's images are written below its
    `image_dir` (default: `image_root`/<dataset dir>) by Ray Data.
    """
    if source.hf is not None:
        if with_action_params:
            raise ValueError(f"the oracle teacher needs synthetic faces with their {ACTIONS_FILE}; "
                             f"{source.hf} is a Hugging Face dataset")
        name = dataset_dir_name(source.dataset)
        if source.image_dir is None and image_root is None:
            raise ValueError(f"hf source {source.hf}: set its image_dir (where its images are written)")
        image_dir = source.image_dir or storage.join(image_root, name)
        result = read_hf_samples(source.hf_source(), image_dir, on_ray=True)
        default_prefix = "/" + name
    else:
        result = read_samples(source.dataset, source.root, source.split, labels=source.labels)
        default_prefix = default_path_prefix(source.dataset, source.root)
    samples = result.samples[: source.limit] if source.limit else result.samples
    actions: dict[str, dict] = {}
    errors = list(result.errors)
    if with_action_params:
        if not os.path.isfile(os.path.join(source.root, ACTIONS_FILE)):
            raise ValueError(f"the oracle teacher needs synthetic faces, but {source.root} has no {ACTIONS_FILE}")
        actions = load_action_params(source.root, errors=errors)
    prefix = (source.path_prefix if source.path_prefix is not None else default_prefix).rstrip("/")
    rows = []
    for sample in samples:
        image_path = f"{prefix}/{sample.rel_path}"
        sample_id = f"{sample.dataset}:{image_path}"
        if not in_fraction(sample_id, source.fraction):
            continue
        image_uri = sample.image
        if isinstance(image_uri, bytes):
            image_uri = storage.join(os.path.abspath(source.root), sample.rel_path)
            if not storage.exists(image_uri):
                storage.write_bytes(image_uri, sample.image)
        params = actions.get(sample.rel_path)
        rows.append({
            "id": sample_id,
            "dataset": sample.dataset,
            "image_path": image_path,
            "image_uri": image_uri,
            "label": sample.label,
            "candidate_labels": list(sample.candidate_labels),
            "action_params": json.dumps(params) if params is not None else "",
            "error": "",
        })
    log.info("%s (%s): %d samples, %d errors, %d dropped", source.root or source.hf, source.split, len(rows),
             len(result.errors), len(result.dropped))
    return rows, errors


def in_fraction(sample_id: str, fraction: float) -> bool:
    """Whether `sample_id` falls in the stable `fraction` of ids: its hash, read as a number in [0, 1)."""
    if fraction >= 1.0:
        return True
    digest = hashlib.blake2b(sample_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def all_source_rows(sources: list[CurateSource], *, with_action_params: bool = False,
                    image_root: str | None = None) -> tuple[list[dict], list[dict]]:
    """Rows and error records of every source, ids checked unique (two sources must not hold the same images).
    `image_root`: the directory below which Hugging Face sources without their own image_dir write images."""
    rows: list[dict] = []
    errors: list[dict] = []
    seen: set[str] = set()
    for source in sources:
        part, part_errors = source_rows(source, with_action_params=with_action_params, image_root=image_root)
        for row in part:
            if row["id"] in seen:
                raise ValueError(f"sample {row['id']} appears in two sources; each image must be listed once")
            seen.add(row["id"])
        rows += part
        errors += part_errors
    return rows, errors
