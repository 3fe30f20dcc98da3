"""A model as a local directory: engines and trainers read local checkpoints, clusters keep them in S3."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from unifer_ray import storage


def local_model_dir(model: str, cache_root: str | Path | None = None) -> str:
    """`model` itself when local; an s3:// prefix is copied once below `cache_root` and that copy is returned.

    The copy is made in a private directory and renamed into place, so replicas starting side by side on one
    node never load a half-copied checkpoint.
    """
    if not storage.is_s3(model):
        return model
    prefix = model.rstrip("/")
    root = Path(cache_root or Path(tempfile.gettempdir()) / "unifer-models")
    target = root / hashlib.sha256(prefix.encode()).hexdigest()[:16]
    if target.is_dir():
        return str(target)
    files = storage.list_files(prefix)
    if not files:
        raise FileNotFoundError(f"model {model} holds no files")
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
    try:
        for uri in files:
            destination = partial / uri[len(prefix) + 1 :]
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(storage.read_bytes(uri))
        os.rename(partial, target)
    except OSError:
        if not target.is_dir():  # a replica beside us finished first: its copy is as good as ours
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return str(target)
