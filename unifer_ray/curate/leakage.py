"""Test-leakage guard: image content hashes, and the hashes of every FERBench image (computed once per output).

Hashes are SHA-256 of the file bytes: they catch the same image file under another name or folder, not a
re-encoded or resized copy.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import ray

from unifer_ray import storage
from unifer_ray.bench.items import read_items
from unifer_ray.data.images import ImageError, load_image
from unifer_ray.records import ErrorRecord, object_array

log = logging.getLogger(__name__)


def hash_batch(batch: dict[str, np.ndarray], *, decode: bool) -> dict[str, np.ndarray]:
    """Ray Data batch UDF: adds `image_sha256` of each `image_uri`'s bytes; unreadable images (and, with
    `decode`, undecodable ones) get an `error` instead."""
    errors = np.array(batch["error"], dtype=object)
    hashes = []
    for i, uri in enumerate(batch["image_uri"]):
        digest = ""
        if not errors[i]:
            try:
                data = storage.read_bytes(str(uri))
                if decode:
                    load_image(data)
                digest = hashlib.sha256(data).hexdigest()
            except (OSError, ImageError) as exc:
                errors[i] = f"image: cannot use {uri}: {exc}"
        hashes.append(digest)
    return {**batch, "image_sha256": object_array(hashes), "error": errors}


def ferbench_hashes(files: list[str], image_root: str, cache_uri: str, batch_size: int = 64) -> dict:
    """{"images": n, "hashes": [...], "errors": [...]} of the images of FERBench item `files`, hashed on the
    cluster once: the result is cached at `cache_uri` and reused while the files' contents and root are the same."""
    key = {"files": {f: hashlib.sha256(storage.read_bytes(f)).hexdigest() for f in sorted(files)},
           "image_root": image_root}
    if storage.exists(cache_uri):
        cached = json.loads(storage.read_text(cache_uri))
        if cached.get("key") == key:
            return cached
    rows, errors = [], []
    for path in files:
        items = read_items(path, image_root=image_root)
        rows += [{"id": r["id"], "image_uri": r["image_uri"], "error": ""} for r in items.rows]
        errors += items.errors
    hashed = []
    if rows:
        ds = ray.data.from_items(rows).map_batches(hash_batch, fn_kwargs={"decode": False}, batch_size=batch_size)
        hashed = ds.select_columns(["id", "image_uri", "image_sha256", "error"]).take_all()
    errors += [ErrorRecord(r["image_uri"], f"FERBench {r['error']}", id=r["id"]).to_dict() for r in hashed
               if r["error"]]
    result = {"key": key, "images": len(rows),
              "hashes": sorted({r["image_sha256"] for r in hashed if not r["error"]}), "errors": errors}
    if errors:
        log.warning("%d FERBench items could not be hashed, so leakage cannot be ruled out for them", len(errors))
    storage.write_text(cache_uri, json.dumps(result))
    return result
