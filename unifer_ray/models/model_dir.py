"""A model as a local directory: engines and trainers read local checkpoints, clusters keep them in S3."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from unifer_ray import storage

# Files that hold weights. Everything else of a checkpoint (configs, tokenizer, processor, chat template) is small.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


@contextmanager
def node_lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process of this node (an flock on `path`), released on exit."""
    with open(path, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        yield


def local_model_dir(model: str, cache_root: str | Path | None = None, *, weights: bool = True) -> str:
    """`model` itself when local; an s3:// prefix is copied below `cache_root` once per node and that copy returned.

    `weights=False` copies every file but the weights (configs, tokenizer, processor, chat template): what a process
    that only formats prompts needs, e.g. a Ray Data worker building requests for a 72B teacher. A full copy already
    on the node serves it too. The first process of a node copies (files streamed, never whole in memory) under a
    node-wide lock; the others wait for it and reuse its copy. The copy is renamed into place when complete, so a
    process never loads a half-copied checkpoint.
    """
    if not storage.is_s3(model):
        return model
    prefix = model.rstrip("/")
    root = Path(cache_root or Path(tempfile.gettempdir()) / "unifer-models")
    full = root / hashlib.sha256(prefix.encode()).hexdigest()[:16]
    target = full if weights else full.with_name(full.name + "-no-weights")
    for ready in (full, target):
        if ready.is_dir():
            return str(ready)
    root.mkdir(parents=True, exist_ok=True)
    with node_lock(root / f".{target.name}.lock"):
        if target.is_dir():  # another process of this node copied it while we waited
            return str(target)
        files = [uri for uri in storage.list_files(prefix) if weights or not uri.endswith(WEIGHT_SUFFIXES)]
        if not files:
            raise FileNotFoundError(f"model {model} holds no files" + ("" if weights else " besides weights"))
        partial = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
        try:
            for uri in files:
                storage.copy_file(uri, partial / uri[len(prefix) + 1 :])
            os.rename(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return str(target)
